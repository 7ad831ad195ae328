"""Kill and resume: SIGKILL a real `roberta-pl-train` process at random steps, and while it writes a
checkpoint; every rerun resumes from its own checkpoints and ends bit for bit where an uninterrupted run
ends, having trained on exactly the same batches (so the same documents): none repeated, none skipped."""

from __future__ import annotations

import contextlib
import json
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

TESTS = Path(__file__).resolve().parents[1] / "helpers"  # on PYTHONPATH for subprocess runs
MAX_STEPS = 12
KILL_SEED = 8  # the "random" kill steps are drawn from this seed, so a failure can be replayed
STEP_CKPT = re.compile(r"step-(\d+)\.ckpt$")

pytestmark = pytest.mark.slow


def train_command(run_dir: Path, shard_dir: Path, tokenizer_dir: Path, callbacks: str) -> list[str]:
    """`python -m roberta_pl.pretraining.app` on the tiny model: a checkpoint every step, no validation, no export."""
    return [sys.executable, "-m", "roberta_pl.pretraining.app", *TINY, f"run_dir={run_dir}", f"data.train_shards={shard_dir}",
            f"data.tokenizer={tokenizer_dir}", f"trainer.max_steps={MAX_STEPS}", "checkpoint.every_n_steps=1",
            "checkpoint.keep=2", "trainer.val_every_n_steps=1000", "export_hf=false", "logger=none",
            f"trainer.callbacks=[{callbacks}]"]


def recorder(path: Path) -> str:
    return f"{{_target_:reliability_faults.RecordBatches,path:'{path}'}}"


def start(cmd: list[str], log: Path, new_session: bool = False) -> subprocess.Popen:
    # One thread each: the uninterrupted run shares the 2 CI cores with the killed ones (same setting in all
    # runs, so results stay bit-comparable). A new session makes the run (and its DDP ranks) one process group.
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=env, start_new_session=new_session)


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


# -- kills at random wall-clock moments ---------------------------------------------------------------
# The tests above kill only once a numbered checkpoint has appeared, so a run never resumed from a checkpoint
# written at any other moment. These kill at seeded random times: before the first step, between micro-batches
# of one accumulation window, inside validation, inside a save, and right after a resume.
RANDOM_STEPS = 36
RANDOM_KILL_SEED = 20261201


def random_kill_command(run_dir: Path, shard_dir: Path, tokenizer_dir: Path, *extra: str) -> list[str]:
    """Accumulation 2 (global 8 = micro 4 x 2), a checkpoint every 3 steps and validation every 4, so that
    most moments are not checkpoint moments. Every save is audited."""
    callbacks = (f"{recorder(run_dir / 'batches.jsonl')},{{_target_:reliability_faults.Slow,seconds:0.04}},"
                 f"{{_target_:reliability_faults.AuditCheckpoints,path:'{run_dir / 'saves.jsonl'}'}}")
    cmd = train_command(run_dir, shard_dir, tokenizer_dir, callbacks)
    cmd = [a for a in cmd if not a.startswith(("trainer.max_steps=", "checkpoint.", "trainer.val_every_n_steps="))]
    return [*cmd, f"trainer.max_steps={RANDOM_STEPS}", "checkpoint.every_n_steps=3", "checkpoint.keep=2",
            "trainer.val_every_n_steps=4", f"data.valid_shards={shard_dir}", *extra]


def assert_saves_on_step_boundaries(run_dir: Path) -> None:
    lines = [json.loads(x) for x in (run_dir / "saves.jsonl").read_text().splitlines() if x.strip()]
    bad = [x for x in lines if x["consumed"] != x["step"] * x["accumulation"]]
    assert not bad, f"checkpoints written inside an accumulation window: {bad}"


def wait_for_batches(log: Path, lines_before: int, count: int, proc: subprocess.Popen, timeout: float = 120) -> int:
    """Wait until this launch has started ``count`` micro-batches (the batch log grew by that many lines); the
    lines it has, or -1 if the process ended first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return -1
        lines = len(log.read_text().splitlines()) if log.exists() else 0
        if lines - lines_before >= count:
            return lines
        time.sleep(0.002)
    raise AssertionError(f"{count} micro-batches not started within {timeout} s")


def kill_at_random_moments(cmd: list[str], run_dir: Path, kills: int, seed: int, group: bool = False) -> list[str]:
    """Start ``cmd`` ``kills`` times and SIGKILL it (its process group with ``group``) at a seeded random moment:
    after a random number of this launch's micro-batches (so the run progresses whatever the machine's speed),
    plus a random fraction of a micro-batch in time, which lands the kill anywhere in a step: forward,
    backward, the optimizer step, a checkpoint save or validation. The first kill after a resume comes within
    its first three micro-batches. Returns what each kill interrupted, for the log."""
    rng = random.Random(seed)
    batches, log = run_dir / "batches.jsonl", run_dir / "log.txt"
    ranks = 2 if group else 1  # every rank records its micro-batches
    seen = []
    for i in range(kills):
        before = len(batches.read_text().splitlines()) if batches.exists() else 0
        proc = start(cmd, log, new_session=group)
        micro = rng.randint(1, 3) if i == 1 else rng.randint(8, 20)
        delay = rng.uniform(0.0, 0.08)
        if wait_for_batches(batches, before, micro * ranks, proc) < 0:
            raise AssertionError(f"launch {i} ended before its kill:\n{log.read_text()[-3000:]}")
        time.sleep(delay)
        assert proc.poll() is None, f"launch {i} finished before its kill; lengthen the run"
        os.killpg(proc.pid, signal.SIGKILL) if group else os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        last = run_dir / "checkpoints" / "last.ckpt"
        if last.is_dir():  # DeepSpeed: a directory; the Lightning part is in the model-states file
            last = next(iter(sorted(last.glob("checkpoint/*mp_rank_00_model_states.pt"))), last / "none")
        step = load(last)["global_step"] if last.exists() else None
        seen.append(f"{delay * 1000:.0f} ms after micro-batch {micro} of launch {i}: last.ckpt at step {step}")
    return seen


def test_checkpoints_are_never_written_inside_an_accumulation_window(tmp_path, shard_dir, tokenizer_dir):
    # The failure this guards against, deterministically: stop at step 3 (saved), resume, and the first
    # micro-batch after the restore used to write `step-0000003-v1.ckpt` and `last.ckpt` with 7 micro-batches
    # consumed but the weights of step 3 and no gradient.
    cmd = random_kill_command(tmp_path, shard_dir, tokenizer_dir)
    finish(start([*cmd, "trainer.stop_at_step=3"], tmp_path / "log.txt"), tmp_path / "log.txt")
    finish(start([*cmd, "trainer.stop_at_step=6"], tmp_path / "log.txt"), tmp_path / "log.txt")
    assert_saves_on_step_boundaries(tmp_path)
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert not [n for n in names if "-v" in n], names
    assert load(tmp_path / "checkpoints" / "last.ckpt")["MLMDataModule"]["consumed"] == 12


@pytest.fixture(scope="module")
def straight_random(tmp_path_factory, shard_dir, tokenizer_dir):
    run_dir = tmp_path_factory.mktemp("straight-random")
    finish(start(random_kill_command(run_dir, shard_dir, tokenizer_dir), run_dir / "log.txt"), run_dir / "log.txt")
    return load(run_dir / "checkpoints" / "last.ckpt"), surviving_batches(run_dir / "batches.jsonl")


def test_sigkill_at_random_moments_resumes_exactly(tmp_path, shard_dir, tokenizer_dir, straight_random, reliability):
    cmd = random_kill_command(tmp_path, shard_dir, tokenizer_dir)
    seen = kill_at_random_moments(cmd, tmp_path, kills=4, seed=RANDOM_KILL_SEED)
    print("kills:", *seen, sep="\n  ")
    finish(start(cmd, tmp_path / "log.txt"), tmp_path / "log.txt")
    assert_saves_on_step_boundaries(tmp_path)
    expected, expected_batches = straight_random
    got = load(tmp_path / "checkpoints" / "last.ckpt")
    assert got["global_step"] == RANDOM_STEPS
    assert_same_state(expected, got)
    batches = surviving_batches(tmp_path / "batches.jsonl")
    assert list(batches) == list(range(got["MLMDataModule"]["consumed"]))
    assert [b["batch"] for b in batches.values()] == [b["batch"] for b in expected_batches.values()]
    reliability("kill_random_moments",
                happened=f"SIGKILL at 4 seeded random moments (seed {RANDOM_KILL_SEED}; one within the first "
                         f"3 micro-batches after a resume), accumulation 2, checkpoints every 3 steps, validation every 4",
                kept="every checkpoint on an optimizer-step boundary; final parameters, AdamW moments, LR "
                     "schedule, data position and batch order equal to the uninterrupted run's bit for bit")


def straight_and_killed_group(tmp_path_factory, name: str, shard_dir: Path, tokenizer_dir: Path, extra: list[str],
                              seed: int) -> tuple[Path, Path]:
    """A multi-rank run twice: uninterrupted, and with its whole process group SIGKILLed at 2 seeded random
    moments and rerun to the end (every checkpoint audited). Returns both run directories."""
    straight_dir, killed_dir = tmp_path_factory.mktemp(f"{name}-straight"), tmp_path_factory.mktemp(f"{name}-killed")
    finish(start(random_kill_command(straight_dir, shard_dir, tokenizer_dir, *extra), straight_dir / "log.txt",
                 new_session=True), straight_dir / "log.txt")
    cmd = random_kill_command(killed_dir, shard_dir, tokenizer_dir, *extra)
    seen = kill_at_random_moments(cmd, killed_dir, kills=2, seed=seed, group=True)
    print("kills:", *seen, sep="\n  ")
    finish(start(cmd, killed_dir / "log.txt", new_session=True), killed_dir / "log.txt")
    assert_saves_on_step_boundaries(killed_dir)
    return straight_dir, killed_dir


def test_sigkill_of_two_ddp_ranks_at_random_moments_resumes_exactly(tmp_path_factory, shard_dir, tokenizer_dir,
                                                                   reliability):
    # 2 gloo ranks, accumulation 2 (global 16 = micro 4 x 2 x 2 ranks); the whole process group is killed.
    ddp = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2", "batch.global_batch_size=16"]
    straight_dir, killed_dir = straight_and_killed_group(tmp_path_factory, "ddp", shard_dir, tokenizer_dir, ddp,
                                                         seed=RANDOM_KILL_SEED + 1)
    got, expected = load(killed_dir / "checkpoints" / "last.ckpt"), load(straight_dir / "checkpoints" / "last.ckpt")
    assert got["global_step"] == RANDOM_STEPS and got["MLMDataModule"]["world_size"] == 2
    assert_same_state(expected, got)
    reliability("kill_random_moments_ddp",
                happened="2 DDP ranks (gloo), accumulation 2: the whole process group SIGKILLed at 2 seeded random "
                         "moments, then rerun to the end",
                kept="every checkpoint on an optimizer-step boundary; final state equal to the uninterrupted "
                     "2-rank run's bit for bit")


def test_sigusr1_checkpoints_at_the_next_step_boundary_and_resumes_exactly(tmp_path, shard_dir, tokenizer_dir,
                                                                          straight_random, reliability):
    # Slurm's warning signal (what `--signal=SIGUSR1@90` sends), here outside Slurm: the run finishes the
    # optimizer step in progress, saves last.ckpt there and stops cleanly; the rerun continues exactly.
    cmd = random_kill_command(tmp_path, shard_dir, tokenizer_dir)
    batches, log = tmp_path / "batches.jsonl", tmp_path / "log.txt"
    for micro in (7, 4):  # odd: the signal arrives inside an accumulation window
        before = len(batches.read_text().splitlines()) if batches.exists() else 0
        proc = start(cmd, log)
        assert wait_for_batches(batches, before, micro, proc) > 0
        os.kill(proc.pid, signal.SIGUSR1)
        assert proc.wait(timeout=120) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert text.count("Signal SIGUSR1: saved") == 2 and "; stopping" in text
    assert not (tmp_path / "hf").exists()  # stopped, not finished: nothing exported yet
    finish(start(cmd, log), log)
    # Each resume says what it continues from, in one line: checkpoint, step and data position.
    resumes = re.findall(r"Resuming from (\S+): step (\d+), data position (\d+) micro-batches per rank", log.read_text())
    assert len(resumes) == 2 and all(int(c) == 2 * int(s) and p.endswith("last.ckpt") for p, s, c in resumes), resumes
    assert_saves_on_step_boundaries(tmp_path)
    expected, expected_batches = straight_random
    got = load(tmp_path / "checkpoints" / "last.ckpt")
    assert_same_state(expected, got)
    assert [b["batch"] for b in surviving_batches(batches).values()] == [b["batch"] for b in expected_batches.values()]
    reliability("sigusr1_stop",
                happened="SIGUSR1 twice, each inside an accumulation window: the run finished that optimizer step, "
                         "saved last.ckpt and exited 0 (under Slurm it also runs `scontrol requeue`)",
                kept="every checkpoint on a step boundary; the resumed run equals the uninterrupted one bit for bit")


def _deepspeed_state(ckpt_dir: Path) -> dict[str, object]:
    """Every file of a DeepSpeed checkpoint directory (model states and each rank's optimizer partition)."""
    return {p.name: torch.load(p, map_location="cpu", weights_only=False)  # our own test files
            for p in sorted((ckpt_dir / "checkpoint").glob("*.pt"))}


def _assert_same_tree(a: object, b: object, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            if k not in ("ds_config", "ds_version", "callbacks"):  # callback states hold the run's own paths
                _assert_same_tree(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_tree(x, y, f"{where}[{i}]")


@pytest.mark.slow
def test_sigkill_of_a_two_rank_zero3_run_at_random_moments_resumes_exactly(tmp_path_factory, shard_dir, tokenizer_dir,
                                                                           reliability):
    # DeepSpeed ZeRO-3 on 2 CPU ranks (gloo), fp32, accumulation 2: checkpoint directories hold each rank's
    # partition of the parameters and AdamW moments; the whole process group is killed.
    zero = ["trainer=deepspeed_zero3", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
            "batch.global_batch_size=16"]
    straight_dir, killed_dir = straight_and_killed_group(tmp_path_factory, "zero", shard_dir, tokenizer_dir, zero,
                                                         seed=RANDOM_KILL_SEED + 2)
    assert (killed_dir / "log.txt").read_text().count("Resuming from") >= 1
    got, expected = _deepspeed_state(killed_dir / "checkpoints" / "last.ckpt"), _deepspeed_state(
        straight_dir / "checkpoints" / "last.ckpt")
    assert len(got) >= 3 and got.keys() == expected.keys()  # model states + one optimizer partition per rank
    model_states = next(v for k, v in got.items() if k.endswith("mp_rank_00_model_states.pt"))
    assert model_states["global_step"] == RANDOM_STEPS and model_states["MLMDataModule"]["consumed"] == RANDOM_STEPS * 2
    _assert_same_tree(got, expected)
    reliability("kill_random_moments_zero3",
                happened="DeepSpeed ZeRO-3 on 2 CPU ranks (gloo, fp32), accumulation 2: the whole process group "
                         "SIGKILLed at 2 seeded random moments, then rerun to the end",
                kept="every checkpoint on an optimizer-step boundary; every rank's parameter and AdamW-moment "
                     "partition, the step and the data position equal to the uninterrupted run's bit for bit")


def test_sigterm_to_the_whole_job_is_one_line_and_resumes_exactly(tmp_path, shard_dir, tokenizer_dir,
                                                                 straight_random, reliability):
    # What a requeue, scancel or preemption does: SIGTERM to every process of the job, DataLoader workers
    # included (data.num_workers=1). The run says so in one line, without a traceback per worker. (One worker
    # is one reader, as the in-process loader of the uninterrupted run is: the same data order.)
    cmd = [*random_kill_command(tmp_path, shard_dir, tokenizer_dir), "data.num_workers=1"]
    batches, log = tmp_path / "batches.jsonl", tmp_path / "log.txt"
    proc = start(cmd, log, new_session=True)
    assert wait_for_batches(batches, 0, 9, proc) > 0
    os.killpg(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 1
    text = log.read_text()
    assert "Traceback" not in text and "killed by signal" not in text, text[-3000:]
    assert text.strip().splitlines()[-1].startswith("roberta-pl-train: stopped by SIGTERM at step"), text[-2000:]
    finish(start(cmd, log, new_session=True), log)
    assert_saves_on_step_boundaries(tmp_path)
    expected, expected_batches = straight_random
    got = load(tmp_path / "checkpoints" / "last.ckpt")
    assert got["MLMDataModule"].pop("num_workers") == 1  # the one recorded setting that differs
    got["MLMDataModule"]["num_workers"] = expected["MLMDataModule"]["num_workers"]
    assert_same_state(expected, got)
    assert [b["batch"] for b in surviving_batches(batches).values()] == [b["batch"] for b in expected_batches.values()]
    reliability("sigterm_job",
                happened="SIGTERM to the whole process group (trainer and its DataLoader worker) mid-run: one line "
                         "`stopped by SIGTERM at step N`, no worker tracebacks; the rerun resumed",
                kept="the last checkpoint; the finished run equals the uninterrupted one bit for bit, same batches")
