"""The embedded default corpus's cache: one entry per exact Python and torch version, its content checked against
the sha256 recorded when it was built, and a build that is not the reference for its versions refused. And the
portable way a DataLoader worker dies with its parent where prctl is not there."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import psutil
import pytest

import data_pipelines.corpus as corpus_mod
from data_pipelines.corpus import default_corpus, default_corpus_path
from data_pipelines.errors import DataError

SMALL = 100_000  # bytes: a corpus built in about a second


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ROBERTA_PL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_python_patch_releases_never_share_a_cache_entry(monkeypatch):
    names = {}
    for version in ("3.11.2", "3.11.7"):
        monkeypatch.setattr("platform.python_version", lambda: version)
        names[version] = default_corpus_path(SMALL).name
    assert names["3.11.2"] != names["3.11.7"] and "py3.11.7-" in names["3.11.7"]


def test_a_cached_corpus_that_changed_since_it_was_built_is_an_error(cache):
    path = default_corpus(SMALL)
    assert default_corpus(SMALL) == path  # reused, and its record matches
    path.write_text(path.read_text() + "A document that another Python version would not have written.\n\n")
    with pytest.raises(DataError, match=r"cached default corpus has sha256 \w+\.\.\., not the \w+\.\.\. recorded when "
                                        r"it was built") as exc:
        default_corpus(SMALL)
    assert str(path) in str(exc.value) and "\n" not in str(exc.value)


def test_a_cached_corpus_without_its_record_is_an_error(cache):
    path = default_corpus(SMALL)
    path.with_name(path.name + ".sha256").unlink()
    with pytest.raises(DataError, match=r"no record of its sha256"):
        default_corpus(SMALL)


def test_a_build_that_differs_from_the_reference_for_its_versions_is_an_error_and_not_cached(cache, monkeypatch):
    monkeypatch.setattr(corpus_mod, "REFERENCE_CORPUS_SHA256", {corpus_mod.corpus_key(SMALL): "0" * 64})
    with pytest.raises(DataError, match=r"the default corpus built here has sha256 \w+\.\.\., not the 000000000000\.\.\. "
                                        r"recorded for Python") as exc:
        default_corpus(SMALL)
    assert "\n" not in str(exc.value)
    assert list(cache.iterdir()) == []  # nothing a later run would take for a checked corpus


ORPHAN = textwrap.dedent("""
    import os, sys, time
    from data_pipelines.loaders import exit_with_parent
    sys.platform = "darwin"  # no prctl: the portable watchdog
    r, w = os.pipe()
    if os.fork() == 0:  # the "worker"
        how = exit_with_parent(os.getppid(), poll_s=0.05)
        os.write(w, f"{os.getpid()} {how}\\n".encode())
        time.sleep(300)  # busy forever: only the watchdog can end it
        os._exit(0)
    sys.stdout.write(os.read(r, 100).decode())
    sys.stdout.flush()
    os._exit(0)  # the parent dies at once, as a SIGKILLed one would
""")


def test_without_prctl_a_watchdog_thread_ends_the_worker_when_its_parent_dies():
    out = subprocess.run([sys.executable, "-c", ORPHAN], capture_output=True, text=True, timeout=120)
    pid, how = out.stdout.split()
    assert how == "watchdog", out
    worker = psutil.Process(int(pid))
    deadline = time.monotonic() + 30  # how long we wait, not how long it takes (the watchdog polls every 0.05 s)
    while not _gone(worker) and time.monotonic() < deadline:
        time.sleep(0.05)
    if not _gone(worker):
        worker.kill()
        pytest.fail(f"the orphaned worker {pid} outlived its parent")


def _gone(process: psutil.Process) -> bool:
    try:
        return process.status() == psutil.STATUS_ZOMBIE  # exited; its new parent has not reaped it yet
    except psutil.NoSuchProcess:
        return True
