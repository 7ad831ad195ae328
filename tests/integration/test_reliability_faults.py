"""Bad data, numerical faults, resource faults and unsafe inputs, each through the real entry point
(`roberta_pl.pretraining.app.run` or the `roberta_pl.pretraining.app` process): what it does, and what it keeps."""

from __future__ import annotations

import io
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from reliability_report import scrub
from test_pretrain import TINY, compose_cfg

from data_pipelines.errors import DataError, SkipReport
from data_pipelines.epochs import epoch_order
from data_pipelines.shard_format import iter_shard
from data_pipelines.shards import write_shards
from data_pipelines.stream import StreamConfig
from data_pipelines.tokenizer import train_tokenizer
from roberta_pl.checkpoints import load_pretrained
from roberta_pl.pretraining.app import run

TESTS = Path(__file__).resolve().parents[1] / "helpers"  # on PYTHONPATH for subprocess runs
SEED = 1234  # conf/pretrain: the run's seed, which orders the shards
FAST = ["trainer.val_every_n_steps=1000", "export_hf=false", "logger=csv", "checkpoint.every_n_steps=1"]

pytestmark = pytest.mark.slow


def train(out_dir: Path, overrides: list[str]) -> dict:
    """`run` as the command line would: the overrides are also the ones `_target_`s may come from."""
    overrides = [*TINY, *FAST, *overrides]
    return run(compose_cfg(overrides), out_dir, overrides=overrides)


def fails(out_dir: Path, overrides: list[str]) -> str:
    """The one-line error a run stops with."""
    with pytest.raises(SystemExit) as exc:
        train(out_dir, overrides)
    message = str(exc.value)
    assert message.startswith("roberta-pl-train: error: ") and "\n" not in message, message
    return message


def inject(value: str, steps: list[int]) -> str:
    return f"trainer.callbacks=[{{_target_:reliability_faults.NonFiniteLossAt,steps:{steps},value:{value}}}]"


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# -- corrupt data ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small_shards(tmp_path_factory, corpus_docs, tokenizer_dir) -> Path:
    """8 train shards of 15 documents: small enough that one epoch reads every shard."""
    out = tmp_path_factory.mktemp("small") / "shards"
    write_shards(None, tokenizer_dir, out, documents=corpus_docs[:120], num_shards=8, num_workers=0, progress=False)
    return out


def _rewrite(path: Path, meta=lambda m: m, ids=lambda key, data: ("ids.npy", data)) -> None:
    """Rewrite a shard, changing its first sample's ``.json`` (``meta``) or its ids member (``ids``)."""
    samples = list(wds.WebDataset(str(path), shardshuffle=False))
    with open(path, "wb") as fh, wds.TarWriter(fh, encoder=False, mtime=0) as writer:
        for i, sample in enumerate(samples):
            if i == 0:
                sample["json"] = json.dumps(meta(json.loads(sample["json"]))).encode()
                ext, data = ids(sample["__key__"], sample.pop("ids.npy"))
                sample[ext] = data
            writer.write(sample)  # (the writer leaves out __url__ and the like)


def truncated(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def random_bytes(path: Path) -> None:
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 4096] = random.Random(0).randbytes(4096)
    path.write_bytes(bytes(data))


def bad_array(path: Path) -> None:
    # Ids beyond the vocabulary, with a matching CRC: what a writer bug (not bit rot) would leave.
    ids = np.full(len(next(iter(wds.WebDataset(str(path), shardshuffle=False).decode()))["ids.npy"]), 65000, dtype="<u2")
    buf = io.BytesIO()
    np.save(buf, ids, allow_pickle=False)
    _rewrite(path, meta=lambda m: m | {"crc32": zlib.crc32(ids.tobytes())}, ids=lambda key, data: ("ids.npy", buf.getvalue()))


def other_tokenizer(path: Path) -> None:
    _rewrite(path, meta=lambda m: m | {"tokenizer_hash": "0123456789abcdef"})


def missing(path: Path) -> None:
    path.unlink()


DAMAGE = {"truncated": truncated, "random_bytes": random_bytes, "bad_array": bad_array,
          "other_tokenizer": other_tokenizer, "missing": missing}


def shard_order(shards: Path) -> list[Path]:
    """Train shards in the order the (single) reader visits them in epoch 0 (``StreamConfig.interleave_shards`` at a
    time: the first group's shards are all opened before any batch is made)."""
    names = sorted(shards.glob("train-*.tar"))
    return [names[i] for i in epoch_order(list(range(len(names))), SEED, 0, 0)]


def data_args(shards: Path, tokenizer_dir: Path, on_error: str) -> list[str]:
    return [f"data.train_shards={shards}", f"data.tokenizer={tokenizer_dir}", f"data.on_error={on_error}",
            "batch.global_batch_size=4", "trainer.max_steps=20", "data.shuffle_window=4"]  # read lazily


def test_bad_shards_are_skipped_counted_in_logs_and_metrics(tmp_path, small_shards, tokenizer_dir, caplog, reliability):
    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    victims = dict(zip(DAMAGE, shard_order(shards)))  # the first five read: all met within a few steps
    for kind, path in victims.items():
        DAMAGE[kind](path)
    summary = train(tmp_path / "run", [*data_args(shards, tokenizer_dir, "skip"), "trainer.max_steps=20",
                                       "checkpoint.every_n_steps=1000"])
    assert summary["global_step"] == 20  # trained on from the three good shards
    warned = " ".join(r.getMessage() for r in caplog.records if r.name == "data_pipelines")
    assert all(p.name in warned for p in victims.values()), warned
    metrics = summary["metrics"]["data/skipped_shards_train"]
    rows = [r for r in csv_rows(tmp_path / "run") if r.get("data/skipped_shards_train")]
    assert metrics >= 5 and float(rows[-1]["data/skipped_shards_train"]) == metrics
    reliability("corrupt_skip",
                happened=f"trained all 20 steps; each bad shard logged as a warning naming it; "
                         f"`data/skipped_shards_train` metric counted {metrics:.0f} skipped shard reads",
                kept="training on the good shards; every rank still gets equal batches")


def csv_rows(run_dir: Path) -> list[dict]:
    import csv

    (metrics,) = run_dir.glob("csv/version_*/metrics.csv")
    return list(csv.DictReader(metrics.open()))


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_bad_shard_with_raise_stops_with_one_line_naming_it(tmp_path, small_shards, tokenizer_dir, kind, reliability):
    shards = tmp_path / "shards"
    shutil.copytree(small_shards, shards)
    victim = shard_order(shards)[StreamConfig.interleave_shards]  # opened after the first group's steps train
    DAMAGE[kind](victim)
    message = fails(tmp_path / "run", [*data_args(shards, tokenizer_dir, "raise"), "trainer.max_steps=500"])
    assert victim.name in message, message
    last = load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert last["global_step"] >= 1  # the steps trained on the first shard were checkpointed
    reliability(f"corrupt_raise_{kind}", happened=f"stopped: `{message}`",
                kept="the checkpoints of the steps before it (`last.ckpt` loads)")


# -- numerical faults --------------------------------------------------------------------------------
def test_nan_loss_stops_naming_the_step(tmp_path, shard_dir, tokenizer_dir, reliability):
    data = [f"data.train_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}"]
    message = fails(tmp_path, [*data, inject("nan", [3])])
    assert "non-finite training loss (NaN/inf) at step 3" in message and "last checkpoint: step 2" in message
    last = load(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 2 and all(torch.isfinite(v).all() for v in last["state_dict"].values())
    reliability("nonfinite_stop", happened=f"stopped before the update: `{message}`",
                kept="`last.ckpt` of step 2 with finite parameters; rerunning resumes from it")


def test_inf_loss_is_skipped_when_configured(tmp_path, shard_dir, tokenizer_dir, reliability):
    data = [f"data.train_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}"]
    summary = train(tmp_path, [*data, inject("inf", [3]), "trainer.nonfinite_loss=skip", "trainer.max_steps=5"])
    last = load(tmp_path / "checkpoints" / "last.ckpt")
    assert summary["global_step"] == last["global_step"] == 5
    assert summary["metrics"]["train/skipped_steps"] == 1
    assert all(torch.isfinite(v).all() for v in last["state_dict"].values())
    # AdamW took 4 updates in 5 steps: the skipped step left parameters and moments untouched.
    assert {int(s["step"]) for s in last["optimizer_states"][0]["state"].values()} == {4}
    assert last["MLMDataModule"]["consumed"] == 10  # its batches still count: data order stays exact
    reliability("nonfinite_skip",
                happened="step 3's update was dropped with a warning; `train/skipped_steps`=1; the run finished "
                         "all 5 steps",
                kept="finite parameters; AdamW took 4 updates; the data position moved on by the skipped batches")


def test_nonfinite_loss_on_one_ddp_rank_is_skipped_by_every_rank(tmp_path, shard_dir, tokenizer_dir, reliability):
    """Gradients are all-reduced, so an inf on rank 1 alone poisons both ranks' gradients: both must skip."""
    args = [*TINY, *FAST, f"data.train_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}", "trainer=ddp",
            "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", "trainer.max_steps=4",
            "trainer.nonfinite_loss=skip", f"run_dir={tmp_path}",
            "trainer.callbacks=[{_target_:reliability_faults.NonFiniteLossAt,steps:[3],value:inf,rank:1}]"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "roberta_pl.pretraining.app", *args], capture_output=True, text=True,
                          timeout=600, env=env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    last = load(tmp_path / "checkpoints" / "last.ckpt")
    assert last["global_step"] == 4 and all(torch.isfinite(v).all() for v in last["state_dict"].values())
    # Rank 0's optimizer (the one checkpointed) skipped the step rank 1's loss broke: 3 updates in 4 steps.
    assert {int(s["step"]) for s in last["optimizer_states"][0]["state"].values()} == {3}
    reliability("nonfinite_ddp",
                happened="both ranks agreed to skip step 3 (the flag is reduced across ranks before the update); "
                         "the run finished all 4 steps",
                kept="finite parameters on every rank; AdamW took 3 updates in 4 steps")


def test_nonfinite_loss_under_zero_stops_at_the_window_end_and_skip_is_refused(tmp_path, shard_dir, tokenizer_dir,
                                                                               reliability):
    """DeepSpeed: Lightning calls the optimizer step (and with it the guard) after every micro-batch, and the engine
    decides which is a real step. The guard reads its flag at the engine's accumulation boundary only, so a NaN on
    rank 1 inside step 3's window of 2 micro-batches stops both ranks before step 3's update; ``skip``, which the
    engine cannot honour outside fp16 (it steps at the window's end whatever was zeroed), is refused up front."""
    args = [*TINY, *FAST, f"data.train_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}", "trainer=deepspeed_zero2",
            "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true", "trainer.max_steps=5",
            "batch.global_batch_size=16", "batch.micro_batch_size=4", f"run_dir={tmp_path}", "data.num_workers=0",
            "trainer.callbacks=[{_target_:reliability_faults.NonFiniteLossAt,steps:[3],value:nan,rank:1}]"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    refused = subprocess.run([sys.executable, "-m", "roberta_pl.pretraining.app", *args, "trainer.nonfinite_loss=skip"],
                             capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    skip_line = refused.stderr.strip().splitlines()[-1]
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, refused.stderr[-3000:]
    assert skip_line.startswith("roberta-pl-train: error: trainer.nonfinite_loss=skip is not supported with "
                                "trainer.strategy=deepspeed at trainer.precision=32-true")
    assert not (tmp_path / "checkpoints").exists()
    done = subprocess.run([sys.executable, "-m", "roberta_pl.pretraining.app", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    stop_line = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1, done.stderr[-3000:]
    expected = ("roberta-pl-train: error: non-finite training loss (NaN/inf) at step 3; stopped before updating "
                "the parameters (last checkpoint: step 2); set trainer.nonfinite_loss=skip to skip such steps")
    assert stop_line.startswith(expected), stop_line  # both ranks stop and say so; their lines may run together
    stop_line = expected
    from roberta_pl.checkpoints import load_pretrained

    model, _ = load_pretrained(tmp_path / "checkpoints" / "last.ckpt")  # consolidated from both ranks' partitions
    assert all(torch.isfinite(v).all() for v in model.state_dict().values())
    reliability("nonfinite_zero",
                happened=f"NaN on rank 1 of a 2-rank ZeRO-2 run (CPU, accumulation 2) inside step 3's window: both ranks "
                         f"stopped at the window's end, before the engine's step: `{scrub(stop_line)}`; with "
                         f"`nonfinite_loss=skip` (which DeepSpeed cannot honour outside fp16) refused before any work: "
                         f"`{scrub(skip_line)}`",
                kept="`last.ckpt` of step 2 with finite parameters on every rank's partition")


@pytest.mark.parametrize("strategy", ["ddp", "deepspeed_zero2"])
def test_a_rank_whose_peers_never_come_gives_up_at_the_rendezvous_timeout(tmp_path, shard_dir, tokenizer_dir, strategy,
                                                                        reliability):
    """Rank 0 of 2, launched as a cluster would launch it, with no rank 1 ever starting (a node that failed,
    an address the others cannot reach): one line naming the address and port, after the timeout the Slurm
    templates export, not torch's 30 minutes."""
    import socket

    with socket.socket() as sock:  # a free loopback port nobody will join
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    args = [*TINY, *FAST, f"data.train_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}", f"trainer={strategy}",
            "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=2", f"run_dir={tmp_path}"]
    env = {**os.environ, "LOCAL_RANK": "0", "NODE_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "ROBERTA_PL_RENDEZVOUS_TIMEOUT": "3"}
    done = subprocess.run([sys.executable, "-m", "roberta_pl.pretraining.app", *args], capture_output=True, text=True,
                          timeout=300, env=env, cwd=tmp_path)
    last_line = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert last_line.startswith(f"roberta-pl-train: error: rank 0 of 2 waited 3 s for the rendezvous at 127.0.0.1:{port}")
    assert "ROBERTA_PL_RENDEZVOUS_TIMEOUT" in last_line
    if strategy != "ddp":
        reliability("rendezvous_timeout_deepspeed",
                    happened="DeepSpeed ZeRO-2 rank 0 of 2 with no peer: the same line after the same 3 s",
                    kept="nothing had been trained or written; the run directory is as it was")
        return
    reliability("rendezvous_timeout",
                happened=f"rank 0 of 2 with no peer: `{scrub(last_line.replace(str(port), 'PORT')).split(' and gave')[0]}` "
                         f"after the 3 s timeout",
                kept="nothing had been trained or written; the run directory is as it was")


def test_fp16_loss_scale_collapse_is_reported(tmp_path, shard_dir, tokenizer_dir, reliability):
    data = [f"data.train_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}"]
    message = fails(tmp_path, [*data, "trainer.precision=16-mixed", "trainer.min_loss_scale=4096",
                               inject("inf", list(range(1, 7)))])
    # GradScaler starts at 65536 and halves on each overflow: below 4096 after the 5th step.
    assert "fp16 loss scale collapsed to 2048 at step 5" in message and "5 consecutive overflow steps" in message
    reliability("fp16_collapse", happened=f"each overflow step skipped by the GradScaler with a warning, then "
                                          f"stopped: `{message}`",
                kept="parameters untouched by the overflow steps; the checkpoints so far")


# -- resource faults ---------------------------------------------------------------------------------
@contextmanager
def unprivileged():
    """Root ignores file permissions: act as `nobody` (effective uid only) while in this block."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_unwritable_run_dir_fails_before_training(reliability):
    base = Path(tempfile.mkdtemp())
    try:
        base.chmod(0o755)
        (base / "ro").mkdir(mode=0o555)
        (base / "ro").chmod(0o555)
        overrides = [*TINY, *FAST]
        cfg = compose_cfg(overrides)  # as root: Hydra's own files are not readable by `nobody` here
        with unprivileged(), pytest.raises(SystemExit) as exc:
            run(cfg, base / "ro" / "run", overrides=overrides)
        message = str(exc.value)
        assert "is not writable: Permission denied" in message
        assert not (base / "ro" / "run").exists()
    finally:
        shutil.rmtree(base)
    reliability("unwritable_dir", happened=f"refused before any work: `{message}`", kept="nothing was started")


def test_full_run_dir_fails_before_training(tmp_path, shard_dir, tokenizer_dir, reliability):
    limit = 256 * 1024  # `ulimit -f 256`: Hydra's small files fit, one checkpoint (~0.7 MB) does not

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    cmd = [sys.executable, "-m", "roberta_pl.pretraining.app", *TINY, *FAST, f"run_dir={tmp_path / 'run'}",
           f"data.train_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, preexec_fn=limit_file_size)
    message = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1 and message.startswith("roberta-pl-train: error: run_dir="), proc.stderr[-2000:]
    assert "cannot hold a checkpoint" in message and "File too large" in message
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "csv").exists()
    reliability("full_dir", happened=f"refused before training: `{message}`",
                kept="nothing was started; the probe file was removed")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, shard_dir, tokenizer_dir) -> Path:
    out = tmp_path_factory.mktemp("ckpt")
    train(out, [f"data.train_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}", "trainer.max_steps=2"])
    return out / "checkpoints" / "last.ckpt"


def test_resume_from_another_model_size_fails_before_training(tmp_path, checkpoint, shard_dir, tokenizer_dir, reliability):
    message = fails(tmp_path, [f"data.train_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}", f"resume={checkpoint}",
                               "model.hidden_size=64", "model.intermediate_size=128"])
    assert "model.hidden_size=32 in the checkpoint but 64 here" in message
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "csv").exists()
    reliability("resume_other_model", happened=f"refused before training: `{message}`",
                kept="the checkpoint, untouched")


def test_resume_with_another_tokenizer_fails_before_training(tmp_path, checkpoint, shard_dir, corpus_file, reliability):
    other = train_tokenizer(corpus_file, tmp_path / "tok", vocab_size=600, input_sentence_size=5000)
    message = fails(tmp_path / "run", [f"data.train_shards={shard_dir}", f"data.tokenizer={tmp_path / 'tok'}",
                                       f"resume={checkpoint}", "model.vocab_size=800"])
    assert "in the checkpoint but" in message and "(data.tokenizer)" in message and other is not None
    assert not (tmp_path / "run" / "checkpoints").exists()
    reliability("resume_other_tokenizer", happened=f"refused before training: `{message}`",
                kept="the checkpoint, untouched")


# -- safe loading ------------------------------------------------------------------------------------
class _Evil:
    """Unpickling this runs `touch <marker>`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_checkpoint_is_refused_without_running_code(tmp_path, checkpoint, shard_dir, tokenizer_dir, reliability):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    state = load(checkpoint)
    state["hyper_parameters"]["payload"] = _Evil(marker)
    torch.save(state, evil)
    with pytest.raises(Exception, match="weights_only|Unsupported global"):
        load_pretrained(evil)
    message = fails(tmp_path / "run", [f"data.train_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}",
                                       f"resume={evil}"])
    assert "cannot be loaded safely (weights_only=True)" in message
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the file really is malicious: a full unpickle runs the payload
    assert marker.exists()
    reliability("malicious_checkpoint",
                happened=f"`load_pretrained` and `roberta-pl-export` refuse it (`torch.load(weights_only=True)`); "
                         f"`resume=` refuses it before training: `{message}`",
                kept="no code ran (the payload's marker file was never created)")


def test_shards_hold_no_pickles_and_a_pickle_member_is_refused(tmp_path, shard_dir, small_shards, tok, reliability):
    for shards in (shard_dir, small_shards):
        for path in sorted(shards.glob("*.tar")):
            with tarfile.open(path) as tar:
                exts = {m.name.split(".", 1)[1] for m in tar.getmembers()}
            assert exts == {"json", "ids.npy", "offsets.npy"}, (path, exts)  # .npy is read with allow_pickle=False
    marker = tmp_path / "pwned"
    victim = tmp_path / "train-000000.tar"
    shutil.copy(sorted(small_shards.glob("train-*.tar"))[0], victim)
    import pickle

    payload = pickle.dumps(_Evil(marker))
    _rewrite(victim, ids=lambda key, data: ("pyd", payload))
    with pytest.raises(DataError, match=f"{victim.name}: sample .*: ids.npy is missing"):
        list(iter_shard(str(victim), expected_hash=tok.hash, vocab_size=tok.vocab_size, on_error="raise", report=SkipReport()))
    assert not marker.exists()
    reliability("shard_pickle_member",
                happened="shards written by the pipeline hold only a `.json` and two `.npy` arrays per sample; a "
                         "`.pyd` member in place of the ids is refused: `<shard>: sample <key>: ids.npy is missing`",
                kept="no code ran: members are read as raw bytes and `.npy` headers, never unpickled")


def _external_experiment(tmp_path: Path, marker: Path) -> Path:
    conf = tmp_path / "extconf" / "experiment"
    conf.mkdir(parents=True)
    (conf / "outside.yaml").write_text(
        "# @package _global_\ntrainer:\n  callbacks:\n"
        f"    - _target_: reliability_faults.Touch\n      path: {marker}\n")
    return conf.parent


def test_target_from_an_outside_config_file_is_refused(tmp_path, shard_dir, tokenizer_dir, reliability):
    marker = tmp_path / "imported"
    conf = _external_experiment(tmp_path, marker)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "roberta_pl.pretraining.app", "--config-dir", str(conf), "experiment=outside",
                           *TINY, f"run_dir={tmp_path / 'run'}", f"data.train_shards={shard_dir}",
                           f"data.tokenizer={tokenizer_dir}"], capture_output=True, text=True, timeout=120, env=env)
    message = proc.stderr.strip()
    assert proc.returncode == 1 and "\n" not in message, proc.stderr[-2000:]
    assert "trainer.callbacks.0._target_=reliability_faults.Touch: this _target_ comes from neither" in message
    assert not marker.exists() and not (tmp_path / "run" / "checkpoints").exists()
    reliability("external_target", happened=f"refused before anything was imported: `{message}`",
                kept="nothing ran (the callback's marker file was never created)")


def test_target_named_on_the_command_line_is_accepted(tmp_path, shard_dir, tokenizer_dir, reliability):
    marker = tmp_path / "imported"
    conf = _external_experiment(tmp_path, marker)
    overrides = [*TINY, *FAST, "experiment=outside", "trainer.max_steps=1", f"data.train_shards={shard_dir}",
                 f"data.tokenizer={tokenizer_dir}"]
    cfg = compose_cfg([*overrides, f"hydra.searchpath=[file://{conf}]"])
    assert cfg.trainer.callbacks[0]["_target_"] == "reliability_faults.Touch"
    with pytest.raises(SystemExit, match="comes from neither"):
        run(cfg, tmp_path / "refused", overrides=overrides)
    explicit = [*overrides, "trainer.callbacks.0._target_=reliability_faults.Touch"]
    assert run(cfg, tmp_path / "run", overrides=explicit)["global_step"] == 1
    assert marker.exists()
    reliability("override_target", happened="accepted: the user named it (`trainer.callbacks.0._target_=...`); "
                                            "the callback ran and the run trained",
                kept="n/a (not a fault): the explicit override is the user's consent")


def test_committed_reliability_doc_lists_every_fault():
    # The README links docs/reliability.md; a fault added to the suite must reach it (`make reliability-doc`
    # after a full run), so the committed copy never silently lags behind what is tested.
    from reliability_report import COMMITTED, FAULTS

    text = COMMITTED.read_text()
    missing = [key for key, fault in FAULTS if f"| {fault.replace('|', chr(92) + '|')} |" not in text]
    assert not missing, f"{COMMITTED} lacks rows for {missing}: run the whole suite, then `make reliability-doc`"
