"""What a user sees: library deprecation notices stay out of the output, warnings from roberta-pl stay in.

``roberta_pl.loggers.quiet_notices`` (called by every entry point's ``main``) drops named library warnings by
message, category and the module that raises them. A 40-step ZeRO-2 run on 2 CPU ranks printed 160 lines of
torch's FutureWarning about ``all_gather_into_tensor`` (DeepSpeed's call, at every step on every rank) before it.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from roberta_pl.loggers import quiet_notices

BIN = Path(sys.executable).parent
LIBRARY_WARNING = re.compile(r"\b(DeprecationWarning|FutureWarning)\b")


@pytest.fixture
def quiet():
    """``quiet_notices()`` inside ``catch_warnings``; the loggers it touches are put back afterwards."""
    names = ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero",
             "lightning.fabric.utilities.seed", "compilers.C.base")
    kept = {name: (list(logging.getLogger(name).filters), logging.getLogger(name).level) for name in names}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        quiet_notices()
        yield caught
    for name, (filters, level) in kept.items():
        logging.getLogger(name).filters[:] = filters
        logging.getLogger(name).setLevel(level)


def _deprecated_all_gather() -> None:
    """torch's own deprecated call, as DeepSpeed makes it (no process group here: it warns, then raises)."""
    with pytest.raises((ValueError, RuntimeError)):
        torch.distributed.all_gather_into_tensor(torch.zeros(2), torch.zeros(1))


def test_the_all_gather_deprecation_is_dropped_and_warnings_from_roberta_pl_are_kept(quiet):
    _deprecated_all_gather()
    assert not [w for w in quiet if "all_gather_into_tensor" in str(w.message)], [str(w.message) for w in quiet]
    # The same words raised from our own module, and another FutureWarning from torch's module, still show.
    message = "`torch.distributed.all_gather_into_tensor` is deprecated. Please use `all_gather_single` instead."
    warnings.warn_explicit(message, FutureWarning, "strategies.py", 1, module="roberta_pl.strategies")
    warnings.warn_explicit("another deprecation", FutureWarning, "c10d_logger.py", 83,
                           module="torch.distributed.c10d_logger")
    srun = "The `srun` command is available on your system but is not used."
    warnings.warn_explicit(srun, UserWarning, "slurm.py", 204, module="lightning.fabric.plugins.environments.slurm")
    warnings.warn_explicit(srun, UserWarning, "app.py", 1, module="roberta_pl.pretraining.app")
    assert [(w.category, str(w.message)) for w in quiet] == [
        (FutureWarning, message), (FutureWarning, "another deprecation"), (UserWarning, srun)]


def test_without_quiet_notices_torch_warns_about_the_all_gather():
    # The other half of the test above: when this fails, torch no longer deprecates the call (or DeepSpeed's
    # ZeRO moved to all_gather_single) and its filter in quiet_notices can go.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _deprecated_all_gather()
    assert [w for w in caught if w.category is FutureWarning and "all_gather_into_tensor" in str(w.message)]


@pytest.mark.slow
def test_a_zero_run_on_two_cpu_ranks_prints_no_deprecation_warnings(tmp_path, shard_dir, tokenizer_dir):
    """``roberta-pl-train trainer=deepspeed_zero2`` as a user runs it (Lightning starts the second rank by running
    the command again), through a validation and a ZeRO checkpoint save: no DeprecationWarning or FutureWarning
    line on either stream. Every category is shown once per place, as ``python -W default`` does, so that a
    DeprecationWarning (hidden by default outside ``__main__``) can fail this too."""
    cmd = ["roberta-pl-train", "trainer=deepspeed_zero2", "trainer.accelerator=cpu", "trainer.devices=2",
           "model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64",
           "model.max_seq_len=64", "batch.seq_len=64", "batch.global_batch_size=8", "batch.micro_batch_size=2",
           "trainer.max_steps=4", "trainer.val_every_n_steps=2", "trainer.limit_val_batches=1",
           "trainer.enable_progress_bar=false", "data.num_workers=0", "fill_mask=[]", "export_hf=false",
           "logger=none", f"data.train_shards={shard_dir}", f"data.valid_shards={shard_dir}",
           f"data.tokenizer={tokenizer_dir}", f"run_dir={tmp_path / 'run'}"]
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
           "PYTHONWARNINGS": "default"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Done: 4 steps" in proc.stdout, proc.stdout[-3000:]
    noisy = [line for line in (proc.stderr + proc.stdout).splitlines() if LIBRARY_WARNING.search(line)]
    assert not noisy, "\n".join(noisy)
