"""Typed schemas of ``conf/finetune.yaml``: the task (files, columns, labels, metric), batch, optimizer,
early stopping. The ``trainer`` and ``logger`` groups are the pretraining ones."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from roberta_pl.config import LoggerConf, TrainerConf


@dataclass
class TaskConf:
    name: str = "custom"
    kind: str = "sequence_classification"  # sequence_classification | token_classification
    data_dir: Optional[str] = None  # presets: the directory holding the task's files
    train_file: Optional[str] = None
    valid_file: Optional[str] = None
    test_file: Optional[str] = None  # optional: unlabelled (or labelled) rows to predict after training
    format: str = "auto"  # auto (by extension) | csv | tsv | jsonl | conll
    header: bool = True  # csv/tsv: the first row names the columns
    columns: list[str] = field(default_factory=list)  # csv/tsv without a header: the column names
    text_column: str = "text"  # token_classification: the words column
    text_pair_column: Optional[str] = None  # a second text for pair tasks (entailment, similarity)
    label_column: str = "label"  # token_classification: the tags column
    labels: Optional[list[str]] = None  # class names in logit order; None: sorted from the training file
    regression: bool = False  # one score trained with MSE (STS-B)
    metric: str = "accuracy"  # monitored for early stopping and the best checkpoint
    max_seq_len: int = 128  # longer inputs are cut, with a counted warning


@dataclass
class FinetuneOptimConf:
    lr: float = 2e-5
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.1
    warmup_ratio: float = 0.06  # RoBERTa's GLUE recipe: 6% of the steps
    layer_decay: float = 1.0  # layer-wise LR decay; 1.0 = off, 0.75-0.95 typical


@dataclass
class FinetuneTrainerConf(TrainerConf):
    max_steps: int = -1  # -1: train max_epochs
    max_epochs: int = 10
    val_every_n_steps: Optional[int] = None  # None: validate after each epoch
    limit_val_batches: Any = 1.0


@dataclass
class EarlyStoppingConf:
    patience: int = 3  # validations without improvement before stopping; 0 disables early stopping
    min_delta: float = 0.0


@dataclass
class FinetuneConfig:
    pretrained: Optional[str] = None  # a roberta-pl .ckpt, a DeepSpeed checkpoint dir or a HF RoBERTa dir
    tokenizer: Optional[str] = None  # default: the one recorded in the checkpoint / found in the HF dir
    init: str = "pretrained"  # pretrained | random (same architecture from scratch: the no-pretraining baseline)
    task: TaskConf = field(default_factory=TaskConf)
    batch_size: int = 32  # sequences per optimizer step, over all ranks
    micro_batch_size: Optional[int] = None  # per rank per forward; None: batch_size / ranks
    optim: FinetuneOptimConf = field(default_factory=FinetuneOptimConf)
    trainer: FinetuneTrainerConf = field(default_factory=FinetuneTrainerConf)
    logger: LoggerConf = field(default_factory=LoggerConf)
    early_stopping: EarlyStoppingConf = field(default_factory=EarlyStoppingConf)
    run_name: str = "finetune-${task.name}"
    run_dir: str = "runs/${run_name}"
    overwrite: bool = False  # replace an earlier fine-tuning in run_dir
    seed: int = 1234
    num_workers: int = 0
    dropout: Optional[float] = None  # override the pretrained model's dropout
    export_hf: bool = True  # write <run_dir>/hf for transformers' AutoModelFor*Classification


def register_configs() -> None:
    ConfigStore.instance().store(name="finetune_schema", node=FinetuneConfig)
