"""What a pretraining run reports and leaves behind: the model line before fit, the final checkpoint, the loss
curve, the data report, the HuggingFace export, fill-mask predictions, ``summary.json`` and the closing lines; and
what a rerun of a finished run says instead of training again."""

from __future__ import annotations

import json
import os
from pathlib import Path

import lightning.pytorch as pl
from omegaconf import DictConfig

from roberta_pl.checks import find_resume_checkpoint
from roberta_pl.lightning_compat import last_saved_step
from roberta_pl.pretraining.module import MaskedLMModule


def describe_model(module: MaskedLMModule, plan) -> str:
    """One line: the model's size and shape, and what one optimizer step trains on."""
    c = module.config
    params = sum(p.numel() for p in module.model.parameters())  # the tied decoder counted once
    return (f"Model: {params / 1e6:.2f}M parameters ({c.num_layers} layers x {c.hidden_size}, {c.num_heads} heads, "
            f"vocab {c.vocab_size}), {module.flops_per_position / 1e6:.1f} MFLOPs a token + "
            f"{module.flops_per_prediction / 1e6:.1f} a masked one; a step trains "
            f"{plan.global_batch_size} sequences x {plan.seq_len} tokens (micro-batch {plan.micro_batch_size} x "
            f"accumulation {plan.accumulation} x {plan.world_size} rank{'s' if plan.world_size > 1 else ''})")


def describe_start(r) -> None:
    """Rank 0, before fit: the model line, and where a resumed run picks up (``r`` is the harness's Run)."""
    from roberta_pl.loggers import wandb_run_id
    from roberta_pl.pretraining.checks import describe_resume

    if not r.trainer.is_global_zero:
        return
    print(describe_model(r.module, r.plan), flush=True)
    resume = r.parts.resume
    if r.parts.source is not None and not resume.ckpt:
        from roberta_pl.pretraining.init import describe_source

        print(describe_source(r.parts.source), flush=True)
    if resume.ckpt:
        wandb_id = wandb_run_id(r.out_dir) if r.cfg.logger.kind == "wandb" else None
        print(describe_resume(resume.ckpt, resume.saved, wandb_id), flush=True)


def finished_run(ckpt: Path, saved: dict, max_steps: int, out_dir: Path, budgeted: bool = False) -> dict | None:
    """The summary of a run that already reached ``max_steps`` (None if it has steps to go). Rerunning a
    finished run keeps every output as it is (summary, export, W&B run); raising ``trainer.max_steps``
    continues it instead, except in a time-budgeted run (``budgeted``), whose step count its budget fixed."""
    step = int(saved.get("global_step", 0))
    if step < max_steps:
        return None
    summary_path = out_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"run_dir": str(out_dir), "metrics": {}}
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)) or 0) == 0:
        more = ("Its time budget fixed that step count, which a resume keeps; use another run_name (or resume=never) "
                "for a new run." if budgeted else "Raise trainer.max_steps to train further, or use another run_name for "
                "a new run.")
        limit = "the steps its budget bought" if budgeted else f"trainer.max_steps={max_steps}"
        print(f"{out_dir} already finished: {ckpt.name} is at step {step}, {limit}. Nothing was changed. {more}")
    return summary


def report_data(datamodule, rank_zero: bool) -> dict:
    """Say, at the end, how many bad shard reads ``data.on_error=skip`` stepped over (each was logged) and how
    much of each epoch equal steps per rank leave unused; the same figures go to ``summary.json``."""
    counts = {k: v for k, v in datamodule.skipped_shards().items() if v}
    unused = datamodule.unused_per_epoch()
    if rank_zero:
        if counts:
            print(f"Skipped bad shard reads (data.on_error=skip): {counts}; see the warnings above for which shards")
        tokens = f" ({unused['tokens']:,} of {unused['total_tokens']:,} tokens)" if unused["tokens"] is not None else ""
        print(f"Data: {'at least ' if not unused['exact'] else ''}{unused['blocks']:,} of {unused['total_blocks']:,} "
              f"blocks{tokens} left unused per epoch (less than one global batch: ranks take equal steps)")
    return {"skipped_shards": datamodule.skipped_shards(), "unused_per_epoch": unused}


def save_final_checkpoint(trainer: pl.Trainer) -> None:
    """Checkpoint the final step as ``last``: Lightning saves only every N steps, so a run whose last step
    is not a multiple of N would otherwise lose its final steps (and a rerun would repeat them)."""
    callback = trainer.checkpoint_callback
    if callback is not None and last_saved_step(trainer) != trainer.global_step:
        trainer.save_checkpoint(Path(callback.dirpath) / "last.ckpt", weights_only=False)  # a full, resumable checkpoint


def finish(r) -> dict:
    """After fit (``r`` is the harness's Run): the data report, then either the Slurm requeue of a run stopped by
    its signal (checkpointed at a step boundary; the job resumes from it) or the final checkpoint and outputs."""
    from roberta_pl.callbacks import RequeueOnSignal, requeue_slurm_job

    requeue = next(c for c in r.trainer.callbacks if isinstance(c, RequeueOnSignal))
    data_report = report_data(r.datamodule, r.trainer.is_global_zero)
    if requeue.stopped_at is not None:
        if requeue.requeue_job:
            r.after_end.append(lambda: requeue_slurm_job(requeue.requeue_job))
        return {"run_dir": str(r.out_dir), "global_step": r.trainer.global_step, "metrics": {}, "stopped_by_signal": True}
    save_final_checkpoint(r.trainer)
    return finish_run(r.cfg, r.trainer, r.module, r.parts.data.tokenizer, r.out_dir, data_report)


def finish_run(cfg: DictConfig, trainer: pl.Trainer, module: MaskedLMModule, tokenizer, out_dir: Path,
               data_report: dict | None = None) -> dict:
    """After fit, on rank 0: export to HuggingFace, print fill-mask predictions, write ``summary.json``."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/", "data/"))}
    summary = {"run_dir": str(out_dir), "global_step": trainer.global_step, "metrics": metrics, "data": data_report or {}}
    if not trainer.is_global_zero:
        return summary
    from roberta_pl.checkpoints import export
    from roberta_pl.hf import save_hf
    from roberta_pl.inference import fill_mask, format_predictions

    if cfg.export_hf:
        hf_dir = out_dir / "hf"
        if cfg.trainer.strategy == "deepspeed":  # parameters are sharded: consolidate from the checkpoint
            export(find_resume_checkpoint(out_dir), hf_dir, tokenizer.path)
        else:
            save_hf(module.model, hf_dir, tokenizer=tokenizer.path)
        summary["hf_dir"] = str(hf_dir)
    if cfg.fill_mask and cfg.trainer.strategy != "deepspeed":
        summary["fill_mask"] = {t: fill_mask(module.model.cpu(), tokenizer, t) for t in cfg.fill_mask}
        for text, preds in summary["fill_mask"].items():
            print(format_predictions(text, preds, tokenizer.token_text(tokenizer.mask_id)))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    acc = metrics.get("val/accuracy")
    print(f"Done: {trainer.global_step} steps in {out_dir}"
          + (f"; validation masked-token accuracy {acc:.3f}, loss {metrics['val/loss']:.3f}" if acc is not None else ""))
    outputs = [p for p in ("checkpoints/last.ckpt", "loss_curve.png", "hf", "summary.json") if (out_dir / p).exists()]
    resumable = "checkpoints/last.ckpt" in outputs and cfg.trainer.max_time is None  # a budget fixed the steps
    rerun = " Rerun with a larger trainer.max_steps to continue from last.ckpt." if resumable else ""
    print(f"Outputs in {out_dir}: {', '.join(outputs) or 'none'}.{rerun}")
    return summary

