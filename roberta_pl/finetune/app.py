"""Fine-tune a pretrained RoBERTa on sequence or token classification.

Examples (Hydra overrides; ``--help`` lists the groups, ``--cfg job`` prints the composed config)::

    roberta-pl-finetune pretrained=runs/quickstart/checkpoints/last.ckpt task=sst2 task.data_dir=/data/SST-2
    roberta-pl-finetune pretrained=/models/roberta-base task=mnli task.data_dir=/data/MNLI trainer=gpu \\
        trainer.precision=bf16-mixed optim.lr=1e-5 optim.layer_decay=0.9 batch_size=32
    roberta-pl-finetune pretrained=runs/x/hf task=sequence_classification task.train_file=train.csv \\
        task.valid_file=dev.csv task.text_column=review task.label_column=stars
    roberta-pl-finetune pretrained=runs/x/hf task=token_classification task.train_file=ner/train.conll \\
        task.valid_file=ner/dev.conll
    roberta-pl-finetune -m pretrained=runs/x/hf task=sst2 task.data_dir=... optim.lr=1e-5,2e-5,3e-5   # a sweep

Outputs in ``run_dir`` (default ``runs/finetune-<task>``): ``checkpoints/best.ckpt`` (best validation
metric), ``predictions/valid.jsonl`` (and ``test.jsonl`` with ``task.test_file``), ``hf/`` (loads in
``transformers.AutoModelFor{Sequence,Token}Classification``), ``summary.json`` and the logger's files.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from omegaconf import DictConfig, OmegaConf

from data_pipelines.errors import DataError
from data_pipelines.tabular import read_sequence_examples, read_token_examples
from roberta_pl.callbacks import AtomicCheckpointIO, LossScaleMonitor, NonFiniteLossGuard
from roberta_pl.config import CONF_DIR
from roberta_pl.factory import (
    ConfigError,
    check_writable,
    extra_callbacks,
    precision_setting,
    world_size,
)
from roberta_pl.config import check_known_keys
from roberta_pl.finetune.config import FinetuneConfig, register_configs
from roberta_pl.harness import pin_multirun_job_for_rank_processes, run_scope
from roberta_pl.loggers import StepLearningRateMonitor, build_loggers, quiet_notices
from roberta_pl.finetune.data import (
    Features,
    FinetuneDataModule,
    build_label_list,
    check_labels,
    encode_examples,
    load_text_tokenizer,
    make_loader,
)
from roberta_pl.finetune.module import FinetuneModule, available_metrics, metric_mode
from roberta_pl.optim import BatchPlanError, plan_batch
from roberta_pl.safety import check_hydra_targets

PROG = "roberta-pl-finetune"


@dataclass
class TaskData:
    labels: list[str]
    train: Features
    valid: Features
    test: Features | None
    files: dict[str, Path]


def preflight(cfg: DictConfig, out_dir: Path):
    """One-line refusals before any work; returns the batch plan."""
    task = cfg.task
    check_known_keys(cfg, FinetuneConfig)
    check_hydra_targets(cfg)
    if cfg.pretrained is None:
        raise ConfigError("pretrained=PATH is required: a roberta-pl .ckpt, a DeepSpeed checkpoint dir or a HF RoBERTa dir")
    if not Path(cfg.pretrained).exists():
        raise ConfigError(f"pretrained={cfg.pretrained}: no such file or directory")
    if cfg.init not in ("pretrained", "random"):
        raise ConfigError(f"init={cfg.init}: choose pretrained or random")
    if task.kind not in ("sequence_classification", "token_classification"):
        raise ConfigError(f"task.kind={task.kind}: choose sequence_classification or token_classification")
    for field in ("train_file", "valid_file"):
        if task.get(field) is None:
            raise ConfigError(f"task.{field} is required (or task.data_dir=DIR for a preset)")
    for field in ("train_file", "valid_file", "test_file"):
        if task.get(field) is not None and not Path(task[field]).is_file():
            raise ConfigError(f"task.{field}={task[field]}: no such file")
    metrics = available_metrics(task.kind, task.regression)
    if task.metric not in metrics:
        raise ConfigError(f"task.metric={task.metric}: choose one of {', '.join(metrics)} for this task")
    if task.max_seq_len < 8:
        raise ConfigError(f"task.max_seq_len={task.max_seq_len} is too short")
    if cfg.trainer.strategy == "deepspeed":
        raise ConfigError("trainer.strategy=deepspeed is for pretraining; fine-tune with trainer=gpu or trainer=ddp")
    if cfg.trainer.max_steps <= 0 and cfg.trainer.max_epochs <= 0:
        raise ConfigError("set trainer.max_epochs or trainer.max_steps to a positive number")
    world = world_size(cfg)
    micro = cfg.micro_batch_size or max(1, cfg.batch_size // world)
    try:
        plan = plan_batch(cfg.batch_size, micro, world, task.max_seq_len)
    except BatchPlanError:
        raise ConfigError(f"batch_size={cfg.batch_size} does not split into micro-batches of {micro} on {world} "
                          f"rank(s); make batch_size a multiple of micro_batch_size x ranks") from None
    if (out_dir / "checkpoints" / "best.ckpt").exists() and not cfg.overwrite:
        raise ConfigError(f"run_dir={out_dir} already holds a fine-tuned model (checkpoints/best.ckpt); "
                          f"choose another run_name or pass overwrite=true")
    check_writable(out_dir)
    return plan


def load_task_data(cfg: DictConfig, tokenizer, max_len: int) -> TaskData:
    """Read, check and encode the task's files. Labels come from the config or the training file."""
    task = cfg.task
    token = task.kind == "token_classification"
    files = {split: Path(task[f"{split}_file"]) for split in ("train", "valid", "test") if task.get(f"{split}_file")}

    def read(path: Path, require_labels: bool):
        common = dict(fmt=task.format, header=task.header, columns=list(task.columns) if task.columns else None,
                      require_labels=require_labels)
        if token:
            return read_token_examples(path, task.text_column, task.label_column, **common)
        return read_sequence_examples(path, task.text_column, task.label_column, task.text_pair_column, **common)

    examples = {split: read(path, require_labels=split != "test") for split, path in files.items()}
    if token:
        name_tag_ids(examples, list(task.labels or []), files)
    if task.regression:
        labels = list(task.labels or ["score"])
    else:
        labels = list(task.labels) if task.labels else build_label_list(examples["train"], files["train"], token)
        for split in examples:
            check_labels(examples[split], labels, files[split], files["train"])
    feats = {split: encode_examples(tokenizer, ex, files[split], task.kind, labels, task.regression, max_len)
             for split, ex in examples.items()}
    return TaskData(labels, feats["train"], feats["valid"], feats.get("test"), files)


def name_tag_ids(examples: dict, names: list[str], files: dict[str, Path]) -> None:
    """Tags given as integer ids (as HF ``datasets`` exports ``ner_tags``) become their names from
    ``task.labels``, in place; entity F1 needs BIO names (``B-PER``), so unnamed ids are refused."""
    tags = {t for ex in examples["train"] for t in ex.label or []}
    if not tags or not all(t.isdigit() for t in tags):
        return
    if not names:
        raise DataError(f"{files['train']}: the tags are integer ids; name them in order with "
                        f"task.labels=[O,B-PER,I-PER,...] (entity F1 needs BIO names)")
    for split, exs in examples.items():
        for ex in exs:
            for t in ex.label or []:
                if not t.isdigit() or int(t) >= len(names):
                    raise DataError(f"{files[split]}, line {ex.line}: tag {t!r} is not an id of task.labels "
                                    f"({len(names)} names)")
            if ex.label is not None:
                ex.label = [names[int(t)] for t in ex.label]


def steps_per_epoch(n_train: int, plan) -> int:
    per_rank = math.ceil(n_train / plan.world_size)
    return max(1, math.ceil(math.ceil(per_rank / plan.micro_batch_size) / plan.accumulation))


def build_trainer(cfg: DictConfig, out_dir: Path, plan, resolved: dict) -> tuple[pl.Trainer, ModelCheckpoint]:
    t, monitor = cfg.trainer, f"val/{cfg.task.metric}"
    mode = metric_mode(cfg.task.metric)
    best = ModelCheckpoint(dirpath=out_dir / "checkpoints", filename="best", monitor=monitor, mode=mode,
                           save_top_k=1, save_last=False, auto_insert_metric_name=False, enable_version_counter=False)
    # The pretraining guards: a NaN/inf loss stops (or skips, trainer.nonfinite_loss) naming the step, and
    # an fp16 loss-scale collapse is reported; plus the user's own trainer.callbacks.
    callbacks = [best, NonFiniteLossGuard(t.nonfinite_loss), LossScaleMonitor(t.min_loss_scale), *extra_callbacks(cfg)]
    if cfg.early_stopping.patience > 0:
        callbacks.append(EarlyStopping(monitor=monitor, mode=mode, patience=cfg.early_stopping.patience,
                                       min_delta=cfg.early_stopping.min_delta))
    loggers = build_loggers(cfg, out_dir, resolved)
    if loggers:
        callbacks.append(StepLearningRateMonitor(logging_interval="step"))
    # Validation every N optimizer steps, counted across epochs (Lightning counts micro-batches), or per epoch.
    val_interval = t.val_every_n_steps * plan.accumulation if t.val_every_n_steps else 1.0
    precision, plugins = precision_setting(t)
    trainer = pl.Trainer(
        accelerator=t.accelerator, devices=t.devices, num_nodes=t.num_nodes, strategy=t.strategy,
        precision=precision, max_epochs=t.max_epochs if t.max_epochs > 0 else None, max_steps=t.max_steps,
        accumulate_grad_batches=plan.accumulation, val_check_interval=val_interval,
        check_val_every_n_epoch=None if t.val_every_n_steps else 1,
        limit_val_batches=t.limit_val_batches, log_every_n_steps=t.log_every_n_steps,
        gradient_clip_val=t.gradient_clip_val or None, deterministic=t.deterministic,
        enable_progress_bar=t.enable_progress_bar, callbacks=callbacks, logger=loggers or False,
        default_root_dir=out_dir, plugins=[AtomicCheckpointIO(), *plugins], num_sanity_val_steps=0,
    )
    return trainer, best


@torch.no_grad()
def predict_logits(model: torch.nn.Module, feats: Features, pad_id: int, batch_size: int = 64) -> torch.Tensor | list:
    """Logits of every example, in file order: ``[N, C]`` for sequences, a ``[T_i, C]`` list for tokens."""
    model.eval()
    device = next(model.parameters()).device
    rows: list[torch.Tensor] = []
    unlabelled = Features(feats.input_ids, [None] * len(feats), feats.examples)  # a test file may mix rows with and without labels
    for batch in make_loader(unlabelled, batch_size, pad_id, regression=False):
        logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device)).float().cpu()
        if logits.dim() == 3:  # tokens: each sequence without its padding
            rows.extend(row[: int(m.sum())] for row, m in zip(logits, batch["attention_mask"]))
        else:
            rows.extend(logits)
    return rows if feats.word_positions else torch.stack(rows)


def write_predictions(path: Path, feats: Features, logits, labels: list[str], kind: str, regression: bool) -> None:
    """One JSON object per example, in file order, written to a temp file then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w") as f:
        for i, ex in enumerate(feats.examples):
            row = {"line": ex.line}
            if kind == "token_classification":
                ids = logits[i].argmax(-1).tolist()
                kept = feats.word_positions[i]  # first-piece position per kept word; -1: a word with no pieces
                row["tokens"] = ex.text
                # Words dropped by truncation, or with no pieces, get no prediction: null.
                row["predictions"] = [labels[ids[p]] if p >= 0 else None for p in kept] + [None] * (len(ex.text) - len(kept))
                if ex.label is not None:
                    row["tags"] = ex.label
            else:
                row["text"] = ex.text
                if ex.text_pair is not None:
                    row["text_pair"] = ex.text_pair
                if regression:
                    row["prediction"] = float(logits[i, 0])
                else:
                    probs = logits[i].softmax(-1)
                    row["prediction"] = labels[int(probs.argmax())]
                    row["probabilities"] = {name: round(float(p), 6) for name, p in zip(labels, probs)}
                if ex.label is not None:
                    row["label"] = ex.label
            f.write(json.dumps(row) + "\n")
    tmp.replace(path)


def run(cfg: DictConfig, out_dir: Path) -> dict:
    """Check → load → encode → fit with early stopping → best checkpoint → predictions → HF export."""
    from roberta_pl.checkpoints import load_encoder

    with run_scope(PROG) as scope:
        try:
            plan = preflight(cfg, out_dir)
            encoder, recorded_tokenizer = load_encoder(cfg.pretrained)
            tok_dir = cfg.tokenizer or recorded_tokenizer
            if tok_dir is None:
                raise ConfigError(f"pretrained={cfg.pretrained} records no tokenizer; pass tokenizer=DIR")
            tokenizer = load_text_tokenizer(tok_dir)
            max_len = min(cfg.task.max_seq_len, encoder.config.max_seq_len)
            data = load_task_data(cfg, tokenizer, max_len)
            total = steps_per_epoch(len(data.train), plan) * max(cfg.trainer.max_epochs, 1)
            if cfg.trainer.max_steps > 0:
                total = cfg.trainer.max_steps if cfg.trainer.max_epochs <= 0 else min(total, cfg.trainer.max_steps)
            if (cfg.trainer.val_every_n_steps or 0) > total:
                raise ConfigError(f"trainer.val_every_n_steps={cfg.trainer.val_every_n_steps} is more than the "
                                  f"{total} steps this run takes: it would never validate or keep a best checkpoint")
            resolved = OmegaConf.to_container(cfg, resolve=True)
            trainer, best = build_trainer(cfg, out_dir, plan, resolved)
            scope.trainer = trainer
        except (ConfigError, BatchPlanError, DataError):
            raise  # one line from run_scope (they are ValueErrors too: not the model's fault below)
        except (FileNotFoundError, KeyError, ValueError) as e:  # an unreadable model or checkpoint
            raise SystemExit(f"{PROG}: error: pretrained={cfg.pretrained}: {e}") from None
        pl.seed_everything(cfg.seed, workers=True)
        model_cfg = encoder.config.to_dict()
        if cfg.dropout is not None:
            model_cfg |= {"dropout": cfg.dropout, "attention_dropout": cfg.dropout}
        module = FinetuneModule(model=model_cfg, kind=cfg.task.kind, labels=data.labels, regression=cfg.task.regression,
                                optim=resolved["optim"], total_steps=total,
                                warmup_steps=round(cfg.optim.warmup_ratio * total))
        if cfg.init == "pretrained":
            module.load_encoder(encoder)
        del encoder
        dm = FinetuneDataModule(data.train, data.valid, plan.micro_batch_size, tokenizer.pad_id,
                                cfg.task.regression, seed=cfg.seed, num_workers=cfg.num_workers)
        trainer.fit(module, datamodule=dm)  # a TrainingFault keeps the best checkpoint so far
        # Rank 0 scores the best checkpoint's weights over the exact validation set, on the training device:
        # the same rows, once each, as the predictions file. (Lightning's teardown left the module on CPU.)
        best_path = best.best_model_path
        metrics = {}
        if trainer.is_global_zero:
            if best_path:
                module.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"])
            module.to(trainer.strategy.root_device)
            metrics = module.evaluate(make_loader(data.valid, plan.micro_batch_size, tokenizer.pad_id, cfg.task.regression))
        summary = {"run_dir": str(out_dir), "task": cfg.task.name, "kind": cfg.task.kind, "init": cfg.init,
                   "pretrained": str(cfg.pretrained), "labels": data.labels, "best_checkpoint": best_path,
                   "epochs": trainer.current_epoch, "global_step": trainer.global_step, "metrics": metrics,
                   "examples": {"train": len(data.train), "valid": len(data.valid)},
                   "truncated": {"train": len(data.train.truncated), "valid": len(data.valid.truncated)}}
        if trainer.is_global_zero:
            finish(cfg, out_dir, module, data, tokenizer, summary)
        return summary


def finish(cfg: DictConfig, out_dir: Path, module: FinetuneModule, data: TaskData, tokenizer, summary: dict) -> None:
    """Rank 0: predictions files, HF export, ``summary.json`` and a closing line."""
    from roberta_pl.hf import save_hf_classifier

    splits = {"valid": data.valid} | ({"test": data.test} if data.test is not None else {})
    summary["predictions"] = {}
    for split, feats in splits.items():
        path = out_dir / "predictions" / f"{split}.jsonl"
        logits = predict_logits(module.model, feats, tokenizer.pad_id)
        write_predictions(path, feats, logits, data.labels, cfg.task.kind, cfg.task.regression)
        summary["predictions"][split] = str(path)
    if data.test is not None:
        summary["examples"]["test"] = len(data.test)
        summary["truncated"]["test"] = len(data.test.truncated)
    if cfg.export_hf:
        summary["hf_dir"] = str(save_hf_classifier(module.model.cpu(), out_dir / "hf", data.labels,
                                                   regression=cfg.task.regression, tokenizer=tokenizer.path))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    shown = ", ".join(f"{k.removeprefix('val/')} {v:.4f}" for k, v in sorted(summary["metrics"].items()))
    print(f"Done: {cfg.task.name}, {summary['global_step']} steps in {summary['epochs']} epochs; best checkpoint: {shown}")
    outputs = [p for p in ("checkpoints/best.ckpt", "predictions", "hf", "summary.json") if (out_dir / p).exists()]
    print(f"Outputs in {out_dir}: {', '.join(outputs)}")


@hydra.main(config_path=str(CONF_DIR), config_name="finetune", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    pin_multirun_job_for_rank_processes()
    summary = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    return summary["metrics"].get(f"val/{cfg.task.metric}")  # what a sweeper optimises


def main() -> None:
    quiet_notices()
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    register_configs()
    if not CONF_DIR.is_dir():
        sys.exit(f"{PROG}: error: config directory {CONF_DIR} not found (install with `pip install -e .`)")
    _hydra_main()


if __name__ == "__main__":
    main()
