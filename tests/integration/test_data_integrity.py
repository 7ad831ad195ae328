"""Untrusted data inputs through the real entry points: a manifest whose shard names leave its directory,
`data=shards` without paths, and binary files among the text files; each is refused with one line (or, when
asked, skipped and counted), and nothing is read from where it should not be."""

from __future__ import annotations

import gzip
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_pretrain import TINY, compose_cfg

from data_pipelines.corpus import iter_documents
from data_pipelines.errors import DataError, SkipReport
from data_pipelines.manifest import load_manifest, merge_manifests, resolve_shards
from data_pipelines.shards import write_shards
from data_pipelines.tokenizer import train_tokenizer
from roberta_pl.pretraining.app import run

FAST = ["trainer.max_steps=1", "trainer.val_every_n_steps=1000", "export_hf=false", "logger=none"]


def fails(out_dir: Path, overrides: list[str]) -> str:
    """The one-line error `roberta-pl-train` stops with."""
    overrides = [*TINY, *FAST, *overrides]
    with pytest.raises(SystemExit) as exc:
        run(compose_cfg(overrides), out_dir, overrides=overrides)
    message = str(exc.value)
    assert message.startswith("roberta-pl-train: error: ") and "\n" not in message, message
    return message


# -- manifest shard names ----------------------------------------------------------------------------------
def _escaping_copy(tmp_path: Path, shard_dir: Path, name_of) -> tuple[Path, Path]:
    """A copy of the shards whose manifest names, as its first train shard, a real shard outside the directory:
    ``name_of(outside_file, shards_dir)`` gives the name written."""
    shards, outside = tmp_path / "shards", tmp_path / "elsewhere" / "secret.tar"
    shutil.copytree(shard_dir, shards)
    outside.parent.mkdir()
    shutil.copy(shards / "train-000000.tar", outside)
    manifest = json.loads((shards / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["name"] = name_of(outside, shards)
    (shards / "manifest.json").write_text(json.dumps(manifest))
    return shards, outside


def test_manifest_naming_a_shard_outside_its_directory_stops_the_run(tmp_path, shard_dir, tokenizer_dir, reliability):
    shards, outside = _escaping_copy(tmp_path, shard_dir, lambda outside, shards: str(outside))
    message = fails(tmp_path / "run", [f"data.train_shards={shards}", f"data.tokenizer={tokenizer_dir}"])
    assert f"{shards / 'manifest.json'}: shard entry splits.train[0] has name {str(outside)!r}" in message
    assert not (tmp_path / "run" / "checkpoints").exists()
    reliability("manifest_path_escape", happened=message, kept="nothing read outside the shard directory; no step run")


@pytest.mark.parametrize("name", ["../elsewhere/secret.tar", "sub/../../elsewhere/secret.tar", "..", "sub\\x.tar",
                                  "", 7])
def test_manifest_names_must_be_plain_file_names(tmp_path, shard_dir, name):
    shards, _ = _escaping_copy(tmp_path, shard_dir, lambda outside, shards: name)
    with pytest.raises(DataError, match=r"manifest\.json: shard entry splits\.train\[0\] has name") as exc:
        resolve_shards(shards)
    assert "\n" not in str(exc.value)


def test_the_names_the_writer_writes_are_accepted(shard_dir):
    manifest = load_manifest(shard_dir)
    assert manifest["splits"]["train"]["shards"][0]["name"] == "train-000000.tar"
    assert len(resolve_shards(shard_dir).shards) == manifest["splits"]["train"]["num_shards"]


def test_a_task_record_naming_a_file_outside_is_not_merged(tmp_path, corpus_docs, tokenizer_dir):
    out = tmp_path / "shards"
    write_shards(None, tokenizer_dir, out, documents=corpus_docs[:40], num_shards=2, num_workers=0, progress=False)
    record_path = next((out / ".tasks").glob("task-*.json"))
    record = json.loads(record_path.read_text())
    record["splits"]["train"][1]["name"] = "/etc/hostname"
    record_path.write_text(json.dumps(record))
    with pytest.raises(DataError, match=r"task-00000-of-00001\.json: shard entry splits\.train\[1\] has name '/etc/"):
        merge_manifests(out)


# -- data=shards without paths -----------------------------------------------------------------------------
@pytest.fixture
def no_default_corpus(monkeypatch):
    """Training on the embedded corpus is the fault: make it fail loudly (and fast) instead of building it."""
    import roberta_pl.pretraining.data

    def refuse(*args, **kwargs):
        raise AssertionError("fell back to the embedded default corpus")

    monkeypatch.setattr(roberta_pl.pretraining.data, "_default_dataset", refuse)


def test_data_shards_without_paths_is_refused_not_trained_on_the_default_corpus(tmp_path, no_default_corpus,
                                                                                 reliability):
    message = fails(tmp_path / "run", ["data=shards"])
    assert "data=shards but data.train_shards and data.tokenizer are not set: set data.train_shards=DIR" in message
    reliability("shards_without_paths", happened=message, kept="nothing built or trained; the embedded corpus untouched")


def test_data_shards_with_only_a_tokenizer_names_the_missing_shards(tmp_path, tokenizer_dir, no_default_corpus):
    message = fails(tmp_path / "run", ["data=shards", f"data.tokenizer={tokenizer_dir}"])
    assert "data=shards but data.train_shards is not set" in message


def test_data_shards_with_paths_trains(tmp_path, shard_dir, tokenizer_dir, no_default_corpus):
    overrides = [*TINY, *FAST, "data=shards", f"data.train_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}"]
    assert run(compose_cfg(overrides), tmp_path / "run", overrides=overrides)["global_step"] == 1


# -- binary files named like text --------------------------------------------------------------------------
def _corpus_with_binary(tmp_path: Path, docs: list[str], name: str) -> Path:
    """Real documents in one file, and beside them a 200 KB file of NUL bytes (or a JSON line of them)."""
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "prose.txt").write_text("\n\n".join(docs) + "\n")
    if name.endswith(".jsonl"):
        data = (json.dumps({"text": "\0" * 100_000}) + "\n").encode()  # 600 KB of \u0000: under the 1 MiB line cap
    else:
        data = b"\0" * 200_000
    (d / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    return d


@pytest.mark.parametrize("name", ["perlpod.txt", "perlpod.txt.gz", "perlpod.jsonl"])
def test_nul_filled_input_is_refused_or_skipped_and_counted(tmp_path, corpus_docs, name):
    corpus = _corpus_with_binary(tmp_path, corpus_docs[:20], name)
    with pytest.raises(DataError, match=rf"{name}:1: binary content \(NUL (byte|character) at") as exc:
        list(iter_documents(corpus))
    assert "\n" not in str(exc.value)
    report = SkipReport()
    assert list(iter_documents(corpus, on_error="skip", report=report)) == [d.strip() for d in corpus_docs[:20]]
    assert report.counts["binary_content"] == 1 and name in report.examples["binary_content"][0]


def test_nul_bytes_after_text_drop_the_rest_of_the_file(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"First document, kept.\n\nSecond document\nwith a line \0\0\0 of NULs.\n\nThird, after it.\n")
    report = SkipReport()
    assert list(iter_documents(path, on_error="skip", report=report)) == ["First document, kept."]
    assert report.counts["binary_content"] == 1 and "mixed.txt:4" in report.examples["binary_content"][0]


def test_binary_file_is_refused_by_tokenizer_training_and_shard_writing(tmp_path, corpus_docs, tokenizer_dir,
                                                                        reliability):
    docs = corpus_docs[:200]
    corpus = _corpus_with_binary(tmp_path, docs, "perlpod.txt")
    with pytest.raises(DataError, match=r"perlpod\.txt:1: binary content"):
        train_tokenizer(corpus, tmp_path / "tok", vocab_size=400, input_sentence_size=10_000, num_threads=1)
    with pytest.raises(DataError, match=r"perlpod\.txt:1: binary content"):
        write_shards(corpus, tokenizer_dir, tmp_path / "raise", num_shards=2, num_workers=0, progress=False)

    tok = train_tokenizer(corpus, tmp_path / "tok", vocab_size=400, input_sentence_size=10_000, num_threads=1,
                          on_error="skip")
    assert tok.vocab_size == 400
    manifest = write_shards(corpus, tokenizer_dir, tmp_path / "skip", num_shards=2, num_workers=0, progress=False,
                            on_error="skip")
    assert manifest["splits"]["train"]["num_docs"] == len(docs)  # not one more 200,001-token document
    assert manifest["skipped"]["counts"]["binary_content"] == 1
    reliability("binary_input_file", happened=manifest["skipped"]["examples"]["binary_content"][0],
                kept=f"the {len(docs)} real documents sharded; the file counted in the manifest's skips "
                     f"(on_error=raise: a one-line error naming the file and line)")


# -- DataLoader workers outlive a killed trainer -----------------------------------------------------------
def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE  # dead, waiting for its new parent to reap it
    except psutil.NoSuchProcess:
        return True


@pytest.mark.slow
def test_dataloader_workers_die_with_a_sigkilled_trainer(tmp_path, shard_dir, tokenizer_dir, reliability):
    # Batches of 64 x 64 tokens are larger than a pipe's buffer (64 KiB), so a worker whose parent is gone blocks
    # writing one and (before the fix) never reaches torch's own check of its parent.
    cmd = [sys.executable, "-m", "roberta_pl.pretraining.app", *TINY, "batch.micro_batch_size=64", "batch.global_batch_size=64",
           "data.num_workers=2", "trainer.max_steps=100000", "checkpoint.every_n_steps=1", "checkpoint.keep=1",
           "trainer.val_every_n_steps=100000", "export_hf=false", "logger=none", f"run_dir={tmp_path / 'run'}",
           f"data.train_shards={shard_dir}", f"data.tokenizer={tokenizer_dir}"]
    log = tmp_path / "log.txt"
    proc = subprocess.Popen(cmd, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    workers: list[psutil.Process] = []
    try:
        while not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists():  # training, with its workers up
            assert proc.poll() is None, log.read_text()[-3000:]
            time.sleep(0.05)
        workers = [p for p in psutil.Process(proc.pid).children(recursive=True) if p.name() == "pt_data_worker"]
        assert len(workers) == 2, [p.name() for p in psutil.Process(proc.pid).children(recursive=True)]
        os.kill(proc.pid, signal.SIGKILL)  # the trainer alone, not its process group
        assert proc.wait() == -signal.SIGKILL
        deadline = time.monotonic() + 30  # the fix takes well under a second; this is only how long we wait
        while not all(_gone(w.pid) for w in workers) and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = [w.pid for w in workers if not _gone(w.pid)]
        assert not alive, f"DataLoader workers {alive} outlived their SIGKILLed trainer"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for w in workers:  # on a failure, leave no orphan behind on the shared machine
            if not _gone(w.pid):
                w.kill()
    reliability("kill_orphan_workers", happened="the trainer SIGKILLed while its 2 DataLoader workers were blocked "
                                                "writing batches", kept="both workers exited with it (no orphan left)")
