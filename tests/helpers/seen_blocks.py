"""A callback for tests/integration/test_world_size_resume.py, passed as ``trainer.callbacks=[...]`` (with
``tests/helpers/`` on ``PYTHONPATH``): every rank writes one line per training block it is given, so a test can
check that a resume on another number of ranks sees no block twice. Production code knows nothing about it."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import lightning.pytorch as pl
import torch


class RecordBlocks(pl.Callback):
    """Appends ``<global_step> <sha1 of the block's unmasked token ids>`` per row of each training micro-batch to
    ``<folder>/rank<R>-pid<P>.txt`` (one file per process: runs of different world sizes never share one)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        labels, ids = batch["labels"], batch["input_ids"]
        original = torch.where(labels != -100, labels, ids).cpu()  # masking undone: the block the loader dealt
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / f"rank{trainer.global_rank}-pid{os.getpid()}.txt", "a") as f:
            for row in original:
                f.write(f"{trainer.global_step} {hashlib.sha1(row.numpy().tobytes()).hexdigest()}\n")
