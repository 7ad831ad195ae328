"""The fine-tuning LightningModule: a classification head on the encoder, its loss, metrics and optimizer.

Metrics come from torchmetrics (accuracy, F1, Matthews correlation, Pearson/Spearman); entity-level F1
for tagging is :class:`EntityF1`, a torchmetrics ``Metric`` (CoNLL's conlleval rules, as seqeval's default
mode), since torchmetrics has no span metric.
"""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
import torchmetrics
from torchmetrics import classification as C
from torchmetrics import regression as R

from roberta_pl.model import (
    IGNORE_INDEX,
    RobertaConfig,
)
from roberta_pl.models import encoder_of, sequence_classifier, token_classifier
from roberta_pl.optim import build_adamw, layer_decay_groups, lr_scheduler

# The metric each task kind can monitor; all higher-is-better except loss.
SEQUENCE_METRICS = ("accuracy", "f1", "mcc", "loss")
REGRESSION_METRICS = ("pearson", "spearman", "mse", "loss")
TOKEN_METRICS = ("f1", "precision", "recall", "accuracy", "loss")


def available_metrics(kind: str, regression: bool) -> tuple[str, ...]:
    if kind == "token_classification":
        return TOKEN_METRICS
    return REGRESSION_METRICS if regression else SEQUENCE_METRICS


def metric_mode(name: str) -> str:
    return "min" if name in ("loss", "mse") else "max"


def entity_spans(tags: list[str]) -> set[tuple[str, int, int]]:
    """Chunks ``(type, start, end)`` of a BIO/IOB tag sequence under conlleval's rules: a chunk starts at
    ``B-X``, or at ``I-X`` after a tag of another type or ``O``; ``E-``/``S-`` (IOBES) close chunks."""
    spans, start, kind = set(), None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, typ = tag.partition("-") if tag not in ("O", "") else ("O", "", "")
        if prefix not in ("B", "I", "E", "S"):
            prefix, typ = "O", ""
        begins = prefix in ("B", "S") or (prefix in ("I", "E") and typ != kind)
        if kind is not None and (prefix == "O" or begins):
            spans.add((kind, start, i))
            kind = None
        if begins:
            start, kind = i, typ
        if kind is not None and prefix in ("E", "S"):
            spans.add((kind, start, i + 1))
            kind = None
    return spans


class EntityF1(torchmetrics.Metric):
    """Micro-averaged entity precision, recall and F1 over exact chunk matches; summed across ranks."""

    full_state_update = False
    higher_is_better = True

    def __init__(self, labels: list[str], **kwargs):
        super().__init__(**kwargs)
        self.labels = list(labels)
        for name in ("tp", "fp", "fn"):
            self.add_state(name, default=torch.tensor(0), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor) -> None:
        """``preds`` and ``target``: ``[B, T]`` label ids, ``target`` -100 off the first pieces of words."""
        keep = target.ne(IGNORE_INDEX)
        for p_row, t_row, k_row in zip(preds.tolist(), target.tolist(), keep.tolist()):
            gold = entity_spans([self.labels[t] for t, k in zip(t_row, k_row) if k])
            pred = entity_spans([self.labels[p] for p, k in zip(p_row, k_row) if k])
            self.tp += len(gold & pred)
            self.fp += len(pred - gold)
            self.fn += len(gold - pred)

    def compute(self) -> dict[str, torch.Tensor]:
        tp, fp, fn = self.tp.float(), self.fp.float(), self.fn.float()
        precision = tp / (tp + fp).clamp(min=1)
        recall = tp / (tp + fn).clamp(min=1)
        f1 = 2 * precision * recall / (precision + recall).clamp(min=1e-12)
        return {"precision": precision, "recall": recall, "f1": f1}


class FinetuneModule(pl.LightningModule):
    """Sequence classification/regression or token classification on a RoBERTa encoder.

    Args:
        model: fields of :class:`~roberta_pl.model.RobertaConfig`.
        kind: ``sequence_classification`` or ``token_classification``.
        labels: class names in logit order (regression: one name for the score).
        regression: one output trained with mean squared error.
        optim: ``lr, betas, eps, weight_decay, layer_decay`` and the LR schedule's ``decay, power, end_lr_ratio``
            (:func:`roberta_pl.optim.lr_scheduler`).
        total_steps, warmup_steps: the schedule's length and linear warm-up, in optimizer steps.
    """

    def __init__(self, model: dict[str, Any], kind: str, labels: list[str], regression: bool, optim: dict[str, Any],
                 total_steps: int, warmup_steps: int):
        super().__init__()
        self.save_hyperparameters()
        config = RobertaConfig(**model)
        self.token_level = kind == "token_classification"
        if regression and self.token_level:
            raise ValueError("regression applies to sequence_classification only")
        num_labels = 1 if regression else len(labels)
        build = token_classifier if self.token_level else sequence_classifier
        self.model = build(config, num_labels)
        self.num_labels = num_labels
        self.metrics = self._build_metrics()

    def _build_metrics(self, sync: bool = True) -> torch.nn.ModuleDict:
        """The task's torchmetrics; ``sync=False`` for one process scoring a whole set on its own."""
        n, kw = self.num_labels, {"sync_on_compute": sync}
        if self.token_level:
            return torch.nn.ModuleDict({
                "entity": EntityF1(self.hparams.labels, **kw),
                "accuracy": C.MulticlassAccuracy(n, average="micro", ignore_index=IGNORE_INDEX, **kw),
            })
        if self.hparams.regression:
            return torch.nn.ModuleDict({"pearson": R.PearsonCorrCoef(**kw), "spearman": R.SpearmanCorrCoef(**kw),
                                        "mse": R.MeanSquaredError(**kw)})
        f1 = (C.BinaryF1Score(**kw) if n == 2  # GLUE's F1: the positive class (label index 1)
              else C.MulticlassF1Score(n, average="macro", **kw))
        return torch.nn.ModuleDict({"accuracy": C.MulticlassAccuracy(n, average="micro", **kw), "f1": f1,
                                    "mcc": C.MulticlassMatthewsCorrCoef(n, **kw)})

    def load_encoder(self, encoder: torch.nn.Module) -> None:
        """Start from pretrained encoder weights (the head keeps its fresh init)."""
        encoder_of(self.model).load_state_dict(encoder.state_dict(), strict=True)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.model(input_ids, attention_mask)

    def loss(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.hparams.regression:
            return F.mse_loss(logits.squeeze(-1).float(), labels.float())
        return F.cross_entropy(logits.flatten(0, -2).float(), labels.flatten(), ignore_index=IGNORE_INDEX)

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss = self.loss(self(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def _update(self, metrics: torch.nn.ModuleDict, logits: torch.Tensor, labels: torch.Tensor) -> None:
        if self.hparams.regression:
            scores = logits.squeeze(-1).float()
            for name in ("pearson", "spearman", "mse"):
                metrics[name].update(scores, labels.float())
        elif self.token_level:
            preds = logits.argmax(-1)
            metrics["entity"].update(preds, labels)
            metrics["accuracy"].update(preds, labels)
        else:
            preds = logits.argmax(-1)
            for metric in metrics.values():
                metric.update(preds, labels)

    @staticmethod
    def _compute(metrics: torch.nn.ModuleDict) -> dict[str, torch.Tensor]:
        values: dict[str, torch.Tensor] = {}
        for name, metric in metrics.items():
            out = metric.compute()  # torchmetrics syncs across ranks here (unless built with sync=False)
            values.update(out if isinstance(out, dict) else {name: out})
            metric.reset()
        return values

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        logits = self(batch["input_ids"], batch["attention_mask"])
        labels = batch["labels"]
        self.log("val/loss", self.loss(logits, labels), prog_bar=True, sync_dist=True,
                 batch_size=labels.shape[0])
        self._update(self.metrics, logits, labels)

    def on_validation_epoch_end(self) -> None:
        for name, value in self._compute(self.metrics).items():
            self.log(f"val/{name}", value.float(), prog_bar=name in ("accuracy", "f1", "pearson"))

    @torch.no_grad()
    def evaluate(self, loader) -> dict[str, float]:
        """``val/*`` metrics of every batch of ``loader`` on this process alone: the exact set, with no
        distributed padding, no ``limit_val_batches`` and no cross-rank sync (call it on one rank)."""
        was_training = self.training
        self.eval()
        metrics = self._build_metrics(sync=False).to(self.device)
        loss_sum, count = 0.0, 0
        for batch in loader:
            ids, mask, labels = (batch[k].to(self.device) for k in ("input_ids", "attention_mask", "labels"))
            logits = self(ids, mask)
            loss_sum += float(self.loss(logits, labels)) * labels.shape[0]
            count += labels.shape[0]
            self._update(metrics, logits, labels)
        self.train(was_training)
        values = {f"val/{k}": float(v) for k, v in self._compute(metrics).items()}
        return values | {"val/loss": loss_sum / max(count, 1)}

    def configure_optimizers(self):
        o, h = self.hparams.optim, self.hparams
        groups = layer_decay_groups(self.model, o["lr"], o["weight_decay"], o.get("layer_decay", 1.0),
                                    self.model.config.num_layers)
        optimizer = build_adamw(self.model, o["lr"], o["betas"], o["eps"], o["weight_decay"], groups=groups)
        return {"optimizer": optimizer, "lr_scheduler": lr_scheduler(optimizer, o, h.warmup_steps, lambda: h.total_steps)}
