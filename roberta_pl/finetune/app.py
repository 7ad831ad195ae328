"""Fine-tune a pretrained RoBERTa on sequence or token classification.

Examples (Hydra overrides; ``--help`` lists the groups, ``--cfg job`` prints the composed config)::

    roberta-pl-finetune pretrained=runs/quickstart/checkpoints/last.ckpt task=sst2 task.data_dir=/data/SST-2
    roberta-pl-finetune pretrained=/models/roberta-base task=mnli task.data_dir=/data/MNLI trainer=gpu \\
        trainer.precision=bf16-mixed optim.lr=1e-5 optim.layer_decay=0.9 batch_size=32
    roberta-pl-finetune pretrained=runs/x/hf task=token_classification task.train_file=ner/train.conll \\
        task.valid_file=ner/dev.conll
    roberta-pl-finetune -m pretrained=runs/x/hf task=sst2 task.data_dir=... optim.lr=1e-5,2e-5,3e-5   # a sweep

Outputs in ``run_dir`` (default ``runs/finetune-<task>-<init>``): ``checkpoints/best.ckpt`` (best validation
metric), ``predictions/valid.jsonl`` (and ``test.jsonl`` with ``task.test_file``), ``hf/`` (loads in
``transformers.AutoModelFor{Sequence,Token}Classification``), ``summary.json`` and the logger's files.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from data_pipelines.task_data import FinetuneDataModule
from roberta_pl import harness
from roberta_pl.finetune import outputs
from roberta_pl.finetune.checks import preflight_finetune, prepare_task
from roberta_pl.finetune.config import FinetuneConfig, register_configs
from roberta_pl.finetune.module import FinetuneModule
from roberta_pl.finetune.trainer import finetuning_trainer
from roberta_pl.harness import Run, RunSpec, entry_point


def trainer(r: Run):
    r.trainer, r.parts.best = finetuning_trainer(r.cfg, r.out_dir, r.plan, r.resolved)
    return r.trainer


def module(r: Run) -> None:
    cfg, p = r.cfg, r.parts
    model_cfg = p.encoder.config.to_dict()
    if cfg.dropout is not None:
        model_cfg |= {"dropout": cfg.dropout, "attention_dropout": cfg.dropout}
    r.module = FinetuneModule(model=model_cfg, kind=str(cfg.task.kind), labels=p.data.labels, regression=cfg.task.regression,
                              optim=r.resolved["optim"], total_steps=p.total_steps,
                              warmup_steps=round(cfg.optim.warmup_ratio * p.total_steps))
    if cfg.init == "pretrained":
        r.module.load_encoder(p.encoder)
    del p.encoder
    r.datamodule = FinetuneDataModule(p.data.train, p.data.valid, r.plan.micro_batch_size, p.tokenizer.pad_id,
                                      cfg.task.regression, seed=cfg.seed, num_workers=cfg.num_workers)


SPEC = RunSpec(prog="roberta-pl-finetune", schema=FinetuneConfig,
               check=lambda r: preflight_finetune(r.cfg, r.out_dir), prepare=prepare_task, trainer=trainer,
               module=module, finish=outputs.finish_run)


def run(cfg: DictConfig, out_dir: Path, overrides=None) -> dict:
    """Fine-tune with a composed config (see :func:`roberta_pl.harness.run`). Returns the run's summary."""
    return harness.run(SPEC, cfg, out_dir, overrides)


# What a sweeper optimises: the task's validation metric.
main = entry_point(SPEC, "finetune", register_configs, lambda cfg, summary: summary["metrics"].get(f"val/{cfg.task.metric}"))

if __name__ == "__main__":
    main()
