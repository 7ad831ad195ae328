"""Pretrain a RoBERTa encoder with masked-language modelling.

Examples (Hydra overrides; ``--help`` lists the config groups, ``--cfg job`` prints the composed config)::

    roberta-pl-train experiment=quickstart                      # tiny model on the embedded corpus, CPU
    roberta-pl-train model=small batch.global_batch_size=64 trainer.max_steps=2000
    roberta-pl-train experiment=roberta_base data.train_shards='/data/train-{000000..000511}.tar' \
        data.valid_shards=/data/valid-000000.tar data.tokenizer=/data/tokenizer trainer.num_nodes=8
    roberta-pl-train -m optim.lr=3e-4,6e-4 run_name=lr_sweep   # a local multirun sweep

The run directory (``run_dir``, default ``runs/<run_name>``) is stable: rerunning the same command, or a
requeued Slurm job, resumes from its ``last`` checkpoint (``resume=auto``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from roberta_pl.config import CONF_DIR, register_configs
from roberta_pl.factory import ConfigError, build_trainer, check_vocab, find_resume_checkpoint, preflight
from roberta_pl.optim import BatchPlanError
from roberta_pl.pretrain import MaskedLMModule


def run(cfg: DictConfig, out_dir: Path) -> dict:
    """Compose -> check -> data -> module -> trainer -> fit -> export. Returns a summary of the run."""
    from data_pipelines.errors import DataError
    from roberta_pl.pretrain_data import build_datamodule, prepare_data

    try:
        plan = preflight(cfg, out_dir)
        data = prepare_data(cfg)
        vocab = check_vocab(cfg.model.vocab_size, data.tokenizer.vocab_size)
    except (ConfigError, BatchPlanError, DataError) as e:
        raise SystemExit(f"roberta-pl-train: error: {e}") from None
    pl.seed_everything(cfg.seed, workers=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    model_cfg = {k: v for k, v in resolved["model"].items() if k not in ("name", "compile")} | {"vocab_size": vocab}
    module = MaskedLMModule(model=model_cfg, optim=resolved["optim"], max_steps=cfg.trainer.max_steps,
                            seq_len=plan.seq_len, micro_batch_size=plan.micro_batch_size,
                            mask_prob=cfg.data.mask_prob, seed=cfg.seed, compile=cfg.model.compile,
                            tokenizer=str(data.tokenizer.path),
                            packed=cfg.data.packing == "full_sentences")
    trainer, loss_curve = build_trainer(cfg, out_dir, plan, resolved)
    ckpt = find_resume_checkpoint(out_dir) if cfg.resume == "auto" else None if cfg.resume == "never" else Path(cfg.resume)
    if ckpt and trainer.is_global_zero:
        print(f"Resuming from {ckpt}")
    datamodule = build_datamodule(cfg, data, plan)
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt)
        return finish_run(cfg, trainer, module, data.tokenizer, out_dir)
    finally:
        close_loggers(trainer)


def close_loggers(trainer: pl.Trainer) -> None:
    """Finish W&B runs so their offline files (summary, config) are complete and a later run starts fresh."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero and logger._experiment is not None:
            logger.experiment.finish()


def finish_run(cfg: DictConfig, trainer: pl.Trainer, module: MaskedLMModule, tokenizer, out_dir: Path) -> dict:
    """After fit, on rank 0: export to HuggingFace, print fill-mask predictions, write ``summary.json``."""
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith(("val/", "train/"))}
    summary = {"run_dir": str(out_dir), "global_step": trainer.global_step, "metrics": metrics}
    if not trainer.is_global_zero:
        return summary
    from roberta_pl.cli.fill_mask import fill_mask, format_predictions
    from roberta_pl.cli.export import export
    from roberta_pl.hf import save_hf

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
    return summary


@hydra.main(config_path=str(CONF_DIR), config_name="pretrain", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    run(cfg, Path(HydraConfig.get().runtime.output_dir))


def main() -> None:
    register_configs()
    if not CONF_DIR.is_dir():
        sys.exit(f"roberta-pl-train: error: config directory {CONF_DIR} not found (install with `pip install -e .`)")
    _hydra_main()


if __name__ == "__main__":
    main()
