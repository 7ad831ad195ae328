"""The optimizer and its learning-rate schedule, for pretraining and fine-tuning alike: parameter groups (weight
decay, layer-wise LR decay), AdamW, and the LR schedules. A new LR schedule is one function in :data:`DECAYS`:
the config's ``optim.decay`` choices are generated from it (the batch plan lives in :mod:`roberta_pl.batch_plan`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from roberta_pl.choices import choices


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


_EMBEDDINGS = re.compile(r"(roberta|model)\.embeddings\.")
_LAYER = re.compile(r"(?:roberta\.encoder\.layer|model\.layers)\.(\d+)\.")


def layer_decay_groups(model: nn.Module, lr: float, weight_decay: float, layer_decay: float,
                       num_layers: int) -> list[dict]:
    """AdamW groups with layer-wise LR decay (ELECTRA, BEiT): the head trains at ``lr``, encoder layer ``i``
    (0-based) at ``lr * layer_decay ** (num_layers - i)``, the embeddings at ``lr * layer_decay ** (num_layers + 1)``.
    ``layer_decay=1`` gives every parameter ``lr``. Biases and LayerNorms get no weight decay, as in
    :func:`param_groups`. Parameters are named as in our models: ``roberta.embeddings.*`` and
    ``roberta.encoder.layer.{i}.*`` (RoBERTa), ``model.embeddings.*`` and ``model.layers.{i}.*`` (ModernBERT);
    anything else is head (ModernBERT's final norm included)."""
    groups: dict[tuple[int, bool], dict] = {}
    for qualified, module, name, p in _unique_params(model):
        layer = _LAYER.match(qualified)
        if _EMBEDDINGS.match(qualified):
            depth = 0
        elif layer:
            depth = int(layer.group(1)) + 1
        else:
            depth = num_layers + 1
        key = (depth, _no_decay(module, name, p))
        if key not in groups:
            groups[key] = {"params": [], "weight_decay": 0.0 if key[1] else weight_decay,
                           "lr": lr * layer_decay ** (num_layers + 1 - depth)}
        groups[key]["params"].append(p)
    return [groups[k] for k in sorted(groups)]


# After the warm-up, the fraction of the way from the peak LR down to ``end_lr_ratio`` x peak that is still left, as a
# function of progress through the steps after the warm-up (0 -> 1), ``optim.power`` and the share of those steps
# that decays (``optim.decay_fraction``, or ``optim.decay_steps`` of them; wsd only).
DECAYS: dict[str, Callable[[float, float, float], float]] = {
    "linear": lambda progress, power, fraction: 1.0 - progress,  # RoBERTa (fairseq polynomial_decay, power 1)
    "polynomial": lambda progress, power, fraction: (1.0 - progress) ** power,
    "cosine": lambda progress, power, fraction: 0.5 * (1.0 + math.cos(math.pi * progress)),
    "constant": lambda progress, power, fraction: 1.0,
    # Warmup-stable-decay (MiniCPM, Hu et al., 2024; ModernBERT): hold the peak, then decay linearly over the last
    # `fraction` of the steps. A stable-phase checkpoint can be decayed on its own later (docs: continue pretraining).
    "wsd": lambda progress, power, fraction: min(1.0, (1.0 - progress) / max(fraction, 1e-12)),
}
Decay = choices("Decay", DECAYS)  # the type of optim.decay in the schemas


def lr_lambda(step: int, *, warmup_steps: int, total_steps: int, decay: str = "linear", power: float = 1.0,
              end_ratio: float = 0.0, decay_fraction: float = 0.2, decay_steps: int | None = None,
              progress: float | None = None) -> float:
    """Multiplier of the peak LR at ``step``: linear warm-up over ``warmup_steps``, then ``decay`` (a :data:`DECAYS`
    name) to ``end_ratio`` at ``total_steps``.

    RoBERTa (fairseq ``polynomial_decay`` with power 1) warms up linearly for ``warmup_steps`` then decays
    linearly to 0 at ``total_steps``. ``wsd`` holds the peak and decays over the last ``decay_steps`` steps (or the
    last ``decay_fraction`` of the steps after the warm-up). ``progress``: how far the decay is (0 -> 1) when the
    horizon moved during the run (a time budget's re-plan, :meth:`~roberta_pl.batch_plan.StepHorizon.progress`);
    default: ``(step - warmup_steps) / (total_steps - warmup_steps)``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if decay not in DECAYS:
        raise ValueError(f"optim.decay={decay!r}; choose one of {', '.join(DECAYS)}")
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span) if progress is None else progress
    fraction = min(1.0, decay_steps / span) if decay_steps is not None else decay_fraction
    return end_ratio + (1.0 - end_ratio) * DECAYS[decay](progress, power, fraction)


def lr_scheduler(optimizer: torch.optim.Optimizer, optim: Mapping[str, Any], warmup_steps: int,
                 total_steps: Callable[[], int], progress: Callable[[int], float] | None = None) -> dict[str, Any]:
    """The LR schedule of a run, for ``configure_optimizers``: :func:`lr_lambda` with ``optim``'s ``decay``,
    ``power``, ``end_lr_ratio``, ``decay_fraction`` and ``decay_steps``, stepped every optimizer step.

    Args:
        optimizer: the optimizer whose groups' LRs it scales.
        optim: the resolved ``optim`` group.
        warmup_steps: optimizer steps of linear warm-up.
        total_steps: returns the step the decay ends at, read at every step (a time budget fixes it during the run).
        progress: the decay's progress at a step, when a time budget re-plans the horizon (default: from
            ``total_steps``).
    """
    settings = {"decay": str(optim.get("decay", "linear")), "power": optim.get("power", 1.0),
                "end_ratio": optim.get("end_lr_ratio", 0.0), "decay_fraction": optim.get("decay_fraction", 0.2),
                "decay_steps": optim.get("decay_steps")}
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_lambda(
        step, warmup_steps=warmup_steps, total_steps=total_steps(),
        progress=None if progress is None or step < warmup_steps else progress(step), **settings))
    return {"scheduler": schedule, "interval": "step"}


def refresh_lrs(scheduler: torch.optim.lr_scheduler.LambdaLR) -> None:
    """Recompute the LRs ``scheduler`` set at its last step (the next optimizer step's), from its lambdas as they read
    now: the horizon they read was re-planned after the scheduler stepped. What ``scheduler.step()`` would have set."""
    values = [base * f(scheduler.last_epoch) for base, f in zip(scheduler.base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, values):
        group["lr"] = lr
    scheduler._last_lr = values


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


