"""Checks a fine-tuning run passes before any work."""

from __future__ import annotations

import math
from pathlib import Path

from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig

from roberta_pl.batch_plan import BatchPlan, BatchPlanError, plan_batch
from roberta_pl.checks import check_precision, check_writable, world_size
from roberta_pl.errors import ConfigError


def preflight_finetune(cfg: DictConfig, out_dir: Path) -> BatchPlan:
    """Refuse a fine-tuning config that cannot run, before any work. Returns the run's batch plan."""
    task = cfg.task
    check_precision(cfg)
    if cfg.pretrained is None:
        raise ConfigError("pretrained=PATH is required: a roberta-pl .ckpt, a DeepSpeed checkpoint dir or a HF RoBERTa dir")
    if not Path(cfg.pretrained).exists():
        raise ConfigError(f"pretrained={cfg.pretrained}: no such file or directory")
    for field in ("train_file", "valid_file"):
        if task.get(field) is None:
            raise ConfigError(f"task.{field} is required (or task.data_dir=DIR for a preset)")
    for field in ("train_file", "valid_file", "test_file"):
        if task.get(field) is not None and not Path(task[field]).is_file():
            raise ConfigError(f"task.{field}={task[field]}: no such file")
    from roberta_pl.finetune.module import available_metrics

    metrics = available_metrics(task.kind, task.regression)
    if task.metric not in metrics:
        raise ConfigError(f"task.metric={task.metric}: choose one of {', '.join(metrics)} for this task")
    if task.max_seq_len < 8:
        raise ConfigError(f"task.max_seq_len={task.max_seq_len} is too short")
    if cfg.trainer.strategy == "deepspeed":
        raise ConfigError("trainer.strategy=deepspeed is for pretraining; fine-tune with trainer=gpu or trainer=ddp")
    if cfg.trainer.max_steps <= 0 and cfg.trainer.max_epochs <= 0:
        raise ConfigError("set trainer.max_epochs or trainer.max_steps to a positive number")
    world = world_size(cfg)
    micro = cfg.micro_batch_size or max(1, cfg.batch_size // world)
    try:
        plan = plan_batch(cfg.batch_size, micro, world, task.max_seq_len)
    except BatchPlanError:
        raise ConfigError(f"batch_size={cfg.batch_size} does not split into micro-batches of {micro} on {world} "
                          f"rank(s); make batch_size a multiple of micro_batch_size x ranks") from None
    if (out_dir / "checkpoints" / "best.ckpt").exists() and not cfg.overwrite:
        raise ConfigError(f"run_dir={out_dir} already holds a fine-tuned model (checkpoints/best.ckpt); "
                          f"choose another run_name or pass overwrite=true")
    check_writable(out_dir)
    return plan



def steps_per_epoch(n_train: int, plan) -> int:
    per_rank = math.ceil(n_train / plan.world_size)
    return max(1, math.ceil(math.ceil(per_rank / plan.micro_batch_size) / plan.accumulation))


def prepare_task(r) -> None:
    """Load the pretrained encoder, its tokenizer and the task's data into ``r.parts`` (``r`` is the harness's Run),
    fill the size-dependent defaults, and fix the run's step count."""
    from data_pipelines.errors import DataError
    from data_pipelines.task_data import load_task_data, load_text_tokenizer
    from roberta_pl.batch_plan import BatchPlanError
    from roberta_pl.checkpoints import load_encoder
    from roberta_pl.finetune.config import fill_size_defaults

    cfg, p = r.cfg, r.parts
    try:
        # The tokenizer it records only if its hash is the recorded one; tokenizer=DIR is the user's choice.
        p.encoder, tok_dir = load_encoder(cfg.pretrained, cfg.tokenizer, flag="tokenizer=DIR")
        chosen = fill_size_defaults(cfg, p.encoder.config.hidden_size)  # before `resolved`: loggers see the real lr
        if chosen and rank_zero_only.rank == 0:
            print(chosen)
        if tok_dir is None:
            raise ConfigError(f"pretrained={cfg.pretrained} records no tokenizer; pass tokenizer=DIR")
        p.tokenizer = load_text_tokenizer(tok_dir)
        # An HF tokenizer has its vocab_size; SentencePieceWords wraps ours as .tok (an HFTokenizer's .tok is the raw
        # tokenizers.Tokenizer, which has none).
        tokens = getattr(p.tokenizer, "vocab_size", None) or p.tokenizer.tok.vocab_size
        vocab = p.encoder.config.vocab_size
        if tokens > vocab:  # its ids past the embedding table would fail mid-training
            raise ConfigError(f"pretrained={cfg.pretrained}: the model's vocab_size={vocab} is smaller than the "
                              f"tokenizer's {tokens} tokens ({tok_dir}); pass the model's own tokenizer=DIR")
        p.data = load_task_data(cfg.task, p.tokenizer, min(cfg.task.max_seq_len, p.encoder.config.max_seq_len))
    except (ConfigError, BatchPlanError, DataError):
        raise  # one line from the harness (they are ValueErrors too: not the model's fault below)
    except (FileNotFoundError, KeyError, ValueError) as e:  # an unreadable model or checkpoint
        raise SystemExit(f"roberta-pl-finetune: error: pretrained={cfg.pretrained}: {e}") from None
    total = steps_per_epoch(len(p.data.train), r.plan) * max(cfg.trainer.max_epochs, 1)
    if cfg.trainer.max_steps > 0:
        total = cfg.trainer.max_steps if cfg.trainer.max_epochs <= 0 else min(total, cfg.trainer.max_steps)
    if (cfg.trainer.val_every_n_steps or 0) > total:
        raise ConfigError(f"trainer.val_every_n_steps={cfg.trainer.val_every_n_steps} is more than the "
                          f"{total} steps this run takes: it would never validate or keep a best checkpoint")
    p.total_steps = total
