"""Pretrain a RoBERTa encoder with masked-language modelling.

Examples (Hydra overrides; ``--help`` lists the config groups, ``--cfg job`` prints the composed config)::

    roberta-pl-train experiment=quickstart                      # tiny model on the embedded corpus, CPU
    roberta-pl-train model=small batch.global_batch_size=64 trainer.max_steps=2000
    roberta-pl-train experiment=roberta_base data.train_shards=/data/shards data.valid_shards=/data/shards \
        data.tokenizer=/data/tokenizer trainer.num_nodes=8           # a shard dir means its manifest's splits
    roberta-pl-train data=shards 'data.train_shards="/data/train-{000000..000511}.tar"' ...  # brace patterns: quote twice
    roberta-pl-train -m optim.lr=3e-4,6e-4 run_name=lr_sweep   # a local multirun sweep

The run directory (``run_dir``, default ``runs/<run_name>``) is stable: rerunning the same command, or a
requeued Slurm job, resumes from its ``last`` checkpoint (``resume=auto``).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from roberta_pl.config import CONF_DIR, PretrainConfig, check_known_keys, register_configs
from roberta_pl.callbacks import RequeueOnSignal, requeue_slurm_job
from roberta_pl.factory import (
    build_trainer,
    check_free_space,
    check_resume_checkpoint,
    check_vocab,
    checkpoint_bytes,
    describe_resume,
    find_resume_checkpoint,
    preflight,
    read_checkpoint,
)
from roberta_pl.harness import pin_multirun_job_for_rank_processes, run_scope
from roberta_pl.lightning_compat import last_saved_step
from roberta_pl.loggers import quiet_notices, wandb_run_id
from roberta_pl.pretrain import MaskedLMModule
from roberta_pl.safety import check_hydra_targets


def run(cfg: DictConfig, out_dir: Path, overrides: Sequence[str] | None = None) -> dict:
    """Compose -> check -> data -> module -> trainer -> fit -> export. Returns a summary of the run.

    ``overrides`` are the user's command-line overrides, the only place besides ``conf/`` a ``_target_``
    may come from (default: the ones Hydra recorded; see :mod:`roberta_pl.safety`)."""
    from roberta_pl.pretrain_data import build_datamodule, prepare_data

    with run_scope("roberta-pl-train") as scope:
        check_known_keys(cfg, PretrainConfig)
        check_hydra_targets(cfg, overrides)
        plan = preflight(cfg, out_dir)
        data = prepare_data(cfg)
        vocab = check_vocab(cfg.model.vocab_size, data.tokenizer.vocab_size)
        resolved = OmegaConf.to_container(cfg, resolve=True)
        model_cfg = {k: v for k, v in resolved["model"].items() if k not in ("name", "compile")} | {"vocab_size": vocab}
        ckpt = find_resume_checkpoint(out_dir) if cfg.resume == "auto" else None if cfg.resume == "never" else Path(cfg.resume)
        if ckpt:  # refused here, not half-way into fit, and read without running pickled code
            check_resume_checkpoint(ckpt, model_cfg, data.tokenizer.hash)
            saved = read_checkpoint(ckpt)  # memory-mapped; read once for the finished-run check and the resume line
            finished = finished_run(ckpt, saved, cfg.trainer.max_steps, out_dir)
            if finished is not None:
                return finished
        if not any(int(os.environ.get(v, 0) or 0) for v in ("RANK", "SLURM_PROCID", "LOCAL_RANK")):
            check_free_space(out_dir, checkpoint_bytes(model_cfg))  # one probe per run, not one per rank
        trainer = scope.trainer = build_trainer(cfg, out_dir, plan, resolved)
        pl.seed_everything(cfg.seed, workers=True)
        module = MaskedLMModule(model=model_cfg, optim=resolved["optim"], max_steps=cfg.trainer.max_steps,
                                seq_len=plan.seq_len, micro_batch_size=plan.micro_batch_size,
                                mask_prob=cfg.data.mask_prob, seed=cfg.seed, compile=cfg.model.compile,
                                tokenizer=str(data.tokenizer.path), packed=cfg.data.packing == "full_sentences",
                                tokenizer_hash=data.tokenizer.hash)
        if trainer.is_global_zero:
            print(describe_model(module, plan), flush=True)
        if ckpt and trainer.is_global_zero:
            wandb_id = wandb_run_id(out_dir) if cfg.logger.kind == "wandb" else None
            print(describe_resume(ckpt, saved, wandb_id), flush=True)
        datamodule = build_datamodule(cfg, data, plan)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)  # no pickled code runs
        data_report = report_data(datamodule, trainer.is_global_zero)
        requeue = next(c for c in trainer.callbacks if isinstance(c, RequeueOnSignal))
        if requeue.stopped_at is not None:  # checkpointed at a step boundary; the job resumes from it
            if requeue.requeue_job:
                scope.after_end.append(lambda: requeue_slurm_job(requeue.requeue_job))
            return {"run_dir": str(out_dir), "global_step": trainer.global_step, "metrics": {}, "stopped_by_signal": True}
        save_final_checkpoint(trainer)
        return finish_run(cfg, trainer, module, data.tokenizer, out_dir, data_report)


def describe_model(module: MaskedLMModule, plan) -> str:
    """One line: the model's size and shape, and what one optimizer step trains on."""
    c = module.config
    params = sum(p.numel() for p in module.model.parameters())  # the tied decoder counted once
    return (f"Model: {params / 1e6:.2f}M parameters ({c.num_layers} layers x {c.hidden_size}, {c.num_heads} heads, "
            f"vocab {c.vocab_size}), {module.flops_per_position / 1e6:.1f} MFLOPs a token; a step trains "
            f"{plan.global_batch_size} sequences x {plan.seq_len} tokens (micro-batch {plan.micro_batch_size} x "
            f"accumulation {plan.accumulation} x {plan.world_size} rank{'s' if plan.world_size > 1 else ''})")


def finished_run(ckpt: Path, saved: dict, max_steps: int, out_dir: Path) -> dict | None:
    """The summary of a run that already reached ``max_steps`` (None if it has steps to go). Rerunning a
    finished run keeps every output as it is (summary, export, W&B run); raising ``trainer.max_steps``
    continues it instead."""
    step = int(saved.get("global_step", 0))
    if step < max_steps:
        return None
    summary_path = out_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {"run_dir": str(out_dir), "metrics": {}}
    if int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", 0)) or 0) == 0:
        print(f"{out_dir} already finished: {ckpt.name} is at step {step}, trainer.max_steps={max_steps}. Nothing "
              f"was changed. Raise trainer.max_steps to train further, or use another run_name for a new run.")
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
        trainer.save_checkpoint(Path(callback.dirpath) / "last.ckpt")


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
            print(format_predictions(text, preds))
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    acc = metrics.get("val/accuracy")
    print(f"Done: {trainer.global_step} steps in {out_dir}"
          + (f"; validation masked-token accuracy {acc:.3f}, loss {metrics['val/loss']:.3f}" if acc is not None else ""))
    outputs = [p for p in ("checkpoints/last.ckpt", "loss_curve.png", "hf", "summary.json") if (out_dir / p).exists()]
    rerun = " Rerun with a larger trainer.max_steps to continue from last.ckpt." if "checkpoints/last.ckpt" in outputs else ""
    print(f"Outputs in {out_dir}: {', '.join(outputs) or 'none'}.{rerun}")
    return summary


@hydra.main(config_path=str(CONF_DIR), config_name="pretrain", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    pin_multirun_job_for_rank_processes()
    summary = run(cfg, Path(HydraConfig.get().runtime.output_dir))
    # A sweeper (hparams_search=optuna) minimises the value the task returns.
    return summary["metrics"].get(cfg.optimized_metric) if cfg.optimized_metric else None


def main() -> None:
    quiet_notices()
    register_configs()
    if not CONF_DIR.is_dir():
        sys.exit(f"roberta-pl-train: error: config directory {CONF_DIR} not found (install with `pip install -e .`)")
    _hydra_main()


if __name__ == "__main__":
    main()
