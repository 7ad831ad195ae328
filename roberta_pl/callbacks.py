"""Callbacks and checkpoint I/O for pretraining: throughput/MFU, the loss curve, atomic checkpoint writes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.throughput import get_available_flops
from lightning.pytorch.plugins.io import TorchCheckpointIO

_PRECISION_DTYPE = {"bf16-mixed": torch.bfloat16, "bf16-true": torch.bfloat16, "16-mixed": torch.float16,
                    "16-true": torch.float16}


def is_logging_step(trainer: pl.Trainer) -> bool:
    """Whether this batch's metrics go to the loggers (every ``log_every_n_steps`` optimizer steps).

    Work that needs a device sync (grad norm, timing, reading a loss) runs only then. The one place that
    reads Lightning's internal flag for it."""
    return bool(trainer._logger_connector.should_update_logs)


class ThroughputLogger(pl.Callback):
    """Tokens/s and MFU over each logging window.

    Lightning's ThroughputMonitor synchronises the device after every batch; this one counts tokens from
    tensor shapes (free) and synchronises only when it logs, so the training step stays sync-free.
    MFU = FLOPs per second per device / the device's peak for the training precision (None on CPU).
    """

    def __init__(self) -> None:
        self._tokens = 0
        self._t0: float | None = None
        self._peak: float | None = None

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        dtype = _PRECISION_DTYPE.get(str(trainer.precision), torch.float32)
        self._peak = get_available_flops(pl_module.device, dtype) if pl_module.device.type == "cuda" else None
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self._tokens += batch["input_ids"].numel()
        if not is_logging_step(trainer):
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize()
        now = time.perf_counter()
        elapsed, self._t0 = now - self._t0, now
        per_device = self._tokens / max(elapsed, 1e-9)
        self._tokens = 0
        metrics = {"perf/tokens_per_sec": per_device * trainer.world_size, "perf/tokens_per_sec_per_device": per_device}
        flops_per_token = getattr(pl_module, "flops_per_batch", 0) / max(1, batch["input_ids"].numel())
        if self._peak:
            metrics["perf/mfu"] = per_device * flops_per_token / self._peak
        pl_module.log_dict(metrics, rank_zero_only=True)


class LossCurve(pl.Callback):
    """Records train/val loss and accuracy at logging steps and draws ``loss_curve.png`` at the end.

    Its history is part of the checkpoint (``state_dict``), so a resumed run continues the same curve
    without duplicated training points. Lightning saves a step's checkpoint before that step's validation,
    so a run resumed from step k lacks the validation point at k.
    """

    def __init__(self, out_dir: str | os.PathLike) -> None:
        self.out_dir = Path(out_dir)
        self.history: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if is_logging_step(trainer) and "train/loss" in trainer.callback_metrics:
            self.history.append({"step": trainer.global_step, "train_loss": float(trainer.callback_metrics["train/loss"])})

    def on_validation_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        if "val/loss" in m:
            self.history.append({"step": trainer.global_step, "val_loss": float(m["val/loss"]),
                                 "val_accuracy": float(m.get("val/accuracy", float("nan")))})

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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it, so a kill mid-save leaves the previous
    checkpoint (and ``last.ckpt``) intact and loadable."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        os.replace(tmp, path)


class BatchRamp(pl.Callback):
    """Grows the global batch during training by switching gradient accumulation at optimizer-step boundaries.

    Args:
        phases: ``(start_step, start_micro_batch, accumulation)`` from :func:`roberta_pl.optim.plan_ramp`.
            Phase starts are aligned to whole optimizer steps by construction, so every step sums exactly
            ``accumulation`` micro-batches.
    """

    def __init__(self, phases: list[tuple[int, int, int]]) -> None:
        self.phases = phases

    def accumulation_at(self, micro_batch: int) -> int:
        return [acc for _, start, acc in self.phases if start <= micro_batch][-1]

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        micro = trainer.fit_loop.epoch_loop.batch_progress.total.ready - 1
        trainer.accumulate_grad_batches = self.accumulation_at(micro)


class StopAtStep(pl.Callback):
    """Ends ``fit`` after optimizer step ``step`` (checkpointed as usual) while the LR schedule still runs to
    ``max_steps``: split a long run into jobs that each fit a cluster time limit, then ``resume=auto``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step >= self.step:
            trainer.should_stop = True
