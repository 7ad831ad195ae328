"""The fault guards every run has: a non-finite loss, an fp16 loss-scale collapse, skipped data."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn

from roberta_pl.errors import TrainingFault
from roberta_pl.lightning_compat import (
    is_logging_step,
    last_saved_step,
)

_PRECISION_DTYPE = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16,
                    "16-true": torch.float16}

from roberta_pl.callbacks.steps import StepBoundary


def _scaler(trainer: pl.Trainer):
    """The fp16 GradScaler of a 16-mixed run, None otherwise (bf16 and fp32 need none; DeepSpeed has its own)."""
    return getattr(trainer.precision_plugin, "scaler", None)


def _deepspeed_engine(trainer: pl.Trainer):
    """The DeepSpeed engine of a DeepSpeed run, None otherwise."""
    return getattr(trainer.strategy, "deepspeed_engine", None)


def _loss_scale(trainer: pl.Trainer) -> float | None:
    """The fp16 loss scale now: Lightning's GradScaler under 16-mixed (a sync), DeepSpeed's own loss scaler under
    DeepSpeed fp16 (a Python float); None without fp16 loss scaling. Both skip a step whose gradients overflow."""
    scaler = _scaler(trainer)
    if scaler is not None:
        return scaler.get_scale() if scaler.is_enabled() else None
    engine = _deepspeed_engine(trainer)
    return float(engine.loss_scale()) if engine is not None and engine.fp16_enabled() else None


def _scales_loss(trainer: pl.Trainer) -> bool:
    """fp16 loss scaling is on, by Lightning's GradScaler or by DeepSpeed: overflow steps are the scaler's to skip."""
    if _scaler(trainer) is not None:
        return True
    engine = _deepspeed_engine(trainer)
    return engine is not None and engine.fp16_enabled()


class NonFiniteLossGuard(pl.Callback):
    """Acts on a NaN/inf training loss before it reaches the parameters.

    The loss of each micro-batch is folded into one on-device flag (no sync), read once per optimizer
    step, before the update. ``stop`` raises :class:`TrainingFault` naming the step: the parameters were
    not touched, and the last checkpoint is kept. ``skip`` drops the step's gradients, so the optimizer
    leaves parameters and moments as they were, counts the skip (``train/skipped_steps``) and trains on;
    the step's batches count as consumed, so data order stays exact. Under fp16 loss scaling (16-mixed, or
    DeepSpeed's fp16), overflow steps are the loss scaler's to skip (see :class:`LossScaleMonitor`), so the guard
    stands aside.

    Under DeepSpeed, Lightning calls the optimizer step (DeepSpeed's engine decides whether it is a real one) and
    with it ``on_before_optimizer_step`` after every micro-batch: the guard acts only at the engine's
    accumulation boundary, so it reads and reduces its flag once per optimizer step there too. DeepSpeed's engine
    has no way to drop an accumulated step outside fp16, so ``skip`` is refused with DeepSpeed at other precisions
    (``roberta_pl.pretraining.checks.preflight``); ``stop`` raises before the engine steps.

    Args:
        policy: ``"stop"`` or ``"skip"``.
    """

    def __init__(self, policy: str = "stop") -> None:
        if policy not in ("stop", "skip"):
            raise ValueError(f"trainer.nonfinite_loss={policy}: choose stop or skip")
        self.policy = policy
        self.skipped = 0
        self._bad: torch.Tensor | None = None

    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor) -> None:
        if not _scales_loss(trainer):
            bad = ~torch.isfinite(loss.detach())
            self._bad = bad if self._bad is None else self._bad | bad

    def on_before_optimizer_step(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer) -> None:
        engine = _deepspeed_engine(trainer)
        if engine is not None and not engine.is_gradient_accumulation_boundary():
            return  # DeepSpeed: a micro-batch inside the window; the flag is read at the window's last one
        if _scales_loss(trainer):  # the loss scaler skips overflow steps on every rank alike
            self._bad = None
            return
        bad, self._bad = self._bad, None
        step = trainer.global_step + 1  # the step being taken; checkpoints are named by completed steps
        bad = bad is not None and bool(bad)  # the one sync per optimizer step
        if trainer.world_size > 1:
            # Gradients are all-reduced, so one rank's NaN is every rank's: all ranks must skip (or stop)
            # together, or the others would step on NaN gradients (or wait for a rank that has left).
            bad = trainer.strategy.reduce_boolean_decision(bad, all=False)
        if bad:
            saved = last_saved_step(trainer)
            if self.policy == "stop":
                raise TrainingFault(
                    f"non-finite training loss (NaN/inf) at step {step}; stopped before updating the parameters "
                    f"(last checkpoint: step {saved or 0}); set trainer.nonfinite_loss=skip to skip such steps")
            optimizer.zero_grad(set_to_none=True)  # no gradients: AdamW leaves parameters and moments alone
            self.skipped += 1
            rank_zero_warn(f"skipped step {step}: non-finite training loss (trainer.nonfinite_loss=skip); "
                           f"{self.skipped} skipped so far")
        if is_logging_step(trainer) or self.skipped:
            pl_module.log("train/skipped_steps", float(self.skipped))

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


class LossScaleMonitor(pl.Callback):
    """Reports the fp16 loss scale and stops when it collapses.

    The GradScaler halves the scale on every step whose gradients overflow and skips that step. A rare
    overflow is normal; a scale driven below ``min_scale`` means step after step overflowed: the loss is
    diverging and training has silently stopped learning. Logs ``train/loss_scale`` on logging steps,
    and raises :class:`TrainingFault` naming the step and scale. Reads Lightning's GradScaler (16-mixed) or
    DeepSpeed's loss scaler (DeepSpeed fp16, which skips overflow steps the same way); inert without either.

    Args:
        min_scale: the floor (fairseq's ``--min-loss-scale``, 1e-4 by default).
    """

    def __init__(self, min_scale: float = 1e-4) -> None:
        self.min_scale = min_scale
        self.overflows = 0  # consecutive optimizer steps the scaler skipped
        self._previous: float | None = None
        self._seen_step = -1

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        scale = _loss_scale(trainer)
        if scale is not None:
            self._previous, self._seen_step = scale, trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self._seen_step or not _scales_loss(trainer):
            return  # no fp16, or still accumulating: the scale changes only when a step is taken
        self._seen_step = trainer.global_step
        scale = _loss_scale(trainer)  # GradScaler: a sync, as the scaler makes one per step to decide skips
        previous, self._previous = self._previous, scale
        if previous is not None and scale < previous:
            self.overflows += 1
            rank_zero_warn(f"step {trainer.global_step}: fp16 gradients overflowed, step skipped; "
                           f"loss scale {previous:g} -> {scale:g}")
        else:
            self.overflows = 0
        if is_logging_step(trainer):
            pl_module.log("train/loss_scale", float(scale))
        if scale < self.min_scale:
            raise TrainingFault(
                f"fp16 loss scale collapsed to {scale:g} at step {trainer.global_step} (below trainer.min_loss_scale="
                f"{self.min_scale:g}; {self.overflows} consecutive overflow steps skipped): the loss is diverging; "
                f"lower optim.lr, lengthen warm-up, or use trainer.precision=bf16-mixed")


class DataSkipMonitor(StepBoundary):
    """Logs ``data/skipped_shards``: bad shard reads that ``data.on_error=skip`` stepped over (each is also
    a warning in the log naming the shard). Counts come from the DataModule, DataLoader workers included,
    summed over ranks."""

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        counts = getattr(trainer.datamodule, "skipped_shards", None)
        if counts is not None and self.logs_now(trainer):
            # Summed over ranks (each rank streams its own shards); every rank logs on the same steps.
            pl_module.log_dict({f"data/skipped_shards_{split}": float(n) for split, n in counts().items()},
                               sync_dist=True, reduce_fx="sum")


