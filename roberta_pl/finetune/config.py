"""Typed schemas of ``conf/finetune.yaml``: the task (files, columns, labels, metric), batch, optimizer,
early stopping. The ``trainer`` and ``logger`` groups are the pretraining ones."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore

from roberta_pl.choices import choices
from roberta_pl.config import LoggerConf, TrainerConf
from roberta_pl.errors import ConfigError
from roberta_pl.optim import Decay

TaskKind = choices("TaskKind", ["sequence_classification", "token_classification"])
TaskFormat = choices("TaskFormat", ["auto", "csv", "tsv", "jsonl", "conll"])
Init = choices("Init", ["pretrained", "random"])


@dataclass
class TaskConf:
    name: str = "custom"
    kind: TaskKind = TaskKind.sequence_classification
    data_dir: Optional[str] = None  # presets: the directory holding the task's files
    train_file: Optional[str] = None
    valid_file: Optional[str] = None
    test_file: Optional[str] = None  # optional: unlabelled (or labelled) rows to predict after training
    format: TaskFormat = TaskFormat.auto  # auto: by the file's extension
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
    lr: Optional[float] = None  # None: by the pretrained model's size (SIZE_DEFAULTS)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.1
    warmup_ratio: float = 0.06  # RoBERTa's GLUE recipe: 6% of the steps
    decay: Decay = Decay.linear  # after the warm-up, as in pretraining (roberta_pl.optim.DECAYS); linear: RoBERTa's GLUE
    power: float = 1.0  # polynomial: the exponent
    end_lr_ratio: float = 0.0  # the LR at the last step, as a fraction of the peak
    decay_fraction: float = 0.2  # wsd: the share of the steps after the warm-up that decays
    decay_steps: Optional[int] = None  # wsd: or this many last steps
    layer_decay: float = 1.0  # layer-wise LR decay; 1.0 = off, 0.75-0.95 typical


@dataclass
class FinetuneTrainerConf(TrainerConf):
    max_steps: int = -1  # -1: train max_epochs
    max_epochs: int = 10
    val_every_n_steps: Optional[int] = None  # None: validate after each epoch
    limit_val_batches: Any = 1.0


@dataclass
class EarlyStoppingConf:
    # Validations without improvement before stopping; 0 disables early stopping; None: by model size (SIZE_DEFAULTS)
    patience: Optional[int] = None
    min_delta: float = 0.0


@dataclass
class FinetuneConfig:
    pretrained: Optional[str] = None  # a roberta-pl .ckpt, a DeepSpeed checkpoint dir or a HF RoBERTa dir
    tokenizer: Optional[str] = None  # default: the one recorded in the checkpoint / found in the HF dir
    init: Init = Init.pretrained  # random: the same architecture from scratch (the no-pretraining baseline)
    task: TaskConf = field(default_factory=TaskConf)
    batch_size: int = 32  # sequences per optimizer step, over all ranks
    micro_batch_size: Optional[int] = None  # per rank per forward; None: batch_size / ranks
    optim: FinetuneOptimConf = field(default_factory=FinetuneOptimConf)
    trainer: FinetuneTrainerConf = field(default_factory=FinetuneTrainerConf)
    logger: LoggerConf = field(default_factory=LoggerConf)
    early_stopping: EarlyStoppingConf = field(default_factory=EarlyStoppingConf)
    run_name: str = "finetune-${task.name}-${init}"  # init too: the random-init baseline gets its own run dir
    run_dir: str = "runs/${run_name}"
    overwrite: bool = False  # replace an earlier fine-tuning in run_dir
    seed: int = 1234
    num_workers: int = 0
    # Fine-tuning's own regularisation, never the pretrained model's (the budget recipe pretrains with dropout 0):
    # on hidden states and the head; None: by the encoder's size (SIZE_DEFAULTS), printed at the start.
    dropout: Optional[float] = None
    attention_dropout: Optional[float] = None  # on attention probabilities; None: as dropout
    export_hf: bool = True  # write <run_dir>/hf for transformers' AutoModelFor*Classification


@dataclass(frozen=True)
class SizeDefaults:
    """The fine-tuning settings that depend on the pretrained encoder's size."""

    preset: str  # the model preset of this size
    max_hidden_size: int  # encoders up to this hidden size take these settings
    lr: float
    patience: int
    dropout: float


# Used where optim.lr / early_stopping.patience are left unset (null); a value the user sets always wins.
# Small encoders need a far larger lr: at base's 2e-5 the tiny model's class probabilities stay at
# 0.51/0.49 after 10 epochs, while 1e-3 reaches 0.90 on the two-source demo task. They also sit on a plateau
# for several epochs before the metric moves (the tagging demo's F1 is 0 for its first 5 epochs at 1e-3),
# so patience 3 would end them there: tiny waits out its 10 epochs.
# Dropout: RoBERTa's 0.1 (Liu et al., 2019) from small up. A tiny encoder (hidden 128) does better without: on the
# local suite (roberta-pl-eval, 3 seeds, a 10-minute model pretrained with dropout 0) dropout 0 gave tagging F1 0.749
# against 0.590 at 0.1, topics accuracy 0.687 against 0.680 and sources 0.892 against 0.894.
SIZE_DEFAULTS = (
    SizeDefaults("tiny", 256, lr=1e-3, patience=10, dropout=0.0),
    SizeDefaults("small", 512, lr=1e-4, patience=5, dropout=0.1),  # the top of Turc et al. (2019)'s grid for small BERTs
    SizeDefaults("base", 768, lr=2e-5, patience=3, dropout=0.1),  # RoBERTa's GLUE grid {1e-5, 2e-5, 3e-5} (Liu et al., 2019)
    SizeDefaults("large", sys.maxsize, lr=1e-5, patience=3, dropout=0.1),
)


def size_defaults(hidden_size: int) -> SizeDefaults:
    """The :data:`SIZE_DEFAULTS` row of an encoder with this hidden size."""
    return next(d for d in SIZE_DEFAULTS if hidden_size <= d.max_hidden_size)


def fill_size_defaults(cfg, hidden_size: int) -> str | None:
    """Set ``optim.lr`` and ``early_stopping.patience`` where they are unset (None) to the defaults for an
    encoder of ``hidden_size``, in place. Returns a line saying what was chosen, or None when the user set both."""
    if cfg.optim.lr is not None and not cfg.optim.lr > 0:
        raise ConfigError(f"optim.lr={cfg.optim.lr}: the peak learning rate must be positive (or null: by model size)")
    if cfg.early_stopping.patience is not None and cfg.early_stopping.patience < 0:
        raise ConfigError(f"early_stopping.patience={cfg.early_stopping.patience}: 0 disables early stopping, "
                          f"a positive number of validations enables it")
    chosen, row = [], size_defaults(hidden_size)
    if cfg.optim.lr is None:
        cfg.optim.lr = row.lr
        chosen.append(f"optim.lr={row.lr:g}")
    if cfg.early_stopping.patience is None:
        cfg.early_stopping.patience = row.patience
        chosen.append(f"early_stopping.patience={row.patience}")
    if not chosen:
        return None
    return f"{', '.join(chosen)}: the defaults for a {row.preset}-size encoder (hidden size {hidden_size}); set them to override"


def regularisation(cfg, model_cfg: dict) -> tuple[dict, str]:
    """The encoder's fields with fine-tuning's dropout (``dropout``, ``attention_dropout``; unset: by the encoder's
    size, never the pretrained model's own), and a line saying what the run uses and where it came from."""
    row = size_defaults(model_cfg["hidden_size"])
    dropout = cfg.dropout if cfg.dropout is not None else row.dropout
    chosen = {"dropout": dropout, "attention_dropout": cfg.attention_dropout if cfg.attention_dropout is not None else dropout}
    for key, value in chosen.items():
        if not 0 <= value < 1:
            raise ConfigError(f"{key}={value}: a dropout probability is in [0, 1)")
    default = f"the {row.preset}-size default"
    origin = {"dropout": default if cfg.dropout is None else "as set",  # attention_dropout unset follows dropout
              "attention_dropout": default if cfg.dropout is None and cfg.attention_dropout is None else "as set"}
    values = (f"dropout {chosen['dropout']:g}, attention_dropout {chosen['attention_dropout']:g} ({origin['dropout']}"
              if origin["dropout"] == origin["attention_dropout"] else
              f"dropout {chosen['dropout']:g} ({origin['dropout']}), attention_dropout {chosen['attention_dropout']:g} "
              f"({origin['attention_dropout']}")
    line = (f"regularisation: {values}; the pretrained model had {model_cfg['dropout']:g} / {model_cfg['attention_dropout']:g}), "
            f"optim.weight_decay {cfg.optim.weight_decay:g}; set dropout=, attention_dropout=, optim.weight_decay= "
            f"to change")
    return model_cfg | chosen, line


def register_configs() -> None:
    ConfigStore.instance().store(name="finetune_schema", node=FinetuneConfig)
