"""What a run measures as it trains: throughput and MFU, and the loss history (``loss_curve.png``)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.throughput import get_available_flops

from roberta_pl.model import IGNORE_INDEX

_PRECISION_DTYPE = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16,
                    "16-true": torch.float16}

from roberta_pl.callbacks.steps import StepBoundary

_PRECISION_DTYPE = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16,
                    "16-true": torch.float16}


class ThroughputLogger(StepBoundary):
    """Tokens/s and MFU over each logging window, once per logged optimizer step.

    Lightning's ThroughputMonitor synchronises the device after every batch; this one counts tokens on the
    device (no sync) and synchronises only when it logs. Tokens are real tokens (padding of doc-mode batches
    excluded), summed over every rank with one all-reduce: ``perf/tokens_per_sec`` is the run's,
    ``perf/tokens_per_sec_per_device`` that over the ranks, ``perf/tokens_trained`` the running total (saved
    in checkpoints; it counts up to the last logged step). MFU = model FLOPs per second per device / the device's
    peak for the training precision (None on CPU): the module's ``flops_per_position`` for every position computed
    (padding costs FLOPs too) plus its ``flops_per_prediction`` for every position the batch's labels predict (the
    sparse MLM head runs on those only), counted on the device like the tokens: the masking is the batch's, not a
    setting the module is told.
    """

    def __init__(self) -> None:
        super().__init__()
        self._real: torch.Tensor | int = 0  # real tokens since the last log (a device tensor in doc mode)
        self._positions = 0  # positions computed since the last log, padding included
        self._predicted: torch.Tensor | int = 0  # positions predicted (labels other than -100) since the last log
        self.tokens_trained = 0  # real tokens over all ranks up to the last logged step (kept across resumes)
        self._t0: float | None = None
        self._peak: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dtype = _PRECISION_DTYPE.get(str(trainer.precision), torch.float32)
        self._peak = get_available_flops(pl_module.device, dtype) if pl_module.device.type == "cuda" else None
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        ids, mask = batch["input_ids"], batch.get("attention_mask")
        self._positions += ids.numel()  # from the shape: free
        self._real = self._real + (mask.sum() if mask is not None else ids.numel())  # on the device: no sync
        labels = batch.get("labels")
        if isinstance(labels, torch.Tensor):
            self._predicted = self._predicted + (labels != IGNORE_INDEX).sum()
        if not self.logs_now(trainer):
            return
        counts = torch.stack([torch.as_tensor(self._real, device=ids.device).to(torch.float64),
                              torch.tensor(float(self._positions), dtype=torch.float64, device=ids.device),
                              torch.as_tensor(self._predicted, device=ids.device).to(torch.float64)])
        self._real, self._positions, self._predicted = 0, 0, 0
        if trainer.world_size > 1:
            counts = trainer.strategy.reduce(counts, reduce_op="sum")
        tokens, positions, predicted = (float(x) for x in counts.cpu())  # the sync, once per logged step
        now = time.perf_counter()
        elapsed, self._t0 = max(now - self._t0, 1e-9), now
        self.tokens_trained += int(tokens)
        metrics = {"perf/tokens_per_sec": tokens / elapsed,
                   "perf/tokens_per_sec_per_device": tokens / elapsed / trainer.world_size,
                   "perf/tokens_trained": float(self.tokens_trained)}
        flops = model_flops(pl_module, positions, predicted)
        if self._peak and flops:
            metrics["perf/mfu"] = flops / elapsed / trainer.world_size / self._peak
        pl_module.log_dict(metrics)

    def state_dict(self) -> dict[str, Any]:
        return {"tokens_trained": self.tokens_trained}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.tokens_trained = int(state_dict.get("tokens_trained", 0))


def model_flops(pl_module: pl.LightningModule, positions: float, predicted: float) -> float:
    """Training FLOPs of ``positions`` computed positions of which ``predicted`` were predicted, by the module's own
    figures (``flops_per_position``, ``flops_per_prediction``; 0 for a module that has none)."""
    return (positions * getattr(pl_module, "flops_per_position", 0.0)
            + predicted * getattr(pl_module, "flops_per_prediction", 0.0))


class LossCurve(StepBoundary):
    """Records train/val loss and accuracy at logging steps and draws ``loss_curve.png`` at the end.

    Its history is part of the checkpoint (``state_dict``), so a resumed run continues the same curve
    without duplicated training points. Lightning saves a step's checkpoint before that step's validation,
    so a run resumed from step k lacks the validation point at k.
    """

    def __init__(self, out_dir: str | os.PathLike) -> None:
        super().__init__()
        self.out_dir = Path(out_dir)
        self.history: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        if self.logs_now(trainer) and "train/loss" in trainer.callback_metrics:
            self.history.append({"step": trainer.global_step, "train_loss": float(trainer.callback_metrics["train/loss"])})

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        if "val/loss" in m:
            self.history.append({"step": trainer.global_step, "val_loss": float(m["val/loss"]),
                                 "val_accuracy": float(m.get("val/accuracy", float("nan")))})

    def record(self, step: int, metrics: dict[str, float]) -> None:
        """Add ``metrics`` computed after optimizer step ``step`` outside the logging hooks (live probes)."""
        self.history.append({"step": step, **{k: float(v) for k, v in metrics.items()}})

    def state_dict(self) -> dict[str, Any]:
        return {"history": list(self.history)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero and self.history:
            write_loss_curve(self.history, self.out_dir)


def write_loss_curve(history: list[dict[str, float]], out_dir: Path) -> Path:
    """Write ``metrics_history.json`` and ``loss_curve.png`` (train and validation loss by step)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "metrics_history.json").write_text(json.dumps(history, indent=1))
    train = [(h["step"], h["train_loss"]) for h in history if "train_loss" in h]
    val = [(h["step"], h["val_loss"]) for h in history if "val_loss" in h]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("masked-LM cross-entropy")
    ax.set_title("roberta-pl pretraining")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = out_dir / "loss_curve.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
