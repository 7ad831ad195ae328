"""Data preparation as a Slurm job array, on the real local cluster (`launch/slurm/local_cluster.sh`).

`launch/slurm/prepare_data.sbatch` submitted with `--array=0-1`: each array task writes its share of the shards,
the last one to finish merges the tasks' records into manifest.json. The shards must be those one process writes
(byte for byte with the same `--num-tasks`; the same documents in each split, the same tokens, with one task), and
the merged manifest's counts must be those of the shards on disk. A failed task resubmitted alone rewrites only
its own shards.
"""

from __future__ import annotations

import json
import os
import sys
from collections import Counter
from pathlib import Path

import pytest
from data_fixtures import corpus_docs, corpus_file, tok, tokenizer_dir, write_corpus_dir  # noqa: F401
from slurm_helpers import REPO_ROOT, slurm_cluster, wait_until  # noqa: F401  (slurm_cluster is a fixture)

from data_pipelines.cli import main
from data_pipelines.errors import SkipReport
from data_pipelines.manifest import TASKS_DIR, load_manifest, task_record_name
from data_pipelines.shard_format import iter_shard

pytestmark = pytest.mark.slow

TEMPLATE = REPO_ROOT / "launch" / "slurm" / "prepare_data.sbatch"
# The local node has the CPUs of this machine (2 on CI) and no GPUs: one CPU and a little memory per array task.
SMALL = ("--cpus-per-task=1", "--mem=2G", "--time=10")



def _documents(directory: Path, split: str) -> Counter:
    manifest = load_manifest(directory)
    docs = Counter()
    for shard in manifest["splits"][split]["shards"]:
        docs.update(tuple(d.tolist()) for d in iter_shard(str(directory / shard["name"]), expected_hash=None,
                                                          vocab_size=None, on_error="raise", report=SkipReport()))
    return docs


def _submit(cluster, tmp_path: Path, array: str | None, args: list[str]) -> list[str]:
    """Submit the template (as an array when ``array``), wait for every task to complete; return the log texts."""
    env = {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    flags = [*SMALL, *([f"--array={array}"] if array else [])]
    job = cluster.submit(TEMPLATE, *flags, script_args=args, cwd=tmp_path, env=env)

    def finished():
        out = cluster.run("squeue", "-h", "-j", job, "-o", "%i %T", check=False).stdout.strip()
        return not out  # every array task has left the queue

    wait_until(finished, timeout=300, what=f"job {job} to finish")
    logs = sorted(tmp_path.glob(f"roberta-pl-data-{job}_*.out"))
    records = [cluster.job(f"{job}_{i}") if array else cluster.job(job) for i in _task_ids(array)]
    for record in records:
        assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", cluster.describe(job, record)
    return [log.read_text() for log in logs]


def _task_ids(array: str | None) -> list[int]:
    if not array:
        return [0]
    lo, _, hi = array.partition("-")
    return list(range(int(lo), int(hi or lo) + 1))


def test_job_array_writes_what_one_process_writes(slurm_cluster, tmp_path, corpus_docs, tokenizer_dir):
    corpus = write_corpus_dir(tmp_path, corpus_docs)
    common = ["--tokenizer", str(tokenizer_dir), "--num-shards", "6", "--valid-fraction", "0.1", "--workers", "1", str(corpus)]
    array = tmp_path / "array"
    logs = _submit(slurm_cluster, tmp_path, "0-1", ["--out", str(array), *common])
    assert len(logs) == 2 and any("task 0 of 2" in log for log in logs) and any("task 1 of 2" in log for log in logs)
    manifest = load_manifest(array)  # merged by the last task, without being asked
    assert manifest["num_tasks"] == 2

    # The merged manifest's counts are those of the shards on disk.
    for split, info in manifest["splits"].items():
        docs = _documents(array, split)
        assert info["num_docs"] == sum(docs.values()) == sum(s["num_docs"] for s in info["shards"])
        assert info["num_tokens"] == sum(len(d) * n for d, n in docs.items())
        assert info["num_bytes"] == sum((array / s["name"]).stat().st_size for s in info["shards"])
        assert info["num_shards"] == len(list(array.glob(f"{split}-*.tar")))
    assert manifest["splits"]["train"]["num_shards"] == 6 and manifest["splits"]["valid"]["num_shards"] == 2

    # One process, --num-tasks 2: the very same files.
    assert main(["-q", "shards", "--out", str(tmp_path / "one"), "--num-tasks", "2", *common]) == 0
    tars = sorted(p.name for p in array.glob("*.tar"))
    assert tars == sorted(p.name for p in (tmp_path / "one").glob("*.tar"))
    assert all((array / n).read_bytes() == (tmp_path / "one" / n).read_bytes() for n in tars)
    # One process, one task: the same documents in each split and the same tokens (laid out in other shards).
    assert main(["-q", "shards", "--out", str(tmp_path / "single"), *common]) == 0
    single = load_manifest(tmp_path / "single")
    for split in ("train", "valid"):
        assert _documents(tmp_path / "single", split) == _documents(array, split)
        assert single["splits"][split]["num_tokens"] == manifest["splits"][split]["num_tokens"]

    # Task 1 failed half-way (one of its shards and its record lost): resubmitted alone, it rewrites only its shards.
    task1 = json.loads((array / TASKS_DIR / task_record_name(1, 2)).read_text())["splits"]["train"]
    stamps = {p.name: p.stat().st_mtime_ns for p in array.glob("*.tar")}
    (array / TASKS_DIR / task_record_name(1, 2)).unlink()
    (array / task1[0]["name"]).unlink()
    (array / "manifest.json").unlink()
    logs = _submit(slurm_cluster, tmp_path, "1", ["--out", str(array), "--num-tasks", "2", *common])
    assert "task 1 of 2" in logs[0]
    assert [n for n, t in stamps.items() if (array / n).stat().st_mtime_ns != t] == [task1[0]["name"]]
    assert all((array / n).read_bytes() == (tmp_path / "one" / n).read_bytes() for n in tars)
    assert load_manifest(array)["splits"] == manifest["splits"]
