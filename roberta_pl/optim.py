"""Optimizer parameter groups, learning-rate schedules and the batch plan.

One source of truth per number: the user sets the *global* batch (sequences per optimizer step); the
micro-batch, world size and accumulation are derived here and checked loudly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

import torch
from torch import nn


class BatchPlanError(ValueError):
    """A global batch that cannot be split evenly over micro-batches and ranks."""


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
    phases: tuple[tuple[int, int, int], ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.phases:
            object.__setattr__(self, "phases", ((0, 0, self.accumulation),))

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_len


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


def plan_ramp(
    ramp: Sequence[tuple[int, int]], final: BatchPlan
) -> list[tuple[int, int, int]]:
    """Validate a batch-size ramp and turn it into accumulation switches.

    Args:
        ramp: ``(until_step, global_batch_size)`` pairs in increasing step order; after the last one the
            plan's ``final.global_batch_size`` applies (GPT-3-style warm-up of the batch size).
        final: the plan for the full global batch.
    Returns:
        ``(start_step, start_micro_batch, accumulation)`` per phase, the first starting at 0. ``start_micro_batch``
        counts micro-batches per rank, which is what the trainer's accumulation counter sees.
    Raises:
        BatchPlanError: on a non-increasing ramp, a batch size that does not split evenly, or a switch that
            does not fall on a whole step of the new size (the trainer counts micro-batches modulo the
            accumulation, so a phase must start after a multiple of its accumulation).
    """
    phases: list[tuple[int, int, int]] = []
    step = micro = 0
    prev_until = 0
    for until, size in [*ramp, (None, final.global_batch_size)]:
        plan = plan_batch(size, final.micro_batch_size, final.world_size, final.seq_len)
        if until is not None and until <= prev_until:
            raise BatchPlanError(f"batch.ramp steps must increase; got {until} after {prev_until}")
        if micro % plan.accumulation:
            raise BatchPlanError(
                f"batch.ramp: the switch to global_batch_size={size} at step {step} comes after {micro} micro-batches "
                f"per rank, not a multiple of its accumulation {plan.accumulation}; move the switch to another step"
            )
        phases.append((step, micro, plan.accumulation))
        if until is not None:
            micro += (until - step) * plan.accumulation
            step = prev_until = until
    return phases


def _no_decay(module: nn.Module, name: str, p: nn.Parameter) -> bool:
    return name == "bias" or isinstance(module, nn.LayerNorm) or p.ndim < 2


def _unique_params(model: nn.Module):
    """``(qualified name, module, local name, parameter)``, each trainable parameter once (tied weights twice seen)."""
    seen: set[int] = set()
    for prefix, module in model.named_modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            yield f"{prefix}.{name}" if prefix else name, module, name, p


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay matrices and embeddings; no decay on biases and LayerNorm (BERT/RoBERTa practice)."""
    decay, no_decay = [], []
    for _, module, name, p in _unique_params(model):
        (no_decay if _no_decay(module, name, p) else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def layer_decay_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float,
                       num_layers: int) -> list[dict]:
    """AdamW groups with layer-wise LR decay (ELECTRA, BEiT): the head trains at ``lr``, encoder layer ``i``
    (0-based) at ``lr * layer_decay ** (num_layers - i)``, the embeddings at ``lr * layer_decay ** (num_layers + 1)``.
    ``layer_decay=1`` gives every parameter ``lr``. Biases and LayerNorms get no weight decay, as in
    :func:`param_groups`. Parameters are named as in our models (``roberta.embeddings.*``,
    ``roberta.encoder.layer.{i}.*``, anything else is head)."""
    groups: dict[tuple[int, bool], dict] = {}
    for qualified, module, name, p in _unique_params(model):
        if qualified.startswith("roberta.embeddings."):
            depth = 0
        elif qualified.startswith("roberta.encoder.layer."):
            depth = int(qualified.split(".")[3]) + 1
        else:
            depth = num_layers + 1
        key = (depth, _no_decay(module, name, p))
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if key[1] else weight_decay,
                           "lr": lr * layer_decay ** (num_layers + 1 - depth)}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def lr_lambda(step: int, *, warmup_steps: int, total_steps: int, decay: str = "linear",
              power: float = 1.0, end_ratio: float = 0.0) -> float:
    """Multiplier of the peak LR at ``step``: linear warm-up, then linear or polynomial decay to ``end_ratio``.

    RoBERTa (fairseq ``polynomial_decay`` with power 1) warms up linearly for ``warmup_steps`` then decays
    linearly to 0 at ``total_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay == "constant":
        return 1.0
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    if decay == "linear":
        remaining = 1.0 - progress
    elif decay == "polynomial":
        remaining = (1.0 - progress) ** power
    elif decay == "cosine":
        remaining = 0.5 * (1.0 + math.cos(math.pi * progress))
    else:
        raise ValueError(f"optim.decay={decay!r}; choose linear, polynomial, cosine or constant")
    return end_ratio + (1.0 - end_ratio) * remaining


def build_adamw(model: nn.Module, lr: float, betas: Sequence[float], eps: float, weight_decay: float,
                fused: bool | None = None, cpu_adam: bool = False, groups: list[dict] | None = None
                ) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`; torch's fused kernel whenever every parameter is a float tensor on CUDA or
    on the CPU (one kernel for all tensors; on CPU 0.9 ms a step for the tiny model against 6.3 ms for the
    per-tensor loop). ``cpu_adam``: DeepSpeed's CPU AdamW kernel instead, which ZeRO-Offload requires (the same
    update). ``groups``: parameter groups to use instead of :func:`param_groups` (e.g. :func:`layer_decay_groups`)."""
    groups = param_groups(model, weight_decay) if groups is None else groups
    if cpu_adam:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, adamw_mode=True)
    if fused is None:
        fused = all(p.device.type in ("cuda", "cpu") and p.is_floating_point() for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps, fused=fused or None)


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


def micro_batches_before(phases: Sequence[tuple[int, int, int]], step: int) -> int:
    """Micro-batches per rank that optimizer steps ``0 .. step - 1`` consume, under the batch plan's phases
    (``(start_step, start_micro_batch, accumulation)``, see :func:`plan_ramp`)."""
    start_step, start_micro, acc = [p for p in phases if p[0] <= step][-1]
    return start_micro + (step - start_step) * acc


def budget_max_steps(phases: Sequence[tuple[int, int, int]], step: int, seconds_left: float,
                     seconds_per_micro_batch: float, cap: int, cheaper_from: tuple[int, float] | None = None) -> int:
    """The step count a time budget buys: the last optimizer step whose micro-batches, from ``step`` on,
    fit in ``seconds_left`` at the measured rate (a batch ramp's longer steps included). At least
    ``step + 1``; at most ``cap``.

    Args:
        phases: the batch plan's phases.
        step: optimizer steps already taken.
        seconds_left: training time left (validation and the run's end already subtracted).
        seconds_per_micro_batch: the measured time of one micro-batch, forward + backward + its share of the step.
        cap: ``trainer.max_steps``, which a budget never exceeds.
        cheaper_from: ``(from_step, ratio)``: the micro-batches of steps ``from_step`` on cost ``ratio`` times the
            measured ones on average (a mask rate falling from there to the end shrinks the MLM head's work).
    Returns:
        The ``max_steps`` to fix.
    """
    before = micro_batches_before(phases, step)
    split, ratio = (micro_batches_before(phases, max(step, cheaper_from[0])) - before, cheaper_from[1]) \
        if cheaper_from is not None else (math.inf, 1.0)

    affordable = max(0.0, seconds_left) / max(seconds_per_micro_batch, 1e-9)  # in measured micro-batches

    def cost(last: int) -> float:  # steps step .. last - 1, in measured micro-batches
        micro = micro_batches_before(phases, last) - before
        return min(micro, split) + max(0, micro - split) * ratio

    lo, hi = step + 1, max(cap, step + 1)
    while lo < hi:  # the largest s in [step + 1, cap] whose steps fit in the time left
        mid = (lo + hi + 1) // 2
        if cost(mid) <= affordable:
            lo = mid
        else:
            hi = mid - 1
    return lo
