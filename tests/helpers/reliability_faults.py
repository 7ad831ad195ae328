"""Fault-injection and recording callbacks for the reliability tests.

They reach a run the way a user's own callbacks do: ``trainer.callbacks=[{_target_: reliability_faults.X, ...}]``
on the command line (with ``tests/helpers/`` on ``PYTHONPATH`` for subprocess runs). Production code knows nothing
about them.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

from roberta_pl.lightning_compat import micro_batches_started


def _digest(*tensors: torch.Tensor) -> str:
    h = hashlib.blake2b(digest_size=12)
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


class RecordBatches(pl.Callback):
    """Appends one JSON line per trained micro-batch: its global index, the optimizer step it belongs to,
    a digest of the batch (masked ids and labels) and one digest per row of the unmasked token block.
    A killed run leaves lines for batches it never checkpointed; the run that resumes writes those indices
    again, so the last line per index is the batch that the surviving lineage trained on."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        micro = micro_batches_started(trainer) - 1
        original = torch.where(batch["labels"] != -100, batch["labels"], batch["input_ids"])
        line = {"micro": micro, "step": trainer.global_step + 1, "t": time.time(),
                "tokens": int((batch["input_ids"] != 1).sum()),  # real tokens: <pad> (id 1) excluded
                "batch": _digest(batch["input_ids"], batch["labels"]),
                "blocks": [_digest(row) for row in original]}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(line) + "\n")


def surviving_batches(path: Path) -> dict[int, dict]:
    """The last record per micro-batch index of a :class:`RecordBatches` file."""
    last: dict[int, dict] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            last[record["micro"]] = record
    return dict(sorted(last.items()))


class NonFiniteLossAt(pl.Callback):
    """Makes the loss non-finite in the given optimizer steps (1-based) by adding ``value`` (nan or inf) to
    the embeddings' output: the fault flows through the real forward and backward."""

    def __init__(self, steps: list[int], value: float = float("nan"), rank: int | None = None) -> None:
        self.steps = set(steps)
        self.value = float(value)
        self.rank = rank  # None: every rank
        self._handle = None

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        if self.rank is not None and trainer.global_rank != self.rank:
            return
        if trainer.global_step + 1 in self.steps and self._handle is None:
            value = self.value
            self._handle = pl_module.model.roberta.embeddings.register_forward_hook(lambda m, i, out: out + value)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class Ballast(pl.Callback):
    """Adds ``megabytes`` of zeros to every checkpoint, so that writing one lasts long enough for the test to
    catch (and kill) a save half-way."""

    def __init__(self, megabytes: int = 64) -> None:
        self.ballast = torch.zeros(megabytes * 2**20 // 4)

    def state_dict(self) -> dict[str, Any]:
        return {"ballast": self.ballast}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


class Touch(pl.Callback):
    """Creates ``path`` when instantiated: shows whether a config's ``_target_`` was imported and run."""

    def __init__(self, path: str) -> None:
        Path(path).touch()


class AuditCheckpoints(pl.Callback):
    """Appends one JSON line per checkpoint written (rank 0): the optimizer step, the micro-batches the data
    stream counts as consumed, the accumulation in force, and the name it was saved under. A checkpoint at an
    optimizer-step boundary has ``consumed == step * accumulation`` (without a batch ramp)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        if not trainer.is_global_zero:
            return
        line = {"step": trainer.global_step, "consumed": trainer.datamodule.consumed,
                "accumulation": trainer.accumulate_grad_batches}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(line) + "\n")


class Slow(pl.Callback):
    """Sleeps ``seconds`` after every micro-batch, so that a run lasts long enough for kills at random
    wall-clock moments to land all over it (numerics are untouched)."""

    def __init__(self, seconds: float = 0.03) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        time.sleep(self.seconds)


class RecordLosses(pl.Callback):
    """Appends the loss of each training micro-batch (the model's own output, read by a forward hook: the mean
    over its masked tokens), how many tokens it masked, and the optimizer step it belongs to."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)
        self._step = 0

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        def hook(module, args, out):
            if module.training and out.loss is not None:
                with open(self.path, "a") as fh:
                    record = {"step": self._step, "loss": float(out.loss), "masked": int(out.targets.numel())}
                    fh.write(json.dumps(record) + "\n")

        pl_module.model.register_forward_hook(hook)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self._step = trainer.global_step + 1


class ClockSkew(pl.Callback):
    """Makes one rank's clock run ``factor`` times as fast for the :class:`BudgetPlanner` (clocks that disagree,
    as two nodes' may under load), so that rank alone would think its measuring window used up its share."""

    def __init__(self, rank: int, factor: float) -> None:
        self.rank, self.factor = rank, factor

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from roberta_pl.callbacks import BudgetPlanner

        if trainer.global_rank != self.rank:
            return
        start = time.monotonic()
        for callback in trainer.callbacks:
            if isinstance(callback, BudgetPlanner):
                callback.clock = lambda: start + (time.monotonic() - start) * self.factor
