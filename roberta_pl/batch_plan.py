"""The batch plan: how each optimizer step's global batch is made (micro-batches, ranks, accumulation, a
batch-size ramp's phases), and the run's step horizon (the last step, which a time budget may fix).

One source of truth per number: the user sets the *global* batch (sequences per optimizer step); the
micro-batch, world size and accumulation are derived here and checked loudly.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import NamedTuple


class BatchPlanError(ValueError):
    """A global batch that cannot be split evenly over micro-batches and ranks."""


class Phase(NamedTuple):
    """One phase of a batch plan: from optimizer step ``start_step`` (which is micro-batch ``start_micro_batch``
    on each rank) on, each step takes ``accumulation`` micro-batches per rank. A plain tuple to the data side,
    which receives the phases through ``MLMDataModule.connect``."""

    start_step: int
    start_micro_batch: int
    accumulation: int

    def micro_batches_before(self, step: int) -> int:
        """Micro-batches per rank that steps ``0 .. step - 1`` consume, for a ``step`` in or after this phase."""
        return self.start_micro_batch + (step - self.start_step) * self.accumulation

    def step_of(self, micro_batch: int) -> int:
        """The optimizer step that micro-batch ``micro_batch`` (per rank, from 0) belongs to, in this phase."""
        return self.start_step + (micro_batch - self.start_micro_batch) // self.accumulation


@dataclass(frozen=True)
class BatchPlan:
    """How one optimizer step's global batch is produced.

    ``global_batch_size = micro_batch_size * accumulation * world_size`` exactly. Computed once per run (by
    :func:`plan_schedule`, in the run's preflight) and passed to everything that needs a batch figure.

    Attributes:
        phases: ``(start_step, start_micro_batch, accumulation)`` per phase of a batch-size ramp (see
            :func:`plan_ramp`); one phase, ``(0, 0, accumulation)``, without a ramp.
    """

    global_batch_size: int
    micro_batch_size: int
    world_size: int
    accumulation: int
    seq_len: int
    phases: tuple[Phase, ...] = field(default=())

    def __post_init__(self) -> None:
        phases = self.phases or ((0, 0, self.accumulation),)
        object.__setattr__(self, "phases", tuple(Phase(*map(int, p)) for p in phases))

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len

    def phase_at_step(self, step: int) -> Phase:
        """The phase optimizer step ``step`` is in."""
        return [p for p in self.phases if p.start_step <= step][-1]

    def phase_at_micro_batch(self, micro_batch: int) -> Phase:
        """The phase micro-batch ``micro_batch`` (per rank, from 0) is in."""
        return [p for p in self.phases if p.start_micro_batch <= micro_batch][-1]

    def micro_batches_before(self, step: int) -> int:
        """Micro-batches per rank that optimizer steps ``0 .. step - 1`` consume (a ramp's smaller steps included)."""
        return self.phase_at_step(step).micro_batches_before(step)


def plan_batch(global_batch_size: int, micro_batch_size: int, world_size: int, seq_len: int) -> BatchPlan:
    """Derive gradient accumulation from the global batch.

    Example: RoBERTa-base's 8192 sequences on 8 nodes x 8 GPUs with micro-batch 32:
    8192 / (32 * 64) = 4 accumulation steps, 8192 * 512 = 4.19M tokens per step.

    Raises:
        BatchPlanError: when the global batch is not a multiple of micro-batch x world size.
    """
    for name, v in (("global_batch_size", global_batch_size), ("micro_batch_size", micro_batch_size),
                    ("world_size", world_size), ("seq_len", seq_len)):
        if v < 1:
            raise BatchPlanError(f"batch.{name}={v} must be >= 1")
    per_pass = micro_batch_size * world_size
    if global_batch_size % per_pass:
        raise BatchPlanError(
            f"batch.global_batch_size={global_batch_size} is not divisible by micro_batch_size={micro_batch_size} "
            f"x world_size={world_size} = {per_pass}; choose a global batch that is a multiple of {per_pass}"
        )
    return BatchPlan(global_batch_size, micro_batch_size, world_size, global_batch_size // per_pass, seq_len)


def plan_schedule(global_batch_size: int, micro_batch_size: int, world_size: int, seq_len: int,
                  ramp: Sequence[Sequence[int]] = ()) -> BatchPlan:
    """The run's batch plan: :func:`plan_batch` for the final global batch, with the ramp's phases
    (:func:`plan_ramp`) attached. Raises :class:`BatchPlanError` like both."""
    final = plan_batch(global_batch_size, micro_batch_size, world_size, seq_len)
    return replace(final, phases=tuple(plan_ramp([(int(u), int(g)) for u, g in ramp], final)))


def fit_ramp(ramp: Sequence[tuple[int, int]], final: BatchPlan) -> list[tuple[int, int]]:
    """The ramp on this many ranks: a ramp's batch size that does not split into whole micro-batches on every rank
    (a preset's 16 sequences on 2 ranks of 16) is rounded up to the next size that does, with a notice; an entry
    that reaches the final global batch is dropped (its steps train at the full batch). The final global batch
    is the user's and is never rounded: :func:`plan_batch` refuses it."""
    per_pass = final.micro_batch_size * final.world_size
    fitted = []
    for until, size in ramp:
        if size >= 1 and size % per_pass:
            rounded = min(math.ceil(size / per_pass) * per_pass, final.global_batch_size)
            logging.getLogger("roberta_pl").info(
                "batch.ramp: global_batch_size=%d until step %d does not split into micro-batches of %d on %s; "
                "it trains at %d instead", size, until, final.micro_batch_size,
                f"{final.world_size} ranks" if final.world_size > 1 else "1 rank", rounded)
            size = rounded
        if size < final.global_batch_size or size < 1:
            fitted.append((until, size))
    return fitted


def plan_ramp(ramp: Sequence[tuple[int, int]], final: BatchPlan) -> list[Phase]:
    """Validate a batch-size ramp and turn it into accumulation switches.

    Args:
        ramp: ``(until_step, global_batch_size)`` pairs in increasing step order; after the last one the
            plan's ``final.global_batch_size`` applies (GPT-3-style warm-up of the batch size).
        final: the plan for the full global batch.
    Returns:
        ``(start_step, start_micro_batch, accumulation)`` per phase, the first starting at 0. ``start_micro_batch``
        counts micro-batches per rank, which is what the trainer's accumulation counter sees.
    Raises:
        BatchPlanError: on a non-increasing ramp, a non-positive batch size, or a switch that
            does not fall on a whole step of the new size (the trainer counts micro-batches modulo the
            accumulation, so a phase must start after a multiple of its accumulation).
    """
    phases: list[Phase] = []
    step = micro = 0
    prev_until = 0
    for until, size in [*fit_ramp(ramp, final), (None, final.global_batch_size)]:
        plan = plan_batch(size, final.micro_batch_size, final.world_size, final.seq_len)
        if until is not None and until <= prev_until:
            raise BatchPlanError(f"batch.ramp steps must increase; got {until} after {prev_until}")
        if micro % plan.accumulation:
            raise BatchPlanError(
                f"batch.ramp: the switch to global_batch_size={size} at step {step} comes after {micro} micro-batches "
                f"per rank, not a multiple of its accumulation {plan.accumulation}; move the switch to another step"
            )
        phases.append(Phase(step, micro, plan.accumulation))
        if until is not None:
            micro += (until - step) * plan.accumulation
            step = prev_until = until
    return phases


# -- time budgets ------------------------------------------------------------------------------------
_UNIT_SECONDS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0}


def parse_duration(value: str | int | float, field: str = "trainer.max_time") -> float:
    """Seconds in a wall-clock budget.

    Args:
        value: ``"DD:HH:MM:SS"`` (Lightning's ``max_time`` form, e.g. ``"00:00:10:00"``), ``"HH:MM:SS"``,
            unit sums such as ``"2h"``, ``"10m"``, ``"1h30m"``, ``"90s"``, or a number of seconds.
        field: the config field named in the error.
    Returns:
        The budget in seconds (> 0).
    Raises:
        ValueError: one line naming the field and the value.
    """
    import re

    text = str(value).strip().lower()
    seconds: float | None = None
    if re.fullmatch(r"\d+(\.\d+)?", text):
        seconds = float(text)
    elif re.fullmatch(r"\d+(:\d+){2,3}", text):
        parts = [int(p) for p in text.split(":")]
        seconds = float(sum(p * s for p, s in zip(reversed(parts), (1, 60, 3600, 86400))))
    elif re.fullmatch(r"(\d+(\.\d+)?[dhms])+", text):
        seconds = sum(float(n) * _UNIT_SECONDS[u] for n, u in re.findall(r"(\d+(?:\.\d+)?)([dhms])", text))
    if seconds is None or seconds <= 0:
        raise ValueError(f"{field}={value!r}: give a positive duration such as \"00:00:10:00\" (DD:HH:MM:SS), "
                         f"\"2h\", \"10m\", \"1h30m\" or a number of seconds")
    return seconds


def budget_max_steps(plan: BatchPlan, step: int, seconds_left: float,
                     seconds_per_micro_batch: float, cap: int, cheaper_from: tuple[int, float] | None = None) -> int:
    """The step count a time budget buys: the last optimizer step whose micro-batches, from ``step`` on,
    fit in ``seconds_left`` at the measured rate (a batch ramp's longer steps included). At least
    ``step + 1`` (the run ends on a step of its own), at most ``cap``; ``cap`` itself when decided at the cap.

    Args:
        plan: the run's batch plan (a ramp's phases make later steps dearer).
        step: optimizer steps already taken.
        seconds_left: training time left (validation and the run's end already subtracted).
        seconds_per_micro_batch: the measured time of one micro-batch, forward + backward + its share of the step.
        cap: ``trainer.max_steps``, which a budget never exceeds.
        cheaper_from: ``(from_step, ratio)``: the micro-batches of steps ``from_step`` on cost ``ratio`` times the
            measured ones on average (a mask rate falling from there to the end shrinks the MLM head's work).
    Returns:
        The ``max_steps`` to fix.
    """
    if step >= cap:  # decided at the cap: the run ends there (cap + 1 would pass trainer.max_steps)
        return cap
    before = plan.micro_batches_before(step)
    split, ratio = (plan.micro_batches_before(max(step, cheaper_from[0])) - before, cheaper_from[1]) \
        if cheaper_from is not None else (math.inf, 1.0)

    affordable = max(0.0, seconds_left) / max(seconds_per_micro_batch, 1e-9)  # in measured micro-batches

    def cost(last: int) -> float:  # steps step .. last - 1, in measured micro-batches
        micro = plan.micro_batches_before(last) - before
        return min(micro, split) + max(0, micro - split) * ratio

    lo, hi = step + 1, max(cap, step + 1)
    while lo < hi:  # the largest s in [step + 1, cap] whose steps fit in the time left
        mid = (lo + hi + 1) // 2
        if cost(mid) <= affordable:
            lo = mid
        else:
            hi = mid - 1
    return lo


def robust_seconds(samples: Sequence[float], windows: int = 5) -> float:
    """A step time robust to transient load: ``samples`` (seconds per micro-batch of consecutive steps) cut into
    ``windows`` consecutive windows, the median of their means. A slowdown that hits fewer than half the windows
    (another job starting on the same cores for 30 s) does not move it; periodic costs inside every window
    (a checkpoint, a log write) count at their share."""
    if not samples:
        raise ValueError("no step times to plan from")
    n = min(windows, len(samples))
    bounds = [round(i * len(samples) / n) for i in range(n + 1)]
    return statistics.median(statistics.fmean(samples[a:b]) for a, b in zip(bounds, bounds[1:]))


class StepHorizon:
    """The run's last optimizer step, owned in one place.

    ``trainer.max_steps`` sets it; under a time budget (``trainer.max_time``) it is only a cap until the
    :class:`~roberta_pl.callbacks.BudgetPlanner` fixes the figure early in the run (:meth:`set`) and re-plans it
    at a few later steps (:meth:`replan`). The LR schedule and the validation schedule read it; what cannot read it
    (Lightning's own step limit, the mask-rate schedule shared with the DataLoader workers, the module's recorded
    ``max_steps``) follows it: each follower is called with the figure once it is fixed, and again whenever it is
    set; one registered with ``replans=True`` also at every re-plan. The mask-rate schedule is computed ahead of the
    trainer (batches are masked in advance), so it follows only the first figure, fixed inside the warm-up: a
    batch's masks never depend on how far the data loading had run when a re-plan came.

    ``history`` holds ``(from_step, max_steps)``: the first figure from step 0, then each re-plan from the
    LR-schedule step whose progress it continues from (the budget's: the step the last trained step's LR was
    computed for; it shapes the steps after it). :meth:`progress` reads it.
    """

    def __init__(self, max_steps: int, plan: BatchPlan | None = None, fixed: bool = True) -> None:
        self.max_steps = int(max_steps)
        self.plan = plan
        self.fixed = fixed
        self.history: list[tuple[int, int]] = [(0, self.max_steps)]
        self._followers: list[tuple[Callable[[int], None], bool]] = []

    def follow(self, follower: Callable[[int], None], replans: bool = False) -> None:
        """Call ``follower(max_steps)`` now if the figure is fixed, and whenever it is set (``replans``: and
        whenever it is re-planned)."""
        self._followers.append((follower, replans))
        if self.fixed:
            follower(self.max_steps)

    def set(self, max_steps: int) -> None:
        """Fix the figure (a time budget's first decision, or its value saved in the checkpoint on resume)."""
        self.max_steps, self.fixed = int(max_steps), True
        self.history = [(0, self.max_steps)]
        for follower, _ in self._followers:
            follower(self.max_steps)

    def replan(self, from_step: int, max_steps: int) -> None:
        """Move the fixed figure to ``max_steps`` for the LR-schedule steps after ``from_step`` (a time budget's
        re-plan, or its replay on resume); the decay continues from where it is at ``from_step`` (:meth:`progress`)."""
        if not self.fixed:
            raise ValueError("re-planning a horizon that was never fixed")
        if int(max_steps) == self.max_steps:  # the same figure: the decay as it was, not re-based (float rounding)
            return
        self.max_steps = int(max_steps)
        self.history.append((int(from_step), self.max_steps))
        for follower, replans in self._followers:
            if replans:
                follower(self.max_steps)

    def progress(self, step: int, warmup_steps: int) -> float:
        """How far the LR decay is at LR-schedule step ``step``: 0 at the end of the warm-up, 1 at the last step.

        Without a re-plan, ``(step - warmup) / (max_steps - warmup)``. A re-plan from step ``r`` keeps the progress
        ``p`` reached at ``r`` and spreads the rest over the steps now left, ``p + (1 - p) (step - r) /
        (max_steps - r)``: every decay shape (linear, cosine, wsd ...) continues from the LR it had, without a jump,
        and ends at the new last step. A figure re-planned inside the warm-up counts from the warm-up's end."""
        start, done, total = warmup_steps, 0.0, self.history[0][1]
        for from_step, max_steps in self.history[1:]:
            if from_step > step:
                break
            if from_step > start:
                done = min(1.0, done + (1.0 - done) * (from_step - start) / max(1, total - start))
                start = from_step
            total = max_steps
        return min(1.0, done + (1.0 - done) * max(0, step - start) / max(1, total - start))

    def micro_batches_before(self, step: int) -> int:
        """Micro-batches per rank before optimizer step ``step``, under the run's batch plan."""
        if self.plan is None:
            raise ValueError("this horizon has no batch plan")
        return self.plan.micro_batches_before(step)
