"""The pretraining ``pl.Trainer``: step checkpoints, the batch and validation schedules, the budget."""

from __future__ import annotations

import sys
from pathlib import Path

import lightning.pytorch as pl
from omegaconf import DictConfig

from roberta_pl.batch_plan import StepHorizon, parse_duration
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
from roberta_pl.callbacks.probes import LiveProbe
from roberta_pl.callbacks.progress import ProgressLog
from roberta_pl.lightning_compat import set_max_steps
from roberta_pl.trainer import (
    ReturnFreedMemory,
    build_strategy,
    build_trainer,
    keep_freed_memory,
)


def pretraining_trainer(cfg: DictConfig, out_dir: Path, horizon: StepHorizon, resolved_config: dict,
                        tune_allocator: bool = False) -> pl.Trainer:
    """The pretraining Trainer: step-boundary checkpoints, SIGUSR1 requeue, loss curve, throughput, the batch
    ramp and validation on optimizer-step boundaries (``horizon.plan``), a time budget that fixes the horizon, and the
    loop's step limit following it. ``tune_allocator``: this process exists to train, so glibc may keep the memory
    a step freed (:func:`keep_freed_memory`)."""
    t, plan = cfg.trainer, horizon.plan
    checkpoints = StepCheckpoint(
        dirpath=out_dir / "checkpoints", filename="step-{step:07d}", auto_insert_metric_name=False,
        every_n_train_steps=cfg.checkpoint.every_n_steps, save_last=True, save_top_k=cfg.checkpoint.keep,
        monitor="step", mode="max",
        # The run dir is the run's own: last.ckpt is always the newest (resume=auto reads it). Lightning's counter
        # would write last-v1.ckpt beside a last.ckpt it did not write itself, as in a run dir moved or copied.
        enable_version_counter=False,
    )
    callbacks = [checkpoints, LossCurve(out_dir), ThroughputLogger(), DataSkipMonitor(), WorldSizeResume()]
    later: list[pl.Callback] = []
    if t.enable_progress_bar:  # a bar on a terminal; progress lines in a pipe or a log file, where a bar is silent
        later.append(StepProgressBar() if sys.stdout.isatty() else ProgressLog(
            horizon=horizon, val_every_n_steps=t.val_every_n_steps, validate_last=t.max_time is not None))
    if t.stop_at_step is not None:
        later.append(StopAtStep(t.stop_at_step))
    if len(plan.phases) > 1:
        later.append(BatchRamp(plan))
    later.append(ValidationSchedule(t.val_every_n_steps, horizon, validate_last=t.max_time is not None))
    if t.max_time is not None:  # a wall-clock budget: max_steps fixed in the warm-up, re-planned later
        later.append(BudgetPlanner(parse_duration(t.max_time), horizon, cfg.optim.warmup_steps, t.val_every_n_steps))
    # The signal's checkpoint comes after every step's bookkeeping (the budget's decision at this step, the LR it
    # rewrites), as the step checkpoints, which Lightning runs after every other callback.
    later.append(RequeueOnSignal(out_dir / "checkpoints" / "last.ckpt"))
    if cfg.probe.every_n_steps:  # live downstream probes (after the signal's checkpoint, which a probe would delay)
        later.append(LiveProbe(cfg.probe))
    trainer = build_trainer(
        cfg, out_dir, resolved_config, callbacks, later, strategy=build_strategy(cfg, plan),
        max_steps=horizon.max_steps, accumulate_grad_batches=plan.phases[0].accumulation,
        # Validation every N optimizer steps; Lightning counts micro-batches here, and ValidationSchedule
        # keeps it on step boundaries when a ramp changes the accumulation.
        val_check_interval=t.val_every_n_steps * plan.accumulation, check_val_every_n_epoch=None,
    )
    horizon.follow(lambda steps: set_max_steps(trainer, steps), replans=True)
    if tune_allocator and keep_freed_memory(trainer):
        trainer.callbacks.append(ReturnFreedMemory())
    return trainer

