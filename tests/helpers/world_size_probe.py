"""A callback for tests/integration/test_world_size_resume.py, passed as ``trainer.callbacks=[...]`` (with
``tests/helpers/`` on ``PYTHONPATH``), as a user's own callback is. Production code knows nothing about it."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl


class SaveAtResume(pl.Callback):
    """Saves a checkpoint to ``path`` as ``fit`` starts, before the first step: the state the run resumed with
    (parameters, optimizer state, step, LR schedule), written by this run's strategy on this run's ranks."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(self.path)  # every rank takes part (a ZeRO checkpoint has one shard per rank)
