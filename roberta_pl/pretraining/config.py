"""The typed schema of ``conf/pretrain.yaml``: the groups only pretraining has, and the whole tree."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from data_pipelines.masking import MaskingStrategy
from roberta_pl.choices import choices
from roberta_pl.config import LoggerConf, ModelConf, OptimConf, TrainerConf

Packing = choices("Packing", ["full_sentences", "doc", "packed_docs"])
OnError = choices("OnError", ["raise", "skip"])


@dataclass
class BatchConf:
    global_batch_size: int = 32  # sequences per optimizer step, over all ranks
    micro_batch_size: int = 16  # sequences per forward pass per rank
    seq_len: int = 128
    # Optional warm-up of the batch size: [[until_step, global_batch_size], ...]; after the last entry
    # global_batch_size applies.
    ramp: list[Any] = field(default_factory=list)



@dataclass
class DataConf:
    train_shards: Optional[str] = None  # None: the embedded default corpus, built and cached
    valid_shards: Optional[str] = None
    tokenizer: Optional[str] = None  # tokenizer dir; required with train_shards
    # data=shards sets it: without train_shards and tokenizer the run stops with one line instead of training on
    # the embedded corpus. (A `???` in data/shards.yaml cannot say it: merged over this schema's None default,
    # OmegaConf keeps the None, and the run went on with the default corpus.)
    require_shards: bool = False
    cache_dir: str = "${oc.env:ROBERTA_PL_CACHE,${oc.env:HOME}/.cache/roberta-pl}"
    default_vocab_size: int = 8192  # tokenizer size when the default corpus is built
    packing: Packing = Packing.full_sentences  # the data side's DataSettings.pack_mode
    mask_prob: float = 0.15  # the rate validation masks at, and where a mask-rate schedule ends
    # Mask-rate schedule: start here, hold through the LR warm-up, fall linearly to mask_prob at the last step
    # (Ankner et al., 2023: 0.3 -> 0.15). None: mask_prob throughout.
    mask_prob_start: Optional[float] = None
    random_prob: float = 0.1
    keep_prob: float = 0.1
    # What a batch predicts: token (each token, BERT's) | whole_word (all pieces of a word) | span (SpanBERT's spans
    # of whole words): the names of data_pipelines.masking.STRATEGIES, which this choice is generated from.
    masking: MaskingStrategy = MaskingStrategy.token
    # DataLoader workers per rank. None: as many as the rank's CPUs (less one) and the train shards per rank
    # allow, at most 4 (data_pipelines.epochs.default_num_workers); the choice is logged once.
    num_workers: Optional[int] = None
    shuffle_window: int = 1000  # blocks shuffled together per reader (a window, permuted whole; exact resume keeps it)
    on_error: OnError = OnError["raise"]  # a bad shard read: raise, or skip it with a counted warning



@dataclass
class CheckpointConf:
    every_n_steps: int = 500
    keep: int = 3  # step checkpoints kept besides last



ProbeMethod = choices("ProbeMethod", ["linear", "finetune"])
ProbePooling = choices("ProbePooling", ["mean", "cls"])
# Fine-tuning's task kinds and file formats that a probe scores: one text (or a pair) -> one class.
ProbeTaskKind = choices("ProbeTaskKind", ["sequence_classification"])
ProbeTaskFormat = choices("ProbeTaskFormat", ["auto", "csv", "tsv", "jsonl"])


@dataclass
class ProbeTaskConf:
    """A probe task, in fine-tuning's task schema (conf/task/): labelled train and valid files."""

    name: str = "task"  # the metric: probe/<name>/accuracy
    kind: ProbeTaskKind = ProbeTaskKind.sequence_classification
    train_file: Optional[str] = None
    valid_file: Optional[str] = None
    format: ProbeTaskFormat = ProbeTaskFormat.auto  # auto: by the file's extension
    header: bool = True
    columns: list[str] = field(default_factory=list)
    text_column: str = "text"
    text_pair_column: Optional[str] = None
    label_column: str = "label"
    labels: Optional[list[str]] = None
    max_seq_len: int = 128


@dataclass
class ProbeConf:
    every_n_steps: int = 0  # 0: no probes
    tasks: list[ProbeTaskConf] = field(default_factory=list)
    method: ProbeMethod = ProbeMethod.linear  # linear: logistic regression on frozen features | finetune: a copy
    pooling: ProbePooling = ProbePooling.mean  # the features: mean over real tokens | cls: the <s> position
    batch_size: int = 64
    seed: int = 0
    l2: float = 1e-3  # linear: the L2 penalty of the logistic regression
    max_iter: int = 100  # linear: L-BFGS iterations
    finetune_steps: int = 20  # finetune: AdamW steps on the train split
    finetune_lr: float = 1e-4


@dataclass
class PretrainConfig:
    model: ModelConf = field(default_factory=ModelConf)
    batch: BatchConf = field(default_factory=BatchConf)
    optim: OptimConf = field(default_factory=OptimConf)
    data: DataConf = field(default_factory=DataConf)
    trainer: TrainerConf = field(default_factory=TrainerConf)
    logger: LoggerConf = field(default_factory=LoggerConf)
    checkpoint: CheckpointConf = field(default_factory=CheckpointConf)
    probe: ProbeConf = field(default_factory=ProbeConf)  # live downstream probes (off by default)
    # Continue pretraining: a HuggingFace RoBERTa-family dir (roberta, xlm-roberta, camembert, roberta-prelayernorm), a
    # roberta-pl .ckpt or a DeepSpeed checkpoint dir. Its weights (encoder and MLM head), architecture and tokenizer;
    # of model.*, only dropout, attention_dropout, activation_checkpointing, pad_vocab_multiple and compile are settable.
    pretrained: Optional[str] = None
    run_name: str = "default"
    run_dir: str = "runs/${run_name}"  # stable, so requeues and resume=auto find their checkpoints
    resume: str = "auto"  # auto | never | path to a checkpoint
    seed: int = 1234
    export_hf: bool = True  # write <run_dir>/hf at the end
    fill_mask: list[str] = field(default_factory=list)  # prompts printed with the model's top-k at the end
    optimized_metric: Optional[str] = None  # returned to Hydra sweepers (Optuna), e.g. val/loss



def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore (``conf/pretrain.yaml`` names ``pretrain_schema`` first)."""
    cs = ConfigStore.instance()
    cs.store(name="pretrain_schema", node=PretrainConfig)

