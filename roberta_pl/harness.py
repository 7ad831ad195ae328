"""The run skeleton both entry points share (``roberta-pl-train``, ``roberta-pl-finetune``).

Each entry point is compose -> check -> build -> fit -> finish; what wraps those steps is written once here:
errors a user can fix end the run with one line (``prog: error: ...``) and no traceback, whatever happened the
process is left as the run found it (W&B runs finished, process group destroyed, environment restored, so
the next job of a multirun starts clean), and Lightning's extra DDP ranks re-run the right multirun job.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from types import SimpleNamespace

import lightning.pytorch as pl
from hydra.core.hydra_config import HydraConfig
from lightning.pytorch.utilities.exceptions import SIGTERMException

from roberta_pl.errors import ConfigError, TrainingFault
from roberta_pl.lightning_compat import wandb_run_started
from roberta_pl.optim import BatchPlanError


@contextlib.contextmanager
def run_scope(prog: str) -> Iterator[SimpleNamespace]:
    """Run the body as one run: set ``scope.trainer`` once it exists; append to ``scope.after_end`` what must
    wait until the run has ended (W&B runs finished, process group destroyed), e.g. a Slurm requeue.

    :class:`ConfigError`, :class:`BatchPlanError`, data errors and :class:`TrainingFault` become
    ``SystemExit("<prog>: error: <one line>")``; checkpoints written so far are kept.
    """
    from data_pipelines.errors import DataError

    environ = dict(os.environ)  # restored at the end: W&B and Lightning's launcher both write to it
    scope = SimpleNamespace(trainer=None, after_end=[])  # after_end: callables run once the run has ended
    try:
        yield scope
    except (ConfigError, BatchPlanError, DataError, TrainingFault) as e:
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
