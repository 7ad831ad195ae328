"""The fine-tuning job as a :class:`~roberta_pl.harness.RunSpec`: what ``roberta-pl-finetune`` runs, and what
``roberta-pl-eval`` runs once per task and seed (:func:`run`)."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from data_pipelines.task_data import FinetuneDataModule
from roberta_pl import harness
from roberta_pl.finetune import outputs
from roberta_pl.finetune.checks import preflight_finetune, prepare_task
from roberta_pl.finetune.config import FinetuneConfig, regularisation
from roberta_pl.finetune.module import FinetuneModule
from roberta_pl.finetune.trainer import finetuning_trainer
from roberta_pl.harness import Run, RunSpec


def trainer(r: Run):
    r.trainer, r.parts.best = finetuning_trainer(r.cfg, r.out_dir, r.plan, r.resolved)
    return r.trainer


def module(r: Run) -> None:
    cfg, p = r.cfg, r.parts
    model_cfg, line = regularisation(cfg, p.encoder.config.to_dict())
    if r.trainer.is_global_zero:
        print(line)
    r.module = FinetuneModule(model=model_cfg, kind=str(cfg.task.kind), labels=p.data.labels, regression=cfg.task.regression,
                              optim=r.resolved["optim"], total_steps=p.total_steps,
                              warmup_steps=round(cfg.optim.warmup_ratio * p.total_steps))
    if cfg.init == "pretrained":
        r.module.load_encoder(p.encoder)
    del p.encoder
    r.datamodule = FinetuneDataModule(p.data.train, p.data.valid, r.plan.micro_batch_size, p.tokenizer.pad_id,
                                      cfg.task.regression, seed=cfg.seed, num_workers=cfg.num_workers)


# The steps of a fine-tuning run; the entry point makes its RunSpec of them, and so does :func:`run`.
STEPS = dict(prog="roberta-pl-finetune", schema=FinetuneConfig,
             check=lambda r: preflight_finetune(r.cfg, r.out_dir), prepare=prepare_task, trainer=trainer,
             module=module, finish=outputs.finish_run)


def run(cfg: DictConfig, out_dir: Path, overrides=None) -> dict:
    """Fine-tune with a composed config (see :func:`roberta_pl.harness.run`). Returns the run's summary."""
    return harness.run(RunSpec(**STEPS), cfg, out_dir, overrides)
