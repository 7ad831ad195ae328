"""Fault helpers for tests/integration/test_zero_integrity.py (on PYTHONPATH for subprocess runs, like
reliability_faults): a callback that stretches DeepSpeed checkpoint saves so a kill lands between two of their
files, a pickle payload, and a reader of the step each file of a ZeRO save belongs to."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import lightning.pytorch as pl


class SlowZeroSave(pl.Callback):
    """Each rank sleeps ``seconds`` before DeepSpeed writes each of its checkpoint files, then appends one JSON line
    per file written (``rank``, ``file``) to ``path``: a test reading it can kill the job between two files of one
    save. Wraps DeepSpeed 0.19.8's ``engine.checkpoint_engine.save(state_dict, path)``, which writes every file."""

    def __init__(self, path: str, seconds: float = 0.3) -> None:
        self.path, self.seconds = Path(path), seconds

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        engine = trainer.strategy.deepspeed_engine.checkpoint_engine
        original, rank = engine.save, trainer.global_rank

        def save(state_dict, path):
            time.sleep(self.seconds)
            original(state_dict, path)
            with open(self.path, "a") as fh:
                fh.write(json.dumps({"rank": rank, "file": str(path)}) + "\n")

        engine.save = save


class Payload:
    """Unpickling this runs ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def file_step(state: dict) -> int:
    """The optimizer step a ZeRO checkpoint file was written at: DeepSpeed's ``global_steps`` in a model-states file,
    Adam's ``step`` in an optimizer partition (ZeRO-1/2: ``base_optimizer_state``, ZeRO-3: ``optimizer_state_dict``)."""
    if "global_steps" in state:
        return int(state["global_steps"])
    optim = state["optimizer_state_dict"]
    inner = optim.get("base_optimizer_state") or optim.get("optimizer_state_dict")
    steps = {int(s["step"]) for s in inner["state"].values()}
    assert len(steps) == 1, steps
    return steps.pop()
