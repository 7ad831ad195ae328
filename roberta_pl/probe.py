"""Live downstream probes: a cheap downstream score of the encoder being pretrained, on small labelled tasks.

Two methods, both deterministic (a fixed seed inside a forked RNG, so the training RNG stream is untouched) and
neither touching the trained weights:

- ``linear``: the frozen encoder's features (mean-pooled over real tokens, or the ``<s>`` position) in eval mode
  under ``no_grad``; a multinomial logistic regression fitted on the train split by L-BFGS from zero weights
  (standardised features, L2 penalty), scored on the valid split;
- ``finetune``: a copy of the encoder with a linear head, trained for a few AdamW steps on the train split, scored
  on the valid split in eval mode; the copy is then dropped.

The task files use fine-tuning's task schema and readers (:mod:`data_pipelines.task_data`); the probe scores
sequence classification (accuracy). :func:`check_probe` refuses a bad ``probe`` config before any work;
:class:`roberta_pl.callbacks.probes.LiveProbe` runs the probes during pretraining.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from roberta_pl.errors import ConfigError

_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass
class ProbeTask:
    """One task's encoded splits (:class:`data_pipelines.task_data.Features`) and its label names."""

    name: str
    labels: list[str]
    train: Any
    valid: Any


def task_settings(task: Any) -> DictConfig:
    """A ``probe.tasks`` entry as the task node :func:`data_pipelines.task_data.load_task_data` reads (fine-tuning's
    schema: a probe task has no test file and is never a regression)."""
    plain = OmegaConf.to_container(task, resolve=True, enum_to_str=True) if isinstance(task, DictConfig) else dict(task)
    return OmegaConf.create({**plain, "regression": False, "test_file": None})


def check_probe(cfg: DictConfig) -> None:
    """Refuse a ``probe`` config that cannot run, before any work: one line naming the field or file.

    Reads each task's files with fine-tuning's readers (their errors name the file and line), so a task that
    cannot be read, or that has fewer than two labels, stops the run here and not at the first probe.
    """
    from data_pipelines.tabular import read_sequence_examples
    from data_pipelines.task_data import build_label_list, check_labels

    p = cfg.probe
    if p.every_n_steps < 0:
        raise ConfigError(f"probe.every_n_steps={p.every_n_steps}: a number of optimizer steps (0: no probes)")
    if p.every_n_steps == 0:
        return
    if not p.tasks:
        raise ConfigError(f"probe.every_n_steps={p.every_n_steps} but probe.tasks is empty; name at least one task, "
                          f"e.g. probe.tasks=[{{name:sources,train_file:DIR/train.csv,valid_file:DIR/valid.csv}}]")
    for key in ("batch_size", "max_iter"):
        if p[key] < 1:
            raise ConfigError(f"probe.{key}={p[key]}: must be a positive integer")
    if p.method == "finetune" and (p.finetune_steps < 1 or not p.finetune_lr > 0):
        raise ConfigError(f"probe.method=finetune needs probe.finetune_steps >= 1 and probe.finetune_lr > 0 "
                          f"(finetune_steps={p.finetune_steps}, finetune_lr={p.finetune_lr})")
    t = cfg.trainer
    if t.strategy == "deepspeed" and t.deepspeed.stage == 3:
        raise ConfigError("probe.every_n_steps is not supported with trainer.deepspeed.stage=3: ZeRO-3 shards the "
                          "parameters, which a probe's forward outside the engine does not gather; use stage 2, ddp, "
                          "or probe.every_n_steps=0")
    names: set[str] = set()
    for i, task in enumerate(p.tasks):
        field = f"probe.tasks.{i}"
        if not _NAME.match(str(task.name)) or task.name in names:
            raise ConfigError(f"{field}.name={task.name!r}: a unique name of letters, digits, '_', '.' or '-' "
                              f"(it names the metric probe/<name>/accuracy)")
        names.add(task.name)
        if task.max_seq_len < 3:
            raise ConfigError(f"{field}.max_seq_len={task.max_seq_len}: at least 3 (<s>, a token, </s>)")
        examples = {}
        for split in ("train", "valid"):
            path = task.get(f"{split}_file")
            if not path:
                raise ConfigError(f"{field}.{split}_file is required (a CSV/TSV/JSONL file of labelled examples)")
            if not Path(path).is_file():
                raise ConfigError(f"{field}.{split}_file={path}: no such file")
            examples[split] = read_sequence_examples(
                path, task.text_column, task.label_column, task.text_pair_column, fmt=str(task.format),
                header=task.header, columns=list(task.columns) or None)
        labels = list(task.labels) if task.labels else build_label_list(examples["train"], Path(task.train_file), False)
        for split in ("train", "valid"):
            check_labels(examples[split], labels, Path(task[f"{split}_file"]), task.train_file)


def load_probe_task(task: Any, tokenizer, max_len: int) -> ProbeTask:
    """Read and encode one ``probe.tasks`` entry with ``tokenizer`` (:func:`~data_pipelines.task_data.load_text_tokenizer`),
    examples cut to ``max_len`` tokens."""
    from data_pipelines.task_data import load_task_data

    settings = task_settings(task)
    data = load_task_data(settings, tokenizer, max_len)
    return ProbeTask(str(settings.name), data.labels, data.train, data.valid)


def batches(feats, batch_size: int, pad_id: int, shuffle: bool = False, seed: int = 0):
    """Padded batches of ``feats`` (fine-tuning's loader), in file order unless ``shuffle``."""
    from data_pipelines.task_data import make_loader

    return make_loader(feats, batch_size, pad_id, regression=False, shuffle=shuffle, seed=seed)


def pool(hidden: torch.Tensor, mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """``[B, H]`` float32 features of ``[B, T, H]`` hidden states: the mean over real tokens, or ``<s>``'s (``cls``)."""
    if pooling == "cls":
        return hidden[:, 0].float()
    m = mask.to(hidden.dtype).unsqueeze(-1)
    return ((hidden * m).sum(1) / m.sum(1).clamp(min=1)).float()


@torch.no_grad()
def encode(encoder: torch.nn.Module, feats, batch_size: int, pad_id: int, pooling: str, device: torch.device,
           precision=contextlib.nullcontext) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [N, H], labels [N])`` of a split through ``encoder`` (ids, mask -> hidden states) as it is, each
    forward inside ``precision()`` (the training precision's autocast, say)."""
    xs, ys = [], []
    for batch in batches(feats, batch_size, pad_id):
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        with precision():
            hidden = encoder(ids, mask)
        xs.append(pool(hidden, mask, pooling))
        ys.append(batch["labels"].to(device))
    return torch.cat(xs), torch.cat(ys)


def logistic_regression_accuracy(x_train: torch.Tensor, y_train: torch.Tensor, x_valid: torch.Tensor,
                                 y_valid: torch.Tensor, num_classes: int, l2: float = 1e-3,
                                 max_iter: int = 100) -> float:
    """Valid accuracy of a multinomial logistic regression fitted on the train features (full-batch L-BFGS from
    zero weights on features standardised by the train split: deterministic, no RNG)."""
    mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-6)
    a, b = (x_train - mean) / std, (x_valid - mean) / std
    weight = torch.zeros(a.shape[1], num_classes, device=a.device, requires_grad=True)
    bias = torch.zeros(num_classes, device=a.device, requires_grad=True)
    opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(a @ weight + bias, y_train) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return ((b @ weight + bias).argmax(-1) == y_valid).float().mean().item()


def linear_probe(encoder: torch.nn.Module, task: ProbeTask, settings: Any, pad_id: int, device: torch.device,
                 precision=contextlib.nullcontext) -> float:
    """Valid accuracy of a logistic regression on the frozen encoder's features (``settings``: the ``probe`` group;
    ``precision``: the context of the encoder's forwards). The regression itself runs in float32."""
    x_train, y_train = encode(encoder, task.train, settings.batch_size, pad_id, settings.pooling, device, precision)
    x_valid, y_valid = encode(encoder, task.valid, settings.batch_size, pad_id, settings.pooling, device, precision)
    return logistic_regression_accuracy(x_train, y_train, x_valid, y_valid, len(task.labels), settings.l2,
                                        settings.max_iter)


def finetune_probe(encoder: torch.nn.Module, task: ProbeTask, settings: Any, pad_id: int, device: torch.device,
                   precision=contextlib.nullcontext) -> float:
    """Valid accuracy after ``settings.finetune_steps`` AdamW steps of a fresh copy of ``encoder`` (a
    bare encoder such as :class:`~roberta_pl.model.RobertaModel`, rebuilt from its config and state: a compiled or a DeepSpeed bf16 encoder
    copies as plain fp32) with a linear head, trained and scored in float32 (``precision`` is not used: fp16 autocast
    would need a loss scaler). Call inside a forked, seeded RNG: dropout and the head's init draw."""
    copy = type(encoder)(encoder.config).to(device)
    copy.load_state_dict({k: v.float() for k, v in encoder.state_dict().items()})
    head = torch.nn.Linear(encoder.config.hidden_size, len(task.labels)).to(device)
    opt = torch.optim.AdamW([*copy.parameters(), *head.parameters()], lr=settings.finetune_lr, weight_decay=0.0)
    copy.train()
    step = 0
    with torch.enable_grad():
        while step < settings.finetune_steps:
            for batch in batches(task.train, settings.batch_size, pad_id, shuffle=True, seed=settings.seed + step):
                ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
                loss = F.cross_entropy(head(pool(copy(ids, mask), mask, settings.pooling)), batch["labels"].to(device))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                if step == settings.finetune_steps:
                    break
    copy.eval()
    x_valid, y_valid = encode(copy, task.valid, settings.batch_size, pad_id, settings.pooling, device)
    with torch.no_grad():
        return (head(x_valid).argmax(-1) == y_valid).float().mean().item()


PROBES = {"linear": linear_probe, "finetune": finetune_probe}
