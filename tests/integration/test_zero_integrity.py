"""Integrity of DeepSpeed ZeRO checkpoint directories, with real 2-rank CPU (gloo) runs of `roberta-pl-train`:

- a kill (SIGKILL to the whole process group) half-way through a save leaves the previous save whole: every rank's
  files of one step, which the rerun resumes from (the half-written one, and a killed single-file save's temporary
  file, are removed at the next start, in one line);
- no DeepSpeed checkpoint runs pickled code: a payload planted in a model-states or optimizer-state file is refused
  with one line naming the file by export, load_pretrained (fine-tuning, fill-mask, embed), resume and world-size
  conversion;
- `resume=` of something that is not a checkpoint is one line naming it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from zero_save_faults import Payload, file_step

from roberta_pl.checkpoints import (
    UnsafeCheckpointError,
    load_encoder,
    load_pretrained,
    load_zero_file,
    zero_tag_dir,
)

HELPERS = Path(__file__).resolve().parents[1] / "helpers"
BIN = Path(sys.executable).parent
KILL_SEED = 20261206  # the kill moments are drawn from this seed, so a failure can be replayed
TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64",
        "model.max_seq_len=64", "batch.seq_len=64", "batch.global_batch_size=8", "batch.micro_batch_size=2",
        "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", "trainer.log_every_n_steps=1",
        "trainer.enable_progress_bar=false", "data.num_workers=0", "fill_mask=[]", "logger=none", "export_hf=false",
        "trainer.val_every_n_steps=100", "checkpoint.every_n_steps=1"]

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    return {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1",
            "PYTHONPATH": os.pathsep.join([str(HELPERS), os.environ.get("PYTHONPATH", "")])}


def _command(run_dir: Path, shard_dir: Path, tokenizer_dir: Path, *extra: str) -> list[str]:
    return ["roberta-pl-train", *TINY, f"run_dir={run_dir}", f"data.train_shards={shard_dir}",
            f"data.tokenizer={tokenizer_dir}", *extra]


def _save_steps(ckpt: Path) -> dict[str, int]:
    """The step of every file of a ZeRO directory's current save (weights_only reads)."""
    tag = zero_tag_dir(ckpt)
    assert tag is not None, f"{ckpt} holds no completed save: {sorted(p.name for p in ckpt.iterdir())}"
    return {f.name: file_step(load_zero_file(f)) for f in sorted(tag.glob("*.pt"))}


def _lines(path: Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_sigkill_inside_zero_saves_always_leaves_one_consistent_step(tmp_path, shard_dir, tokenizer_dir, reliability):
    # ZeRO-2 on 2 ranks: a save is 3 files (rank 0's model states, then each rank's optimizer partition), each written
    # 0.3 s after the one before on its rank (SlowZeroSave). The whole job is killed after 1 or 2 files of a seeded
    # random `last.ckpt` save have been written: DeepSpeed wrote them over the previous save's, in place.
    events = tmp_path / "saves.jsonl"
    slow = f"trainer.callbacks=[{{_target_:zero_save_faults.SlowZeroSave,path:'{events}',seconds:0.3}}]"
    cmd = _command(tmp_path, shard_dir, tokenizer_dir, "trainer.max_steps=6", "checkpoint.keep=1", slow)
    cmd[1:1] = ["trainer=deepspeed_zero2"]  # the group before its overrides
    log, rng, seen = tmp_path / "log.txt", random.Random(KILL_SEED), []
    for launch in range(2):
        before = sum("last.ckpt" in json.loads(x)["file"] for x in events.read_text().splitlines()) if events.exists() else 0
        # The save of this launch (after the first launch's first: there is a `last` to keep) and its files written.
        save, written = rng.randint(1, 2) + (launch == 0), rng.randint(1, 2)
        target = before + (save - 1) * 3 + written
        proc = subprocess.Popen(cmd, stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=_env(), start_new_session=True)
        deadline = time.monotonic() + 300
        while sum("last.ckpt" in json.loads(x)["file"] for x in (events.read_text().splitlines() if events.exists() else [])) < target:
            assert proc.poll() is None, f"launch {launch} ended before its kill:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, "no save reached"
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.1))  # still before the save's next file (0.3 s away)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        steps = _save_steps(tmp_path / "checkpoints" / "last.ckpt")
        seen.append(f"launch {launch}: killed after {written} of the 3 files of its save {save} of last.ckpt; "
                    f"last.ckpt's files at steps {steps}")
        assert len(set(steps.values())) == 1 and len(steps) == 3, seen[-1]  # every rank's files of one step
    print(*seen, sep="\n")
    left = [p.name for p in (tmp_path / "checkpoints" / "last.ckpt").iterdir() if p.name.startswith("tag-")]
    assert len(left) == 2, left  # the current save and the half-written one
    # A killed single-file save's temporary file (AtomicCheckpointIO) goes too.
    (tmp_path / "checkpoints" / ".last.ckpt.tmp-4242").write_bytes(b"half a checkpoint")
    resumed_at = _save_steps(tmp_path / "checkpoints" / "last.ckpt")["mp_rank_00_model_states.pt"]
    proc = subprocess.run(cmd[:-1], capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert f"Resuming from {tmp_path / 'checkpoints' / 'last.ckpt'}: step {resumed_at}," in out, out[-3000:]
    removed = [line for line in out.splitlines() if "leftover(s) of checkpoint saves interrupted" in line]
    assert len(removed) == 1 and ".last.ckpt.tmp-4242" in removed[0] and "last.ckpt/tag-" in removed[0], out[-3000:]
    assert not (tmp_path / "checkpoints" / ".last.ckpt.tmp-4242").exists()
    for ckpt in (tmp_path / "checkpoints").iterdir():  # one save per directory, whole
        assert len([p for p in ckpt.iterdir() if p.name.startswith("tag-")]) == 1, sorted(ckpt.iterdir())
        assert len(set(_save_steps(ckpt).values())) == 1
    assert set(_save_steps(tmp_path / "checkpoints" / "last.ckpt").values()) == {6}
    reliability("zero_kill_inside_save",
                happened="DeepSpeed ZeRO-2 on 2 CPU ranks: the whole process group SIGKILLed twice between two files "
                         "of a `last.ckpt` save (seeded); each save goes to a fresh tag directory that `checkpoint` "
                         "is switched to only once every rank has written",
                kept=f"after every kill `last.ckpt` held every rank's files of one step; the rerun resumed from step "
                     f"{resumed_at} and finished; the half-written save and a killed single-file save's temporary "
                     f"file were removed at its start, in one line")


# -- no DeepSpeed checkpoint runs pickled code -------------------------------------------------------------------
@pytest.fixture(scope="module")
def zero3_checkpoint(tmp_path_factory, shard_dir, tokenizer_dir) -> Path:
    """`last.ckpt` of a 2-rank ZeRO-3 run of 2 steps: per-rank model states and optimizer partitions."""
    run = tmp_path_factory.mktemp("zero3")
    cmd = _command(run, shard_dir, tokenizer_dir, "trainer.max_steps=2", "checkpoint.every_n_steps=2")
    cmd[1:1] = ["trainer=deepspeed_zero3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run / "checkpoints" / "last.ckpt"


def _one_line(text: str, prog: str) -> str:
    last = text.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: ") and "Traceback" not in text, text[-3000:]
    return last


@pytest.mark.parametrize("kind", ["model_states", "optim_states"])
def test_a_payload_in_a_zero_checkpoint_never_runs(tmp_path, zero3_checkpoint, shard_dir, tokenizer_dir, kind,
                                                   reliability):
    from roberta_pl.cli.export import main as export_main
    from roberta_pl.strategies import ZeroStrategy, to_universal

    ckpt = tmp_path / "evil.ckpt"
    shutil.copytree(zero3_checkpoint, ckpt, symlinks=True)
    evil, marker = zero_tag_dir(ckpt) / f"zero_pp_rank_1_mp_rank_00_{kind}.pt", tmp_path / "pwned"
    state = load_zero_file(evil, mmap=False)
    state["payload"] = Payload(marker)
    torch.save(state, evil)
    name = str(evil.relative_to(ckpt))

    with pytest.raises(SystemExit) as exc:  # roberta-pl-export
        export_main([str(ckpt), str(tmp_path / "hf")])
    message = str(exc.value)
    assert message.startswith("roberta-pl-export: error: ") and name in message and "\n" not in message, message
    for load in (load_pretrained, load_encoder):  # fill-mask, embed; fine-tuning's pretrained= (load_encoder)
        with pytest.raises(UnsafeCheckpointError, match="(?i)unsupported global") as exc:
            load(ckpt)
        assert name in str(exc.value) and "\n" not in str(exc.value)
    with pytest.raises(UnsafeCheckpointError, match=name):  # world-size conversion (rank 0 converts)
        to_universal(ckpt, 1, 0, lambda *_: None)
    with pytest.raises(UnsafeCheckpointError, match=name):  # the strategy's load, before DeepSpeed's engine reads
        ZeroStrategy(config={"zero_optimization": {"stage": 3}}).load_checkpoint(ckpt)
    # Resume, as a user runs it on 2 ranks (refused before any rank starts training).
    cmd = _command(tmp_path / "run", shard_dir, tokenizer_dir, "trainer.max_steps=4", f"resume={ckpt}")
    cmd[1:1] = ["trainer=deepspeed_zero3"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env())
    resume = _one_line(proc.stderr, "roberta-pl-train")
    assert proc.returncode == 1 and name in resume and "cannot be loaded safely" in resume, resume
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is real: a full unpickle runs it
    assert marker.exists()
    reliability(f"zero_payload_{kind}",
                happened=f"a pickle payload in a ZeRO-3 checkpoint's rank-1 {kind} file: export, load_pretrained "
                         f"(fine-tuning, fill-mask, embed), the strategy's load, world-size conversion and "
                         f"`resume=` each refused it: `{resume}`",
                kept="no code ran (the payload's marker file was never created); the checkpoint untouched")


# -- resume= of something that is not a checkpoint ---------------------------------------------------------------
def test_resume_of_a_non_checkpoint_is_one_line(tmp_path, shard_dir, tokenizer_dir, reliability):
    from test_pretrain import TINY as CPU_TINY
    from test_pretrain import compose_cfg

    from roberta_pl.pretraining.app import run

    folder = tmp_path / "not-a-checkpoint"
    folder.mkdir()
    (folder / "notes.txt").write_text("hello")
    text, tensors = tmp_path / "notes.ckpt", tmp_path / "weights.pt"
    text.write_text("not a checkpoint\n")
    torch.save({"weight": torch.zeros(2)}, tensors)
    messages = []
    for target, expected in ((folder, "not a DeepSpeed checkpoint directory"),
                             (text, "cannot be loaded safely"), (tensors, "not a pretraining checkpoint")):
        with pytest.raises(SystemExit) as exc:
            run(compose_cfg([*CPU_TINY, f"data.train_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}",
                             f"resume={target}"]), tmp_path / f"run-{target.name}")
        message = str(exc.value)
        assert message.startswith("roberta-pl-train: error: resume") and str(target) in message, message
        assert expected in message and "\n" not in message, message
        assert not (tmp_path / f"run-{target.name}" / "checkpoints").exists()
        messages.append(message)
    reliability("resume_not_a_checkpoint",
                happened="`resume=` a directory that is not a DeepSpeed checkpoint, a text file, a torch file of bare "
                         f"tensors: each refused before training in one line, e.g. `{messages[0]}`",
                kept="the files named, untouched; nothing was started")
