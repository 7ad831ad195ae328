"""What a fine-tuning run leaves behind, on rank 0: predictions files (one JSON object per example, in file
order), the HuggingFace export, ``summary.json`` and the closing lines."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from omegaconf import DictConfig

from data_pipelines.task_data import Features, TaskData, make_loader
from roberta_pl.finetune.module import FinetuneModule


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


def finish_run(r) -> dict:
    """After fit (``r`` is the harness's Run): rank 0 scores the best checkpoint's weights over the exact validation
    set, on the training device (the same rows, once each, as the predictions file), then writes the outputs."""
    cfg, trainer, module, p = r.cfg, r.trainer, r.module, r.parts
    best_path = p.best.best_model_path
    metrics = {}
    if trainer.is_global_zero:
        if best_path:
            module.load_state_dict(torch.load(best_path, map_location="cpu", weights_only=True)["state_dict"])
        module.to(trainer.strategy.root_device)  # Lightning's teardown left the module on CPU
        metrics = module.evaluate(make_loader(p.data.valid, r.plan.micro_batch_size, p.tokenizer.pad_id,
                                              cfg.task.regression))
    data = p.data
    summary = {"run_dir": str(r.out_dir), "task": cfg.task.name, "kind": str(cfg.task.kind), "init": str(cfg.init),
               "pretrained": str(cfg.pretrained), "labels": data.labels, "best_checkpoint": best_path,
               "epochs": trainer.current_epoch, "global_step": trainer.global_step, "metrics": metrics,
               "examples": {"train": len(data.train), "valid": len(data.valid)},
               "truncated": {"train": len(data.train.truncated), "valid": len(data.valid.truncated)}}
    if trainer.is_global_zero:
        finish(cfg, r.out_dir, module, data, p.tokenizer, summary)
    return summary
