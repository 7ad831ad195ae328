"""Kill and resume: SIGKILL a real `roberta-pl-train` process at random steps, and while it writes a
checkpoint; every rerun resumes from its own checkpoints and ends bit for bit where an uninterrupted run
ends, having trained on exactly the same batches (so the same documents): none repeated, none skipped."""

from __future__ import annotations

import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from reliability_faults import surviving_batches
from test_pretrain import TINY

TESTS = Path(__file__).resolve().parent
MAX_STEPS = 12
KILL_SEED = 8  # the "random" kill steps are drawn from this seed, so a failure can be replayed
STEP_CKPT = re.compile(r"step-(\d+)\.ckpt$")

pytestmark = pytest.mark.slow


def train_command(run_dir: Path, shard_dir: Path, tokenizer_dir: Path, callbacks: str) -> list[str]:
    """`python -m roberta_pl.train` on the tiny model: a checkpoint every step, no validation, no export."""
    return [sys.executable, "-m", "roberta_pl.train", *TINY, f"run_dir={run_dir}", f"data.train_shards={shard_dir}",
            f"data.tokenizer={tokenizer_dir}", f"trainer.max_steps={MAX_STEPS}", "checkpoint.every_n_steps=1",
            "checkpoint.keep=2", "trainer.val_every_n_steps=1000", "export_hf=false", "logger=none",
            f"trainer.callbacks=[{callbacks}]"]


def recorder(path: Path) -> str:
    return f"{{_target_:reliability_faults.RecordBatches,path:'{path}'}}"


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    # One thread each: the uninterrupted run shares the 2 CI cores with the killed ones (same setting in all
    # runs, so results stay bit-comparable).
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env)


def finish(proc: subprocess.Popen, log: Path) -> None:
    assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]


def saved_steps(run_dir: Path) -> list[int]:
    folder = run_dir / "checkpoints"
    return sorted(int(m.group(1)) for p in (folder.iterdir() if folder.exists() else []) if (m := STEP_CKPT.search(p.name)))


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k  # bit for bit on CPU
    sa, sb = a["optimizer_states"][0], b["optimizer_states"][0]
    assert sa["state"].keys() == sb["state"].keys()
    for i in sa["state"]:
        for k, v in sa["state"][i].items():
            assert torch.equal(v, sb["state"][i][k]), (i, k)
    assert sa["param_groups"] == sb["param_groups"]
    assert a["lr_schedulers"] == b["lr_schedulers"]
    assert a["MLMDataModule"] == b["MLMDataModule"]


@pytest.fixture(scope="module")
def straight(tmp_path_factory, shard_dir, tokenizer_dir):
    """The uninterrupted run, started in the background: tests that need it call `.result()`."""
    run_dir = tmp_path_factory.mktemp("straight")
    record = run_dir / "batches.jsonl"
    proc = start(train_command(run_dir, shard_dir, tokenizer_dir, recorder(record)), run_dir / "log.txt")

    class Straight:
        def result(self) -> tuple[dict, dict]:
            if proc.returncode is None:
                finish(proc, run_dir / "log.txt")
            return load(run_dir / "checkpoints" / "last.ckpt"), surviving_batches(record)

    yield Straight()
    if proc.returncode is None:
        proc.kill()


def test_sigkill_at_three_random_steps_resumes_exactly(tmp_path, shard_dir, tokenizer_dir, straight, reliability):
    kills = sorted(random.Random(KILL_SEED).sample(range(2, MAX_STEPS - 1), 3))
    print(f"kill steps (seed {KILL_SEED}): {kills}")
    record = tmp_path / "batches.jsonl"
    cmd = train_command(tmp_path, shard_dir, tokenizer_dir, recorder(record))
    resumed_from = []
    for step in kills:
        proc = start(cmd, tmp_path / "log.txt")
        while not (saved_steps(tmp_path) and saved_steps(tmp_path)[-1] >= step):
            assert proc.poll() is None, f"finished before the kill at step {step}"
            time.sleep(0.005)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        resumed_from.append(load(tmp_path / "checkpoints" / "last.ckpt")["global_step"])
    print(f"killed with last.ckpt at steps {resumed_from}")
    # `step-k` is written just before `last`, so a kill between the two resumes from k - 1.
    assert all(k - 1 <= r for k, r in zip(kills, resumed_from)) and resumed_from == sorted(resumed_from)
    finish(start(cmd, tmp_path / "log.txt"), tmp_path / "log.txt")
    log = (tmp_path / "log.txt").read_text()
    assert log.count("Resuming from") == len(kills)

    expected, expected_batches = straight.result()
    got = load(tmp_path / "checkpoints" / "last.ckpt")
    assert got["global_step"] == MAX_STEPS
    assert_same_state(expected, got)
    batches = surviving_batches(record)
    # Exactly once: every micro-batch index of the run trained on, each on the same batch (same blocks of
    # the same documents, same masks) as the uninterrupted run; the killed processes' uncheckpointed
    # batches were trained on again by the rerun, which is what a resume must do.
    assert list(batches) == list(range(got["MLMDataModule"]["consumed"]))
    assert [b["batch"] for b in batches.values()] == [b["batch"] for b in expected_batches.values()]
    blocks = [d for b in batches.values() for d in b["blocks"]]
    assert len(blocks) == len(set(blocks)), "a token block was trained on twice"
    reliability("kill_resume",
                happened=f"killed after the checkpoints of steps >= {kills}; each rerun printed `Resuming from "
                         f"last.ckpt` and the last one finished all {MAX_STEPS} steps",
                kept=f"final parameters, AdamW moments, LR schedule and data position equal to the uninterrupted "
                     f"run's bit for bit; the same {len(batches)} micro-batches in the same order, no token block "
                     f"twice, none left out")


def test_sigkill_during_checkpoint_save_keeps_last_loadable(tmp_path, shard_dir, tokenizer_dir, straight, reliability):
    # Ballast makes every checkpoint 64 MB, so a save lasts long enough to catch (the rerun goes without). The test freezes the
    # process (SIGSTOP) when a temporary `last.ckpt` appears; if it is still there, the process is inside the
    # save and gets SIGKILL; if the rename won the race, the process continues (SIGCONT) to its next save.
    cmd = train_command(tmp_path, shard_dir, tokenizer_dir, recorder(tmp_path / "batches.jsonl"))
    folder = tmp_path / "checkpoints"
    proc = start([*cmd[:-1], "trainer.callbacks=[{_target_:reliability_faults.Ballast}]"], tmp_path / "log.txt")
    caught = None
    while caught is None:
        assert proc.poll() is None, "the run finished without a save being caught half-way"
        if not (folder / "last.ckpt").exists():
            time.sleep(0.005)
            continue
        temps = [p for p in folder.iterdir() if p.name.startswith(".last.ckpt.tmp-")]
        if not temps:
            continue
        os.kill(proc.pid, signal.SIGSTOP)
        with contextlib.suppress(FileNotFoundError):  # half-written: smaller than the last whole one
            if temps[0].stat().st_size < 0.9 * (folder / "last.ckpt").stat().st_size:
                caught = temps[0]
                os.kill(proc.pid, signal.SIGKILL)
        os.kill(proc.pid, signal.SIGCONT)
    proc.wait()
    previous = load(folder / "last.ckpt")  # the previous `last` is whole: weights_only load succeeds
    assert previous["global_step"] >= 1
    with pytest.raises(Exception):
        load(caught)  # what the kill left half-written, under a name nothing loads
    print(f"killed inside the save after step {previous['global_step']}: temp file {caught.stat().st_size} bytes")
    finish(start(cmd, tmp_path / "log.txt"), tmp_path / "log.txt")
    expected, _ = straight.result()
    final = load(folder / "last.ckpt")
    assert_same_state(expected, final)
    reliability("kill_during_save",
                happened="killed while `torch.save` was writing the temporary file; `last.ckpt` was never "
                         "replaced by a partial file, and the rerun resumed from it",
                kept="the previous `last.ckpt` (loads with `weights_only=True`); the finished run equals the "
                     "uninterrupted one bit for bit")
