"""Step-boundary bookkeeping and the step schedules of pretraining: the batch-size ramp, the validation
schedule, an early stop at a step, and resuming on another data plan."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl

from roberta_pl.batch_plan import BatchPlan, StepHorizon
from roberta_pl.lightning_compat import (
    is_logging_step,
    micro_batches_started,
    set_resumed_batch_progress,
    set_val_check_batch,
)


class StepBoundary(pl.Callback):
    """Knows whether the last training batch completed an optimizer step (``at_boundary``).

    With gradient accumulation, only the last micro-batch of a window steps the optimizer. A checkpoint taken
    anywhere else records data as consumed whose gradient it does not hold, and a resume from it silently
    drops that gradient; a figure logged anywhere else is logged once per micro-batch. A fresh or restored run
    is at a boundary."""

    def __init__(self) -> None:
        self.at_boundary = True
        self._step_before = -1

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step_before = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.at_boundary = trainer.global_step != self._step_before

    def logs_now(self, trainer: pl.Trainer) -> bool:
        """In ``on_train_batch_end``: this batch completed an optimizer step whose metrics go to the loggers."""
        return self.at_boundary and is_logging_step(trainer)


class BatchRamp(pl.Callback):
    """Grows the global batch during training by switching gradient accumulation at optimizer-step boundaries.

    Args:
        plan: the run's batch plan. Its phase starts are aligned to whole optimizer steps by construction
            (:func:`roberta_pl.batch_plan.plan_ramp`), so every step sums exactly ``accumulation`` micro-batches.
    """

    def __init__(self, plan: BatchPlan) -> None:
        self.plan = plan

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        micro = micro_batches_started(trainer) - 1
        trainer.accumulate_grad_batches = self.plan.phase_at_micro_batch(micro).accumulation


class ValidationSchedule(pl.Callback):
    """Validates after every ``every_n_steps``-th optimizer step, also while a batch ramp changes the
    accumulation.

    Lightning counts validation intervals in micro-batches (``val_check_interval``). Under a ramp a fixed
    interval drifts off the optimizer steps (a ramp from 4 to 8 sequences validated at steps 4, 6, 8 instead
    of 2, 4, 6, 8). Before each micro-batch this sets the trainer's interval so that the check is true after
    exactly the last micro-batch of a step due for validation.

    Args:
        every_n_steps: validate after optimizer steps ``every_n_steps``, ``2 * every_n_steps``, ...
        horizon: the run's step horizon (and its batch plan): also validate after its last step, which a time
            budget may fix during the run.
    """

    def __init__(self, every_n_steps: int, horizon: StepHorizon, validate_last: bool = False) -> None:
        self.every_n_steps = every_n_steps
        self.horizon = horizon
        self.validate_last = validate_last  # also validate after the horizon's step (a time budget's last one)

    def step_completed_by(self, micro: int) -> int | None:
        """The optimizer step that micro-batch ``micro`` (0-based) completes, None if it is not a step's last."""
        phase = self.horizon.plan.phase_at_micro_batch(micro)
        step = phase.step_of(micro + 1)
        return step if phase.micro_batches_before(step) == micro + 1 else None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        micro = micro_batches_started(trainer) - 1
        step = self.step_completed_by(micro)
        last = self.validate_last and step == self.horizon.max_steps
        due = step is not None and (step % self.every_n_steps == 0 or last)
        # Lightning validates after micro-batch m when (m + 1) % val_check_batch == 0.
        set_val_check_batch(trainer, micro + 1 if due else micro + 2)


class StopAtStep(pl.Callback):
    """Ends ``fit`` after optimizer step ``step`` (checkpointed as usual) while the LR schedule still runs to
    ``max_steps``: split a long run into jobs that each fit a cluster time limit, then ``resume=auto``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True


class WorldSizeResume(pl.Callback):
    """Resume a checkpoint written under another data plan (another number of ranks, DataLoader workers or
    micro-batch size) with Lightning's micro-batch counters on this run's plan.

    The DataModule re-plans first (``MLMDataModule.replan``, from its ``load_state_dict``, which Lightning calls before
    this hook): its data position becomes this plan's. Lightning would restore its counters as saved, and its
    accumulation counts micro-batches within the epoch: a 2-rank checkpoint after 3 steps of accumulation 2 (6
    micro-batches) resumed on 1 rank with accumulation 4 would step after 2 micro-batches. Here the run has trained
    ``global_step x accumulation`` micro-batches of this plan, and is at the DataModule's place in its epoch. The step
    count, the LR schedule and the optimizer state are the checkpoint's, untouched.
    """

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        datamodule = trainer.datamodule
        if not getattr(datamodule, "replanned", False):
            return
        per_epoch = datamodule.batches_per_epoch_per_rank
        in_epoch = datamodule.consumed - int(checkpoint["epoch"]) * per_epoch
        if not 0 <= in_epoch <= per_epoch:
            raise RuntimeError(f"the re-planned data position {datamodule.consumed} is not in the checkpoint's epoch "
                               f"{checkpoint['epoch']} ({per_epoch} batches per epoch)")
        set_resumed_batch_progress(checkpoint, int(checkpoint["global_step"]) * trainer.accumulate_grad_batches,
                                   in_epoch, {"consumed": datamodule.consumed})


