"""The wall-clock budget: fix ``max_steps`` from the step rate measured in the LR warm-up, re-plan it later."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch

from roberta_pl.batch_plan import StepHorizon, budget_max_steps, robust_seconds
from roberta_pl.callbacks.steps import StepBoundary
from roberta_pl.lightning_compat import micro_batches_started
from roberta_pl.optim import refresh_lrs

# Re-plans at these fractions of the currently planned steps: the error a change of load can leave shrinks with the
# steps left after the last one (a 3x slowdown after the last re-plan overruns by 2 x 6.25% = 12.5% at most).
REPLAN_AT = (0.25, 0.5, 0.75, 0.875, 0.9375)


class BudgetPlanner(StepBoundary):
    """Trains for a wall-clock budget (``trainer.max_time``): fixes ``max_steps`` early in the run from the step rate
    measured in the LR warm-up, then re-plans it at a few later steps from the rate measured since.

    **First decision.** Over the LR warm-up it times the training steps of this process (validation excluded), then,
    at ``fix_step`` (or once 5% of the budget went into measuring, if sooner), fixes ``max_steps`` so that the rest
    of the budget holds the remaining steps, the validations due until then and one more for the end (the last
    step always validates). Under a mask-rate schedule the steps after the warm-up are counted cheaper, by the
    FLOPs the falling rate saves in the MLM head (:func:`falling_mask_cost`). The figure is set on the run's
    :class:`~roberta_pl.batch_plan.StepHorizon`, which the LR schedule, the mask-rate schedule, the validation
    schedule and the loop read.

    **Re-plans.** At the steps :data:`REPLAN_AT` of the figure then planned, it plans again: the
    budget left by the clock, at the rate of the steps since the last decision (:func:`robust_seconds`: the median
    of 5 windows, so a transient slowdown does not decide the run; a lasting one does). The LR decay continues from
    the LR the last step trained with to the new last step (:meth:`StepHorizon.progress`), the next step included:
    the LR the scheduler had already set for it is rewritten (:func:`~roberta_pl.optim.refresh_lrs`), so a late
    cut to a few steps still decays them to near the end LR. The mask-rate schedule keeps the first figure (its
    batches are masked ahead of the trainer).

    **Resume.** Every decision is saved in the checkpoint (``state_dict``: step, figure, measured rate, time left),
    with the step of the next re-plan, and replayed when a run resumes, so the steps already trained were shaped by
    the same horizon as in the uninterrupted run (the optimizer's LRs, rewritten or not, are in the checkpoint too);
    the decisions still to come are made with the resumed job's clock, from the budget time the run had spent by
    its checkpoint. A job that resumes just before a re-plan step, at it or past it (its first steps are not timed)
    re-plans as soon as it has timed 3 steps. A run stopped before the first figure was fixed measures afresh; a
    checkpoint from before re-planning keeps its one figure (the time it had spent was not saved).

    The clock starts when the planner is built (with the Trainer: after data preparation, before the model is
    built and any checkpoint is loaded); the export after fit is not inside the budget.

    Args:
        seconds: the budget.
        horizon: the run's step horizon; its ``max_steps`` (``trainer.max_steps``) is the cap the budget never
            exceeds, and its batch plan prices the steps (a batch ramp's steps grow).
        warmup_steps: ``optim.warmup_steps``; the first figure is fixed within it, so the LR and mask rates of the
            warm-up never depend on it (the scheduler computes step ``s + 1``'s LR at the end of step ``s``,
            and a step's batches are masked ahead of it); a re-plan inside it changes no warm-up LR.
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
        self.decisions: list[dict[str, Any]] = []  # every figure fixed, in order (in the checkpoint)
        self.spent = 0.0  # budget seconds spent by earlier jobs of this run, by their last checkpoint
        self.use_clock(time.monotonic)
        self._times: list[float] = []  # seconds per micro-batch of each step since the last decision
        self._last: tuple[float, int, float] | None = None  # (time, micro-batch, validation s) at the last step
        self._window_start = 0.0  # when this job's timed steps began
        self._job_start: int | None = None  # the step this job began training at
        self._next_replan: int | None = None  # the step of the next re-plan (None: no more; in the checkpoint)
        self._next_saved = False  # _next_replan came from the checkpoint
        self._replans = True  # False for a checkpoint from before re-planning: its spent time is not known
        self._val_seconds = 0.0
        self._val_batches = 0
        self._val_start: float | None = None

    def use_clock(self, clock: Callable[[], float]) -> None:
        """Time with ``clock`` (this rank's; tests skew it or drive it by the step), from now."""
        self.clock = clock
        self._clock = clock()

    @property
    def max_steps(self) -> int | None:
        """The figure last fixed (None before the first decision)."""
        return self.decisions[-1]["max_steps"] if self.decisions else None

    @property
    def measured(self) -> dict[str, Any]:
        """The last decision: its rate, the time left, the step it was made at."""
        return dict(self.decisions[-1]) if self.decisions else {}

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
        self._job_start = trainer.global_step
        if self.decisions:  # resumed after the figure was fixed: replay every decision that shaped the steps so far
            self.horizon.set(self.decisions[0]["max_steps"])
            for decision in self.decisions[1:]:
                self.horizon.replan(decision["from_step"], decision["max_steps"])
            if self._next_replan is None and self._replans and not self._next_saved:  # a checkpoint without it
                self._next_replan = self._replan_step(self.decisions[-1]["at_step"])

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if not self.at_boundary:
            return
        step, now, micro = trainer.global_step, self.clock(), micro_batches_started(trainer)
        timed = True
        if self._last is not None:
            t, m, val = self._last
            self._times.append(max(now - t - (self._val_seconds - val), 0.0) / max(1, micro - m))
        elif step - (self._job_start or 0) < self.measure_from:
            timed = False  # the first steps of a job pay for allocation and compilation: not timed
        else:
            self._window_start = now
        if timed:
            self._last = (now, micro, self._val_seconds)
        if not self.decisions:
            if not self._times:
                return
            # At fix_step, or earlier once 5% of the budget went into measuring (a short budget on a slow machine).
            # Each rank has its own clock, and the broadcast in _decide is a collective: were one rank to decide a
            # step before the others, its broadcast would meet their gradient all-reduce (a hang, or garbage
            # exchanged). So before fix_step, a step number every rank shares, the ranks agree (one boolean
            # all-reduce a step, only in the measuring window): when any rank's clock says so, all fix at this step.
            if step < self.fix_step:
                early = now - self._window_start >= 0.05 * self.seconds
                if trainer.world_size > 1:
                    early = trainer.strategy.reduce_boolean_decision(early, all=False)
                if not early:
                    return
            self._decide(trainer, pl_module, step, first=True)
        # A step number every rank shares (the figure is broadcast, the same). Reached or passed: a job resumed just
        # before the point, at it or after it has too few steps timed to plan from, and plans once it has 3 (every
        # rank times the same steps).
        elif self._next_replan is not None and step >= self._next_replan and len(self._times) >= 3:
            self._decide(trainer, pl_module, step, first=False)

    def _replan_step(self, step: int) -> int | None:
        """The next re-plan after a decision at ``step``: the first :data:`REPLAN_AT` point of the figure a few steps
        past ``step`` (the rate needs some steps), before the last step. One inside the warm-up changes no LR yet."""
        if not self._replans:
            return None
        earliest = step + 2 * self.measure_from + 3
        return next((s for s in (math.ceil(f * self.max_steps) for f in REPLAN_AT) if earliest <= s < self.max_steps),
                    None)

    def _decide(self, trainer: pl.Trainer, pl_module: pl.LightningModule, step: int, first: bool) -> None:
        per_micro = robust_seconds(self._times)
        # A validation batch is a forward pass only: about a third of a training micro-batch, until one is timed.
        per_val = self._val_seconds / self._val_batches if self._val_batches else per_micro / 3
        batches = sum(trainer.num_val_batches) if trainer.val_dataloaders is not None else 0
        per_validation = per_val * (batches if math.isfinite(batches) else 0)
        left = self.seconds - self.elapsed()
        # The first figure is measured inside the warm-up, at the mask schedule's start rate; a re-plan measures the
        # current rate, close to what the steps left will cost.
        ratio = falling_mask_cost(trainer, pl_module) if first else None
        cheaper = None if ratio is None else (self.warmup_steps, ratio)
        max_steps = budget_max_steps(self.horizon.plan, step, left - per_validation, per_micro, self.cap, cheaper)
        for _ in range(2):  # the validations due before the last step take their share of the budget
            validations = max_steps // self.val_every_n_steps - step // self.val_every_n_steps
            max_steps = budget_max_steps(self.horizon.plan, step, left - (validations + 1) * per_validation, per_micro,
                                         self.cap, cheaper)
        if trainer.world_size > 1:  # every rank must stop at the same step: rank 0's measurement decides
            max_steps = int(trainer.strategy.broadcast(max_steps, src=0))
        before = self.max_steps
        step0 = step - len(self._times)
        # A re-plan continues the decay from the LR the last step trained with (LR-schedule step `step - 1`), so the
        # steps still to train (from `step`) all take their share of it, and rewrites the LR the scheduler already
        # set for step `step` with the old figure: a late cut to a few steps still decays them towards the end LR.
        self.decisions.append({"at_step": step, "from_step": step + 1 if first else step - 1, "max_steps": max_steps,
                               "seconds_per_micro_batch": per_micro, "seconds_per_validation": per_validation,
                               "measured_from_step": step0, "seconds_left": left,
                               "cost_after_warmup": 1.0 if ratio is None else ratio})
        if first:
            self.horizon.set(max_steps)
        else:
            self.horizon.replan(step - 1, max_steps)
            for config in trainer.lr_scheduler_configs:
                if isinstance(config.scheduler, torch.optim.lr_scheduler.LambdaLR):
                    refresh_lrs(config.scheduler)
        self._times.clear()
        self._next_replan = self._replan_step(step)
        if not trainer.is_global_zero:
            return
        if first:
            falling = "" if ratio is None or abs(ratio - 1) < 5e-3 else \
                f" ({ratio:.2f}x that after the warm-up, at the mask schedule's mean rate)"
            print(f"Time budget {_clock(self.seconds)}: {per_micro * 1e3:.1f} ms a micro-batch over steps {step0}-{step}"
                  f"{falling}, {_clock(left)} left -> trainer.max_steps fixed at {max_steps:,} (the LR decays to it; "
                  f"re-planned at {', '.join(f'{f:.0%}' for f in REPLAN_AT)} of it; a resume replays it)", flush=True)
        else:
            print(f"Time budget {_clock(self.seconds)}: re-planned at step {step:,}: {per_micro * 1e3:.1f} ms a "
                  f"micro-batch over steps {step0}-{step}, {_clock(left)} left -> trainer.max_steps "
                  f"{before:,} -> {max_steps:,}", flush=True)

    def state_dict(self) -> dict[str, Any]:
        return {"max_steps": self.max_steps, "seconds": self.seconds, "spent": self.elapsed(),
                "measured": self.measured, "decisions": [dict(d) for d in self.decisions],
                "next_replan": self._next_replan, "replans": self._replans}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.spent = float(state_dict.get("spent", 0.0))
        self.decisions = [dict(d) for d in state_dict.get("decisions") or []]
        self._replans = bool(state_dict.get("replans", True))
        self._next_saved = "next_replan" in state_dict
        self._next_replan = state_dict.get("next_replan")
        saved = state_dict.get("max_steps")
        if not self.decisions and saved is not None:
            # A checkpoint from before re-planning: its one figure, kept to the end. Its `spent` stopped counting
            # when the figure was fixed, so the time left is not known: no re-plan (it would plan for nearly the
            # whole budget again).
            measured = dict(state_dict.get("measured") or {})
            at = int(measured.get("fixed_at_step", 0))
            self.decisions = [{**measured, "at_step": at, "from_step": at + 1, "max_steps": int(saved)}]
            self._replans, self._next_replan, self._next_saved = False, None, True


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

