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

import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from roberta_pl.callbacks import RequeueOnSignal, fixed_max_steps, requeue_slurm_job
from roberta_pl.checkpoints import remove_interrupted_saves
from roberta_pl.checks import check_free_space, find_resume_checkpoint, read_checkpoint
from roberta_pl.config import CONF_DIR, check_known_keys, model_settings
from roberta_pl.harness import pin_multirun_job_for_rank_processes, run_scope
from roberta_pl.loggers import quiet_notices, wandb_run_id
from roberta_pl.pretraining.checks import (
    check_resume_checkpoint,
    check_vocab,
    checkpoint_bytes,
    describe_resume,
    preflight,
)
from roberta_pl.pretraining.config import PretrainConfig, register_configs
from roberta_pl.pretraining.module import MaskedLMModule
from roberta_pl.pretraining.outputs import (
    describe_model,
    finish_run,
    finished_run,
    report_data,
    save_final_checkpoint,
)
from roberta_pl.pretraining.trainer import pretraining_trainer
from roberta_pl.safety import check_hydra_targets


def run(cfg: DictConfig, out_dir: Path, overrides: Sequence[str] | None = None, own_process: bool = False) -> dict:
    """Compose -> check -> data -> module -> trainer -> fit -> export. Returns a summary of the run.

    ``overrides`` are the user's command-line overrides, the only place besides ``conf/`` a ``_target_``
    may come from (default: the ones Hydra recorded; see :mod:`roberta_pl.safety`). ``own_process``: the process
    exists for this run (``roberta-pl-train``), so process-wide tuning (glibc's allocator) is allowed."""
    from roberta_pl.pretraining.data import build_datamodule, prepare_data

    with run_scope("roberta-pl-train") as scope:
        check_known_keys(cfg, PretrainConfig)
        check_hydra_targets(cfg, overrides)
        plan = preflight(cfg, out_dir)
        data = prepare_data(cfg)
        vocab = check_vocab(cfg.model.vocab_size, data.tokenizer.vocab_size)
        resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        model_cfg = model_settings(resolved["model"], vocab)
        rank_zero = not any(int(os.environ.get(v, 0) or 0) for v in ("RANK", "SLURM_PROCID", "LOCAL_RANK"))
        if rank_zero:  # before any rank exists that could be saving: what killed saves left is garbage
            report_removed_saves(out_dir / "checkpoints")
        ckpt = find_resume_checkpoint(out_dir) if cfg.resume == "auto" else None if cfg.resume == "never" else Path(cfg.resume)
        if ckpt:  # refused here, not half-way into fit, and read without running pickled code
            saved = read_checkpoint(ckpt)  # memory-mapped, read once: the fit check, finished-run check, resume line
            check_resume_checkpoint(ckpt, saved, model_cfg, data.tokenizer.hash, cfg.trainer.strategy)
            # A time-budgeted run trains to the max_steps it fixed (saved in the checkpoint), not to the cap.
            fixed = fixed_max_steps(saved)
            finished = finished_run(ckpt, saved, fixed or cfg.trainer.max_steps, out_dir, budgeted=fixed is not None)
            if finished is not None:
                return finished
        if rank_zero:
            check_free_space(out_dir, checkpoint_bytes(model_cfg))  # one probe per run, not one per rank
        trainer = scope.trainer = pretraining_trainer(cfg, out_dir, plan, resolved, tune_allocator=own_process)
        pl.seed_everything(cfg.seed, workers=True)
        module = MaskedLMModule(model=model_cfg, optim=resolved["optim"], max_steps=cfg.trainer.max_steps,
                                seq_len=plan.seq_len, micro_batch_size=plan.micro_batch_size, seed=cfg.seed,
                                compile=cfg.model.compile, tokenizer=str(data.tokenizer.path),
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


def report_removed_saves(folder: Path) -> None:
    """Remove what checkpoint saves killed half-way left in ``folder`` (see
    :func:`roberta_pl.checkpoints.remove_interrupted_saves`), saying so in one line."""
    removed = remove_interrupted_saves(folder)
    if removed:
        names = ", ".join(p.relative_to(folder).as_posix() for p in removed[:4]) + (", ..." if len(removed) > 4 else "")
        logging.getLogger("roberta_pl").info("Removed %d leftover(s) of checkpoint saves interrupted before they "
                                             "completed, in %s: %s", len(removed), folder, names)


@hydra.main(config_path=str(CONF_DIR), config_name="pretrain", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float | None:
    pin_multirun_job_for_rank_processes()
    summary = run(cfg, Path(HydraConfig.get().runtime.output_dir), own_process=True)
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
