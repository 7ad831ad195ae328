"""The wall-clock budget: fix ``max_steps`` from the step rate measured in the LR warm-up."""

from __future__ import annotations

import math
import time
from typing import Any

import lightning.pytorch as pl

from roberta_pl.batch_plan import StepHorizon, budget_max_steps
from roberta_pl.callbacks.steps import StepBoundary
from roberta_pl.lightning_compat import micro_batches_started


class BudgetPlanner(StepBoundary):
    """Trains for a wall-clock budget (``trainer.max_time``) by fixing ``max_steps`` once, early in the run.

    Over the LR warm-up it times the training micro-batches of this process (validation excluded), then, at
    ``fix_step`` (or once 5% of the budget went into measuring, if sooner), fixes ``max_steps`` so that the rest
    of the budget holds the remaining steps, the validations due until then and one more for the end (the last
    step always validates). Under a mask-rate schedule the steps after the warm-up are counted cheaper, by the
    FLOPs the falling rate saves in the MLM head (:func:`falling_mask_cost`). From then on the run is a
    step-count run: the figure is set on the run's :class:`~roberta_pl.batch_plan.StepHorizon`, which the LR
    schedule, the mask-rate schedule, the validation schedule and the loop read, and it is saved in the checkpoint
    (``state_dict``). A resume
    reuses it and does not measure again: it trains to the same step whatever time is left, exactly as the
    uninterrupted run. A run stopped before the figure was fixed measures afresh, with the budget it had
    not yet spent.

    The clock starts when the planner is built (with the Trainer: after data preparation, before the model is
    built and any checkpoint is loaded); the export after fit is not inside the budget.

    Args:
        seconds: the budget.
        horizon: the run's step horizon; its ``max_steps`` (``trainer.max_steps``) is the cap the budget never
            exceeds, and its batch plan prices the steps (a batch ramp's steps grow).
        warmup_steps: ``optim.warmup_steps``; the figure is fixed within it, so the LR and mask rates of the
            warm-up never depend on it (the scheduler computes step ``s + 1``'s LR at the end of step ``s``,
            and a step's batches are masked ahead of it).
        val_every_n_steps: the validation interval, whose validations the budget must also hold.
    """

    def __init__(self, seconds: float, horizon: StepHorizon, warmup_steps: int, val_every_n_steps: int) -> None:
        super().__init__()
        if warmup_steps < 4:
            raise ValueError(f"optim.warmup_steps={warmup_steps}: a time budget (trainer.max_time) measures the step "
                             f"rate inside the warm-up, which needs at least 4 steps")
        self.seconds = seconds
        self.horizon = horizon
        self.cap = horizon.max_steps
        self.val_every_n_steps = val_every_n_steps
        self.warmup_steps = warmup_steps
        # Fixed at step `fix_step`, at most warmup - 2: the batch prefetched at that point is still in the warm-up.
        self.fix_step = min(warmup_steps // 2, 100)
        self.measure_from = min(max(1, self.fix_step // 4), 5)  # the first steps pay for allocation, compilation
        self.max_steps: int | None = None  # the fixed figure (in the checkpoint)
        self.spent = 0.0  # budget seconds spent by earlier jobs of this run before the figure was fixed
        self.measured: dict[str, float] = {}
        self.clock = time.monotonic  # this rank's clock (tests skew it)
        self._clock = self.clock()
        self._mark: tuple[float, int, float, int] | None = None  # (time, micro-batch, validation s, step)
        self._val_seconds = 0.0
        self._val_batches = 0
        self._val_start: float | None = None

    def elapsed(self) -> float:
        """Budget seconds spent so far, earlier jobs of this run included."""
        return self.spent + self.clock() - self._clock

    # validation time is measured apart: it is not part of a training step's rate
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._val_start = self.clock()

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self._val_batches += 1

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._val_start is not None:
            self._val_seconds += self.clock() - self._val_start
            self._val_start = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.max_steps is not None:  # resumed after the figure was fixed: the same run from here on
            self.horizon.set(self.max_steps)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.max_steps is not None or not self.at_boundary:
            return
        step, now = trainer.global_step, self.clock()
        if self._mark is None:
            if step >= self.measure_from:
                self._mark = (now, micro_batches_started(trainer), self._val_seconds, step)
            return
        t0, micro0, val0, step0 = self._mark
        # At fix_step, or earlier once 5% of the budget went into measuring (a short budget on a slow machine). Each
        # rank has its own clock, and the broadcast below is a collective: were one rank to decide a step before the
        # others, its broadcast would meet their gradient all-reduce (a hang, or garbage exchanged). So before
        # fix_step, a step number every rank shares, the ranks agree (one boolean all-reduce a step, only in the
        # measuring window): when any rank's clock says so, all fix at this step.
        if step < self.fix_step:
            early = step > step0 and now - t0 >= 0.05 * self.seconds
            if trainer.world_size > 1:
                early = trainer.strategy.reduce_boolean_decision(early, all=False)
            if not early:
                return
        micro = micro_batches_started(trainer)
        per_micro = max(now - t0 - (self._val_seconds - val0), 1e-9) / max(1, micro - micro0)
        # A validation batch is a forward pass only: about a third of a training micro-batch, until one is timed.
        per_val = self._val_seconds / self._val_batches if self._val_batches else per_micro / 3
        batches = sum(trainer.num_val_batches) if trainer.val_dataloaders is not None else 0
        per_validation = per_val * (batches if math.isfinite(batches) else 0)
        left = self.seconds - self.elapsed()
        ratio = falling_mask_cost(trainer, pl_module)
        cheaper = None if ratio is None else (self.warmup_steps, ratio)
        max_steps = budget_max_steps(self.horizon.plan, step, left - per_validation, per_micro, self.cap, cheaper)
        for _ in range(2):  # the validations due before the last step take their share of the budget
            validations = max_steps // self.val_every_n_steps - step // self.val_every_n_steps
            max_steps = budget_max_steps(self.horizon.plan, step, left - (validations + 1) * per_validation, per_micro,
                                         self.cap, cheaper)
        if trainer.world_size > 1:  # every rank must stop at the same step: rank 0's measurement decides
            max_steps = int(trainer.strategy.broadcast(max_steps, src=0))
        self.max_steps = max_steps
        self.measured = {"seconds_per_micro_batch": per_micro, "seconds_per_validation": per_validation,
                         "measured_from_step": step0, "fixed_at_step": step, "seconds_left": left,
                         "cost_after_warmup": 1.0 if ratio is None else ratio}
        self.horizon.set(max_steps)
        if trainer.is_global_zero:
            falling = "" if ratio is None or abs(ratio - 1) < 5e-3 else \
                f" ({ratio:.2f}x that after the warm-up, at the mask schedule's mean rate)"
            print(f"Time budget {_clock(self.seconds)}: {per_micro * 1e3:.1f} ms a micro-batch over steps {step0}-{step}"
                  f"{falling}, {_clock(left)} left -> trainer.max_steps fixed at {max_steps:,} (the LR decays to it; "
                  f"a resume trains to it)", flush=True)

    def state_dict(self) -> dict[str, Any]:
        spent = self.elapsed() if self.max_steps is None else self.spent
        return {"max_steps": self.max_steps, "seconds": self.seconds, "spent": spent, "measured": dict(self.measured)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("max_steps")
        self.max_steps = None if saved is None else int(saved)
        self.spent = float(state_dict.get("spent", 0.0))
        self.measured = dict(state_dict.get("measured") or {})


def falling_mask_cost(trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
    """What a micro-batch costs after the warm-up, on average, against one of the warm-up, under a mask-rate
    schedule (None without one, or without the module's FLOPs figures).

    The rate falls linearly from ``start`` (held through the warm-up, where the planner measures) to ``end`` at the
    last step, so the mean rate after the warm-up is their midpoint whatever the step count; the micro-batch's
    work is the encoder's over every position plus the MLM head's over the masked ones. For ``tiny`` at 30% ->
    15%: 0.90 (the quickstart's micro-batches measured 0.86 of the warm-up's, so the budget still ends a little
    early); for ``base`` the head's share is smaller and so is the correction.
    """
    schedule = getattr(trainer.datamodule, "mask_schedule", None)
    per_position = getattr(pl_module, "flops_per_position", 0.0)
    per_prediction = getattr(pl_module, "flops_per_prediction", 0.0)
    if schedule is None or per_position <= 0:
        return None
    mean = (schedule.start + schedule.end) / 2
    return (per_position + mean * per_prediction) / (per_position + schedule.start * per_prediction)


def fixed_max_steps(checkpoint: dict) -> int | None:
    """The ``max_steps`` a time-budgeted run fixed, from its checkpoint (None: not a budget run, or not fixed yet)."""
    state = (checkpoint.get("callbacks") or {}).get(BudgetPlanner.__qualname__) or {}
    return None if state.get("max_steps") is None else int(state["max_steps"])


def _clock(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else \
        f"{seconds // 60}m{seconds % 60:02d}s"


# -- faults ------------------------------------------------------------------------------------------
