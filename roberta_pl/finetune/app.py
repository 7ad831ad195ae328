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

Outputs in ``run_dir`` (default ``runs/finetune-<task>-<init>``): ``checkpoints/best.ckpt`` (best validation
metric), ``predictions/valid.jsonl`` (and ``test.jsonl`` with ``task.test_file``), ``hf/`` (loads in
``transformers.AutoModelFor{Sequence,Token}Classification``), ``summary.json`` and the logger's files.
"""

from __future__ import annotations

import math
import sys
import warnings
from pathlib import Path

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from data_pipelines.errors import DataError
from data_pipelines.task_data import (
    FinetuneDataModule,
    load_task_data,
    load_text_tokenizer,
    make_loader,
)
from roberta_pl.config import CONF_DIR, check_known_keys
from roberta_pl.errors import ConfigError
from roberta_pl.finetune.checks import preflight_finetune
from roberta_pl.finetune.config import (
    FinetuneConfig,
    fill_size_defaults,
    register_configs,
)
from roberta_pl.finetune.module import FinetuneModule
from roberta_pl.finetune.outputs import finish
from roberta_pl.finetune.trainer import finetuning_trainer
from roberta_pl.harness import pin_multirun_job_for_rank_processes, run_scope
from roberta_pl.loggers import quiet_notices
from roberta_pl.optim import BatchPlanError
from roberta_pl.safety import check_hydra_targets

PROG = "roberta-pl-finetune"


def steps_per_epoch(n_train: int, plan) -> int:
    per_rank = math.ceil(n_train / plan.world_size)
    return max(1, math.ceil(math.ceil(per_rank / plan.micro_batch_size) / plan.accumulation))


def run(cfg: DictConfig, out_dir: Path) -> dict:
    """Check → load → encode → fit with early stopping → best checkpoint → predictions → HF export."""
    from roberta_pl.checkpoints import load_encoder

    with run_scope(PROG) as scope:
        try:
            check_known_keys(cfg, FinetuneConfig)
            check_hydra_targets(cfg)
            plan = preflight_finetune(cfg, out_dir)
            # The tokenizer it records only if its hash is the recorded one; tokenizer=DIR is the user's choice.
            encoder, tok_dir = load_encoder(cfg.pretrained, cfg.tokenizer, flag="tokenizer=DIR")
            chosen = fill_size_defaults(cfg, encoder.config.hidden_size)  # before `resolved`: loggers see the real lr
            if chosen and rank_zero_only.rank == 0:
                print(chosen)
            if tok_dir is None:
                raise ConfigError(f"pretrained={cfg.pretrained} records no tokenizer; pass tokenizer=DIR")
            tokenizer = load_text_tokenizer(tok_dir)
            max_len = min(cfg.task.max_seq_len, encoder.config.max_seq_len)
            data = load_task_data(cfg.task, tokenizer, max_len)
            total = steps_per_epoch(len(data.train), plan) * max(cfg.trainer.max_epochs, 1)
            if cfg.trainer.max_steps > 0:
                total = cfg.trainer.max_steps if cfg.trainer.max_epochs <= 0 else min(total, cfg.trainer.max_steps)
            if (cfg.trainer.val_every_n_steps or 0) > total:
                raise ConfigError(f"trainer.val_every_n_steps={cfg.trainer.val_every_n_steps} is more than the "
                                  f"{total} steps this run takes: it would never validate or keep a best checkpoint")
            resolved = OmegaConf.to_container(cfg, resolve=True)
            trainer, best = finetuning_trainer(cfg, out_dir, plan, resolved)
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
