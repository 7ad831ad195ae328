"""Live downstream probes during pretraining: every K optimizer steps, a cheap downstream score per task
(:mod:`roberta_pl.probe`), logged as ``probe/<task>/accuracy`` in every sink under the step that computed it."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning.pytorch as pl
import torch

from roberta_pl.callbacks.metrics import LossCurve
from roberta_pl.callbacks.steps import StepBoundary
from roberta_pl.loggers import log_at_step

log = logging.getLogger("roberta_pl")


class LiveProbe(StepBoundary):
    """Runs the ``probe`` group's tasks after every ``every_n_steps``-th optimizer step and logs
    ``probe/<task>/accuracy`` (and ``probe/seconds``, the wall time of all the step's probes) to every logger and
    ``metrics_history.json``, numbered by that optimizer step as the other metrics are.

    What it leaves as it was: the weights (eval mode under ``no_grad``, or a copy for ``method=finetune``), the
    module's train/eval mode, the optimizer, the data loaders (the tasks have their own), and the RNG streams (the
    probe runs inside ``torch.random.fork_rng`` with its own seed). It keeps no state: whether a step probes is a
    function of the step alone, so a resumed run probes at the same steps as an uninterrupted one, and Lightning
    runs checkpoint callbacks after this one, so a step's checkpoint holds its probe in the loss history.

    Ranks: every rank computes the probe, on the same weights (DDP and ZeRO-1/2 keep identical replicas) and the same
    task data, so every rank takes the same decision at the same step and needs no collective; the loggers and
    ``metrics_history.json`` write on global rank 0 only, so each value is logged once. Rank 0 alone would save no
    time: the other ranks would wait for it at the next step's gradient all-reduce.

    Args:
        settings: the ``probe`` group (``every_n_steps``, ``tasks``, ``method``, ``pooling``, ``batch_size``,
            ``seed``, ``l2``, ``max_iter``, ``finetune_steps``, ``finetune_lr``), checked by
            :func:`roberta_pl.probe.check_probe`.
    """

    def __init__(self, settings: Any) -> None:
        super().__init__()
        self.settings = settings
        self.every_n_steps = int(settings.every_n_steps)
        self.tasks: list = []
        self.pad_id = 1
        self.results: list[dict[str, float]] = []  # this process's probes ({"step": ..., metrics}), on every rank
        self._probed_at = -1

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        from data_pipelines.task_data import load_text_tokenizer
        from roberta_pl.probe import load_probe_task

        if stage != "fit" or self.tasks:
            return
        tokenizer = load_text_tokenizer(pl_module.hparams.tokenizer)  # the run's own (a pretrained model's included)
        self.pad_id = tokenizer.pad_id
        max_len = pl_module.model.config.max_seq_len
        self.tasks = [load_probe_task(t, tokenizer, min(int(t.max_seq_len), max_len)) for t in self.settings.tasks]
        if trainer.is_global_zero:
            sizes = ", ".join(f"{t.name} ({len(t.train)} train, {len(t.valid)} valid, {len(t.labels)} labels)"
                              for t in self.tasks)
            log.info("Live probes every %d steps (%s): %s", self.every_n_steps, self.settings.method, sizes)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        step = trainer.global_step
        if not self.at_boundary or step % self.every_n_steps or step == self._probed_at:
            return
        self._probed_at = step
        metrics = self.run(trainer, pl_module)
        self.results.append({"step": step, **metrics})
        log_at_step(trainer, metrics, step)
        for callback in trainer.callbacks:
            if isinstance(callback, LossCurve):
                callback.record(step, metrics)

    def run(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> dict[str, float]:
        """Every task's score now, as ``{"probe/<task>/accuracy": ..., "probe/seconds": ...}``."""
        from roberta_pl.models import encoder_of
        from roberta_pl.probe import PROBES

        probe, encoder, device = PROBES[str(self.settings.method)], encoder_of(pl_module.model), pl_module.device
        start = time.perf_counter()
        was_training = encoder.training
        cuda = [device] if device.type == "cuda" else []
        metrics = {}
        try:
            encoder.eval()
            with torch.random.fork_rng(devices=cuda):
                for task in self.tasks:
                    torch.manual_seed(int(self.settings.seed))
                    metrics[f"probe/{task.name}/accuracy"] = probe(encoder, task, self.settings, self.pad_id, device,
                                                                   trainer.precision_plugin.forward_context)
        finally:
            encoder.train(was_training)
        metrics["probe/seconds"] = time.perf_counter() - start
        return metrics
