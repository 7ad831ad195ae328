"""Shared test setup: offline W&B, a private cache, gpu-marked tests only where CUDA is present,
and the real data assets (corpus, tokenizer, shards) built once per session."""

import os

# One torch thread per test process (before torch is imported): the suite's models are tiny, so a second thread
# buys nothing, and on a 2-core machine running a 2-rank job (or anything else) the threads of two processes
# wait on each other; a tiny model's step measured 6x slower. Subprocesses and Slurm jobs inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

# Never reach a W&B server, and keep runs out of the user's home.
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_DISABLE_GIT", "true")

import sys  # noqa: E402
from pathlib import Path  # noqa: E402

# The shared helpers (fixtures, job scripts, fault callbacks) live in tests/helpers, one place for both suites.
sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))

from data_fixtures import corpus_docs, corpus_file, shard_dir, tok, tokenizer_dir  # noqa: E402,F401


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    no_cuda = pytest.mark.skip(reason="needs a CUDA GPU (none visible); run `make test-gpu` on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(no_cuda)


@pytest.fixture(scope="session", autouse=True)
def private_cache(tmp_path_factory):
    """Every test session gets its own cache (default corpus, tokenizer, shards), never ~/.cache."""
    path = tmp_path_factory.mktemp("roberta-pl-cache")
    old = os.environ.get("ROBERTA_PL_CACHE")
    os.environ["ROBERTA_PL_CACHE"] = str(path)
    yield path
    if old is None:
        os.environ.pop("ROBERTA_PL_CACHE", None)
    else:
        os.environ["ROBERTA_PL_CACHE"] = old


# -- reliability report: rows recorded by passing reliability tests, rendered to docs/reliability.md ------
from reliability_report import scrub, write_if_complete  # noqa: E402

_RELIABILITY_ROWS: dict[str, dict[str, str]] = {}


@pytest.fixture
def reliability():
    """``record(fault_id, happened=..., kept=...)``: call at the end of a test, after its assertions."""

    def record(fault_id: str, *, happened: str, kept: str) -> None:
        _RELIABILITY_ROWS[fault_id] = {"happened": scrub(happened), "kept": scrub(kept)}

    return record


def pytest_sessionfinish(session, exitstatus):
    # Rows come only from tests that passed, so a complete set is worth writing even when another test failed
    # (the committed copy's own check, for one, fails until it has been refreshed from this file).
    if _RELIABILITY_ROWS:
        write_if_complete(_RELIABILITY_ROWS)
