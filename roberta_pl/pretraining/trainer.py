"""The pretraining ``pl.Trainer``: step checkpoints, the batch and validation schedules, the budget."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
from omegaconf import DictConfig

from roberta_pl.callbacks import (
    BatchRamp,
    BudgetPlanner,
    DataSkipMonitor,
    LossCurve,
    RequeueOnSignal,
    StepCheckpoint,
    StepProgressBar,
    StopAtStep,
    ThroughputLogger,
    ValidationSchedule,
    WorldSizeResume,
)
from roberta_pl.optim import BatchPlan, parse_duration
from roberta_pl.trainer import (
    ReturnFreedMemory,
    build_strategy,
    build_trainer,
    keep_freed_memory,
)


def pretraining_trainer(cfg: DictConfig, out_dir: Path, plan: BatchPlan, resolved_config: dict,
                        tune_allocator: bool = False) -> pl.Trainer:
    """The pretraining Trainer: step-boundary checkpoints, SIGUSR1 requeue, loss curve, throughput, the batch
    ramp and validation on optimizer-step boundaries (``plan.phases``). ``tune_allocator``: this process exists to
    train, so glibc may keep the memory a step freed (:func:`keep_freed_memory`)."""
    t = cfg.trainer
    checkpoints = StepCheckpoint(
        dirpath=out_dir / "checkpoints", filename="step-{step:07d}", auto_insert_metric_name=False,
        every_n_train_steps=cfg.checkpoint.every_n_steps, save_last=True, save_top_k=cfg.checkpoint.keep,
        monitor="step", mode="max",
    )
    callbacks = [checkpoints, RequeueOnSignal(out_dir / "checkpoints" / "last.ckpt"), LossCurve(out_dir),
                 ThroughputLogger(), DataSkipMonitor(), WorldSizeResume()]
    later: list[pl.Callback] = []
    if t.enable_progress_bar:
        later.append(StepProgressBar())
    if t.stop_at_step is not None:
        later.append(StopAtStep(t.stop_at_step))
    if len(plan.phases) > 1:
        later.append(BatchRamp(list(plan.phases)))
    later.append(ValidationSchedule(t.val_every_n_steps, list(plan.phases)))
    if t.max_time is not None:  # a wall-clock budget: max_steps fixed from the rate measured in the warm-up
        later.append(BudgetPlanner(parse_duration(t.max_time), list(plan.phases), cfg.optim.warmup_steps, t.max_steps,
                                   t.val_every_n_steps))
    trainer = build_trainer(
        cfg, out_dir, resolved_config, callbacks, later, strategy=build_strategy(cfg, plan),
        max_steps=t.max_steps, accumulate_grad_batches=plan.phases[0][2],
        # Validation every N optimizer steps; Lightning counts micro-batches here, and ValidationSchedule
        # keeps it on step boundaries when a ramp changes the accumulation.
        val_check_interval=t.val_every_n_steps * plan.accumulation, check_val_every_n_epoch=None,
    )
    if tune_allocator and keep_freed_memory(trainer):
        trainer.callbacks.append(ReturnFreedMemory())
    return trainer

