"""The run skeleton both entry points share (``roberta-pl-train``, ``roberta-pl-finetune``).

A run is compose -> check -> prepare -> trainer -> module -> fit -> finish. :func:`run` does those steps in that
order for a :class:`RunSpec`, the few functions an entry point supplies (like lightning-hydra-template's task
wrapper), and :func:`entry_point` makes the Hydra command of a spec. What wraps the steps is written once here:
unknown keys and ``_target_``s are refused before any work, errors a user can fix end the run with one line
(``prog: error: ...``) and no traceback, whatever happened the process is left as the run found it (W&B runs
finished, process group destroyed, environment restored, so the next job of a multirun starts clean), and
Lightning's extra DDP ranks re-run the right multirun job.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from roberta_pl.batch_plan import BatchPlanError
from roberta_pl.errors import ConfigError, TrainingFault
from roberta_pl.lightning_compat import wandb_run_started


@dataclass
class Run:
    """What a run knows, filled in step by step: the spec's functions read and write it."""

    cfg: DictConfig
    out_dir: Path
    own_process: bool = False  # the process exists for this run (the CLI): process-wide tuning is allowed
    plan: Any = None  # the batch plan, from the spec's check
    resolved: dict | None = None  # the config as plain data (enums as strings), for loggers and checkpoints
    summary: dict | None = None  # set by prepare when there is nothing to train (a finished run)
    trainer: pl.Trainer | None = None
    module: pl.LightningModule | None = None
    datamodule: pl.LightningDataModule | None = None
    fit_args: dict = field(default_factory=dict)  # extra pl.Trainer.fit arguments (ckpt_path, ...)
    parts: SimpleNamespace = field(default_factory=SimpleNamespace)  # what prepare found (data, encoder, ...)
    after_end: list = field(default_factory=list)  # callables run once the run has ended (a Slurm requeue)


@dataclass(frozen=True)
class RunSpec:
    """An entry point's part of the skeleton.

    Attributes:
        prog: the command's name, in its one-line errors.
        schema: the config schema; keys outside it are refused.
        check: refuse a config that cannot run, before any work; returns the batch plan.
        prepare: load what the run needs (data, a pretrained model, a checkpoint to resume) into ``run.parts``;
            set ``run.summary`` to end the run here.
        trainer: build the ``pl.Trainer``.
        module: build ``run.module`` and ``run.datamodule`` (and ``run.fit_args``); the seed is set before.
        finish: after fit, write the outputs; returns the run's summary.
    """

    prog: str
    schema: type
    check: Callable[[Run], Any]
    prepare: Callable[[Run], None]
    trainer: Callable[[Run], pl.Trainer]
    module: Callable[[Run], None]
    finish: Callable[[Run], dict]


def run(spec: RunSpec, cfg: DictConfig, out_dir: Path, overrides: Sequence[str] | None = None,
        own_process: bool = False) -> dict:
    """Check -> prepare -> trainer -> module -> fit -> finish, for one composed config. Returns the run's summary.

    ``overrides`` are the user's command-line overrides, the only place besides ``conf/`` a ``_target_`` may come
    from (default: the ones Hydra recorded; see :mod:`roberta_pl.safety`)."""
    from roberta_pl.config import check_known_keys
    from roberta_pl.safety import check_hydra_targets

    r = Run(cfg, out_dir, own_process)
    with run_scope(spec.prog, out_dir) as scope:
        r.after_end = scope.after_end
        check_known_keys(cfg, spec.schema)
        check_hydra_targets(cfg, overrides)
        r.plan = spec.check(r)
        spec.prepare(r)
        if r.summary is not None:
            return r.summary
        r.resolved = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
        r.trainer = scope.trainer = spec.trainer(r)
        pl.seed_everything(cfg.seed, workers=True)
        spec.module(r)
        r.trainer.fit(r.module, datamodule=r.datamodule, **r.fit_args)
        return spec.finish(r)


def entry_point(spec: RunSpec, config_name: str, register: Callable[[], None],
                objective: Callable[[DictConfig, dict], float | None]) -> Callable[[], None]:
    """The ``main`` of a Hydra command running ``spec``: ``conf/<config_name>.yaml`` over the schemas ``register``
    stores. ``objective(cfg, summary)`` is the value a sweeper (Optuna) minimises."""
    import hydra

    from roberta_pl.config import CONF_DIR, check_override_keys
    from roberta_pl.loggers import quiet_notices

    def task(cfg: DictConfig) -> float | None:
        pin_multirun_job_for_rank_processes()
        summary = run(spec, cfg, Path(HydraConfig.get().runtime.output_dir), own_process=True)
        return objective(cfg, summary)

    def main() -> None:
        quiet_notices()
        register()
        if not CONF_DIR.is_dir():
            sys.exit(f"{spec.prog}: error: config directory {CONF_DIR} not found (install with `pip install -e .`)")
        try:  # a misspelt key gets "did you mean", not Hydra's advice to add it with `+`
            check_override_keys(sys.argv[1:], spec.schema)
        except ConfigError as e:
            raise SystemExit(f"{spec.prog}: error: {e}") from None
        hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")(task)()

    return main


@contextlib.contextmanager
def run_scope(prog: str, out_dir: Path | None = None) -> Iterator[SimpleNamespace]:
    """Run the body as one run: set ``scope.trainer`` once it exists; append to ``scope.after_end`` what must
    wait until the run has ended (W&B runs finished, process group destroyed), e.g. a Slurm requeue.

    :class:`ConfigError`, :class:`BatchPlanError`, data errors and :class:`TrainingFault` become
    ``SystemExit("<prog>: error: <one line>")``; checkpoints written so far are kept. A run refused that way leaves
    no ``out_dir`` behind if it holds nothing but what Hydra wrote on start (its config record and log).
    """
    from data_pipelines.errors import DataError

    environ = dict(os.environ)  # restored at the end: W&B and Lightning's launcher both write to it
    scope = SimpleNamespace(trainer=None, after_end=[])  # after_end: callables run once the run has ended
    try:
        yield scope
    except (ConfigError, BatchPlanError, DataError, TrainingFault) as e:
        if out_dir is not None and scope.trainer is None:
            remove_if_only_hydra(out_dir)
        raise SystemExit(f"{prog}: error: {one_line(e)}") from None
    except SIGTERMException:  # Lightning's, at the next batch after SIGTERM (a requeue, scancel, preemption)
        step = scope.trainer.global_step if scope.trainer is not None else 0
        raise SystemExit(f"{prog}: stopped by SIGTERM at step {step} (a Slurm requeue, scancel or preemption); "
                         f"the last checkpoint is kept, and rerunning the command (or the requeued job) resumes "
                         f"from it") from None
    finally:
        end_run(scope.trainer, environ)
        for action in scope.after_end:
            action()


def remove_if_only_hydra(out_dir: Path) -> None:
    """Remove a default run directory (``runs/<name>``) that holds only Hydra's start-up files (``.hydra/``,
    ``<job>.log``): a refused config leaves no empty ``runs/default`` behind. A directory anywhere else (a
    ``run_dir`` the user chose, which may have existed before) is left alone, as is one holding anything else."""
    import shutil

    if out_dir.parent.name != "runs":
        return
    try:
        entries = list(out_dir.iterdir())
    except OSError:
        return
    if all((e.name == ".hydra" and e.is_dir()) or (e.suffix == ".log" and e.is_file()) for e in entries):
        shutil.rmtree(out_dir, ignore_errors=True)
        with contextlib.suppress(OSError):
            out_dir.parent.rmdir()  # runs/ itself, when this run was all it held


def one_line(error: BaseException) -> str:
    """The message of an error, as one line. An error raised in a DataLoader worker arrives wrapped in
    the worker's traceback; its last line holds the original message."""
    text = str(error).strip()
    if "Original Traceback" in text:
        last = text.splitlines()[-1]
        name, sep, message = last.partition(": ")
        text = message if sep and name.split(".")[-1] == type(error).__name__ else last
    return " ".join(text.split())


def end_run(trainer: pl.Trainer | None, environ: dict[str, str]) -> None:
    """Leave the process as the run found it, so the next job of a multirun starts clean: finish W&B runs
    (their offline files are then complete), destroy the process group, and drop the rank variables
    (LOCAL_RANK, MASTER_PORT, ...) that Lightning's launcher set, which would make the next Trainer think
    an external launcher had started it."""
    import torch.distributed as dist
    from lightning.pytorch.loggers import WandbLogger

    for logger in trainer.loggers if trainer is not None else []:
        if isinstance(logger, WandbLogger) and trainer.is_global_zero and wandb_run_started(logger):
            logger.experiment.finish()
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    os.environ.clear()
    os.environ.update(environ)


def pin_multirun_job_for_rank_processes() -> None:
    """Make Lightning's extra DDP ranks re-run *this* multirun job, not the whole sweep.

    Lightning starts ranks 1..N-1 by re-running ``sys.argv`` with ``hydra.run.dir`` set to the parent's
    run dir. In a multirun that argv holds ``-m`` and every swept value, and ``run.dir`` is not the job's
    directory, so each rank would start the sweep again elsewhere. Pin both to the current job.
    """
    from hydra.types import RunMode
    from omegaconf import read_write

    hc = HydraConfig.get()
    if hc.mode == RunMode.MULTIRUN:
        sys.argv = [sys.argv[0], *hc.overrides.task]
        with read_write(hc.run):
            hc.run.dir = hc.runtime.output_dir
