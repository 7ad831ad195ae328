"""Checks a fine-tuning run passes before any work."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from roberta_pl.checks import check_writable, world_size
from roberta_pl.errors import ConfigError
from roberta_pl.optim import (
    BatchPlan,
    BatchPlanError,
    plan_batch,
)


def preflight_finetune(cfg: DictConfig, out_dir: Path) -> BatchPlan:
    """Refuse a fine-tuning config that cannot run, before any work. Returns the run's batch plan."""
    task = cfg.task
    if cfg.pretrained is None:
        raise ConfigError("pretrained=PATH is required: a roberta-pl .ckpt, a DeepSpeed checkpoint dir or a HF RoBERTa dir")
    if not Path(cfg.pretrained).exists():
        raise ConfigError(f"pretrained={cfg.pretrained}: no such file or directory")
    if cfg.init not in ("pretrained", "random"):
        raise ConfigError(f"init={cfg.init}: choose pretrained or random")
    if task.kind not in ("sequence_classification", "token_classification"):
        raise ConfigError(f"task.kind={task.kind}: choose sequence_classification or token_classification")
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

