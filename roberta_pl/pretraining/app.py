"""Pretrain a RoBERTa encoder with masked-language modelling.

Examples (Hydra overrides; ``--help`` lists the config groups, ``--cfg job`` prints the composed config)::

    roberta-pl-train experiment=quickstart                      # tiny model on the embedded corpus, CPU
    roberta-pl-train model=small batch.global_batch_size=64 trainer.max_steps=2000
    roberta-pl-train experiment=roberta_base data=shards data.train_shards=/data/shards data.valid_shards=/data/shards \
        data.tokenizer=/data/tokenizer trainer.num_nodes=8           # a shard dir means its manifest's splits
    roberta-pl-train -m optim.lr=3e-4,6e-4 run_name=lr_sweep   # a local multirun sweep
    roberta-pl-train pretrained=/models/roberta-base data.train_shards=/data/shards   # continue (its shape, tokenizer)

The run directory (``run_dir``, default ``runs/<run_name>``) is stable: rerunning the same command, or a
requeued Slurm job, resumes from its ``last`` checkpoint (``resume=auto``).
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from roberta_pl import harness
from roberta_pl.batch_plan import BatchPlan, StepHorizon
from roberta_pl.harness import Run, RunSpec, entry_point
from roberta_pl.pretraining import checks, init, outputs
from roberta_pl.pretraining.config import PretrainConfig, register_configs
from roberta_pl.pretraining.data import build_datamodule, prepare_data
from roberta_pl.pretraining.module import MaskedLMModule
from roberta_pl.pretraining.trainer import pretraining_trainer


def check(r: Run) -> BatchPlan:
    """What ``pretrained=`` names (its architecture, no weights), then the config: the run's batch plan."""
    r.parts.source = init.read_source(r.cfg)  # None: from random weights
    return checks.preflight(r.cfg, r.out_dir, r.parts.source)


def prepare(r: Run) -> None:
    """The data, the model's settings, the checkpoint to resume (or a finished run's summary), the step horizon."""
    cfg = r.cfg
    r.parts.data = data = prepare_data(cfg, r.parts.source)
    r.parts.model = init.model_settings(cfg, data.tokenizer.vocab_size, r.parts.source)
    r.parts.resume = resume = checks.resume_point(cfg, r.out_dir, r.parts.model, data.tokenizer.hash)
    r.summary = resume.finished
    r.parts.horizon = StepHorizon(cfg.trainer.max_steps, r.plan, fixed=cfg.trainer.max_time is None)


def module(r: Run) -> None:
    cfg, data = r.cfg, r.parts.data
    r.module = MaskedLMModule(model=r.parts.model, optim=r.resolved["optim"], max_steps=cfg.trainer.max_steps,
                              seq_len=r.plan.seq_len, micro_batch_size=r.plan.micro_batch_size, seed=cfg.seed,
                              compile=cfg.model.compile, tokenizer=str(data.tokenizer.path),
                              tokenizer_hash=data.tokenizer.hash, horizon=r.parts.horizon, pretrained=cfg.pretrained)
    init.initialise(r.module.model, r.parts.source, resuming=r.parts.resume.ckpt is not None)
    outputs.describe_start(r)
    r.datamodule = build_datamodule(cfg, data, r.parts.horizon)
    r.fit_args = {"ckpt_path": r.parts.resume.ckpt, "weights_only": True}  # no pickled code runs


SPEC = RunSpec(prog="roberta-pl-train", schema=PretrainConfig, check=check, prepare=prepare,
               trainer=lambda r: pretraining_trainer(r.cfg, r.out_dir, r.parts.horizon, r.resolved, r.own_process),
               module=module, finish=outputs.finish)


def run(cfg: DictConfig, out_dir: Path, overrides=None, own_process: bool = False) -> dict:
    """Pretrain with a composed config (see :func:`roberta_pl.harness.run`). Returns the run's summary."""
    return harness.run(SPEC, cfg, out_dir, overrides, own_process)


# A sweeper (hparams_search=optuna) minimises the value the task returns.
main = entry_point(SPEC, "pretrain", register_configs,
                   lambda cfg, summary: summary["metrics"].get(cfg.optimized_metric) if cfg.optimized_metric else None)

if __name__ == "__main__":
    main()
