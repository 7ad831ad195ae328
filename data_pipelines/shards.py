"""Tokenize a corpus into WebDataset tar shards of token ids, with a manifest: :func:`write_shards`.

It chooses the shard count (:func:`default_num_shards`), lays the job out over its tasks and runs them, here or as
a Slurm job array (:mod:`data_pipelines.shard_tasks`: the layout, the global shuffle, what one task does), and
merges the tasks' records into ``manifest.json`` (:mod:`data_pipelines.manifest`, which also shows the layout of
an output directory). The samples inside a shard are described in :mod:`data_pipelines.shard_format`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import multiprocessing
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from data_pipelines.corpus import expand_inputs
from data_pipelines.errors import DataError, OnError, SkipReport, check_on_error
from data_pipelines.manifest import TASKS_DIR, check_plan, merge_manifests, plan_digest, task_record_name
from data_pipelines.shard_format import FORMAT_VERSION, token_dtype
from data_pipelines.shard_tasks import init_worker, make_layout, run_task
from data_pipelines.tokenizer import load_tokenizer

log = logging.getLogger("data_pipelines")

# Default shard sizing (see default_num_shards): shards of at most ~128 MiB (quick to seek past on resume,
# fine for object stores), and for small corpora enough shards that this many readers (GPUs × DataLoader
# workers) each own whole shards, as long as every shard keeps at least MIN_SHARD_BYTES of ids.
SHARD_BYTES = 128 << 20
MIN_SHARD_BYTES = 128 << 10
LIKELY_READERS = 64
FEW_SHARDS = 8  # fewer than one 8-GPU node's readers: say how to get more
# The shard count is chosen before tokenizing, from file sizes: ~4 bytes of text per token (English, BPE),
# and ~3 bytes of text per byte of gzip.
TEXT_BYTES_PER_TOKEN = 4.0
GZIP_RATIO = 3.0


def _text_bytes(path: str, size: int) -> float:
    return size * GZIP_RATIO if path.endswith(".gz") else float(size)


def default_num_shards(text_bytes: float, itemsize: int = 2, valid_fraction: float = 0.0) -> int:
    """The train shard count chosen from the corpus size, when none is given.

    Shards of at most ``SHARD_BYTES`` (128 MiB) of ids; for smaller corpora, enough shards that
    ``LIKELY_READERS`` (64) readers each own whole shards, but none under ``MIN_SHARD_BYTES`` (128 KiB).

    Args:
        text_bytes: input text size (gzip counted at ~3× its size).
        itemsize: bytes per id (2 for uint16).
        valid_fraction: the part of the documents that goes to the valid split.

    Returns:
        The number of train shards (at least 1).
    """
    ids = text_bytes / TEXT_BYTES_PER_TOKEN * itemsize * (1.0 - valid_fraction)
    return max(1, math.ceil(ids / SHARD_BYTES), min(LIKELY_READERS, int(ids // MIN_SHARD_BYTES)))


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask: what Slurm or taskset gave it, not the whole node)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def write_shards(
    inputs: str | os.PathLike | Sequence[str | os.PathLike] | None,
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    documents: Iterable[str] | None = None,
    num_shards: int | None = None,
    valid_fraction: float = 0.0,
    seed: int = 0,
    text_field: str = "text",
    on_error: OnError = "raise",
    num_workers: int | None = None,
    num_tasks: int = 1,
    task_index: int | None = None,
    progress: bool = True,
) -> dict:
    """Tokenize documents in parallel and write globally shuffled train/valid shards plus ``manifest.json``.

    Args:
        inputs: files, directories, globs or ``"@default"`` (ignored when ``documents`` is given).
        tokenizer_dir: a directory written by :func:`data_pipelines.tokenizer.train_tokenizer`.
        out_dir: where shards and the manifest go. A rerun into the same directory with the same
            settings resumes: finished tasks are kept, unfinished ones rewrite their shards.
        documents: an iterable of document strings to use instead of reading ``inputs`` (one task only).
        num_shards: train shards in all (valid shards follow from ``valid_fraction``). ``None`` chooses it
            from the input size (:func:`default_num_shards`) and logs the choice.
        valid_fraction: fraction of documents (chosen by a hash of their file and place) for validation.
        seed: seed of the split, of the shuffle and of the assignment of files to tasks.
        text_field: JSON key holding the text in ``.jsonl`` inputs.
        on_error: ``"raise"`` or ``"skip"`` for bad input; skips are listed in the manifest.
        num_workers: tokenizer processes (default: the CPUs this process may use; 0 tokenizes in this process).
        num_tasks: how many tasks (a Slurm job array's size) share the work; the layout depends on it.
        task_index: run only this task (``0 <= task_index < num_tasks``); ``None`` runs every task here, one
            after the other, which writes exactly what the job array writes.
        progress: show a rich progress bar.

    Returns:
        The manifest dict (also written to ``out_dir/manifest.json``) once every task has finished;
        before that, this task's record (``{"task", "num_tasks", "splits", "skipped", ...}``).
    """
    check_on_error(on_error)
    if not 0.0 <= valid_fraction < 1.0:
        raise DataError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    if num_shards is not None and num_shards < 1:
        raise DataError(f"num_shards must be >= 1, got {num_shards}")
    if num_tasks < 1 or (task_index is not None and not 0 <= task_index < num_tasks):
        raise DataError(f"need num_tasks >= 1 and 0 <= task_index < num_tasks; got {num_tasks}, {task_index}")
    tok = load_tokenizer(tokenizer_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    itemsize = token_dtype(tok.vocab_size).itemsize

    input_report = SkipReport()  # inputs that do not exist: counted once here, not once per task
    if documents is not None:
        if num_tasks > 1:
            raise DataError("documents given as an iterable are read by one task: pass files as inputs to use --num-tasks")
        files, sizes = None, [0.0]
        if num_shards is None and not isinstance(documents, Sequence):
            raise DataError("pass num_shards with a documents iterator (its size is not known in advance)")
        inputs_record = None
        if isinstance(documents, Sequence):  # what a rerun compares: the documents themselves, not just their count
            digest = hashlib.blake2b(digest_size=16)
            for d in documents:
                digest.update(d.encode("utf-8", "surrogatepass") + b"\0")
            sizes = [float(sum(len(d) for d in documents))]
            inputs_record = {"documents": len(documents), "blake2b": digest.hexdigest()}
    else:
        if inputs is None:
            raise DataError("no inputs given")
        paths = expand_inputs(inputs, on_error=on_error, report=input_report)
        if not paths:
            raise DataError(f"no input files found in {inputs!r}; nothing to shard")
        files = [os.fspath(p) for p in paths]
        sizes = [_text_bytes(f, p.stat().st_size) for f, p in zip(files, paths)]
        inputs_record = [[f, p.stat().st_size] for f, p in zip(files, paths)]
    auto = num_shards is None
    if auto:
        num_shards = default_num_shards(sum(sizes), itemsize, valid_fraction)
    layout = make_layout(files, sizes, num_tasks, max(num_shards, num_tasks) if auto else num_shards, valid_fraction, seed)
    plan = {
        "format": FORMAT_VERSION,
        "tokenizer_hash": tok.hash,
        "num_tasks": num_tasks,
        "num_shards": sum(layout.train),
        "num_valid_shards": sum(layout.valid),
        "valid_fraction": valid_fraction,
        "seed": seed,
        "text_field": text_field,
        "inputs": inputs_record,
        "input_skips": input_report.to_dict(),
        "parts": [list(p) for p in layout.parts],
        "train_shards": list(layout.train),
        "valid_shards": list(layout.valid),
    }
    check_plan(out, plan)
    tokens = sum(sizes) / TEXT_BYTES_PER_TOKEN
    if auto:
        _log_shard_choice(sum(layout.train), tokens, itemsize)
    per_shard = tokens * itemsize * (1 - valid_fraction) / sum(layout.train)
    if per_shard > 4 * SHARD_BYTES:
        log.warning("~%s of ids per shard: a shard is held in memory (about twice) while it is written; pass "
                    "--num-shards %d or more for shards of ~%s", _human_bytes(per_shard), math.ceil(per_shard * sum(layout.train) / SHARD_BYTES),
                    _human_bytes(SHARD_BYTES))
    ctx = {"out": out, "layout": layout, "tok": tok, "seed": seed, "digest": plan_digest(plan), "text_field": text_field,
           "on_error": on_error, "valid_fraction": valid_fraction}
    tasks = range(num_tasks) if task_index is None else [task_index]

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    workers = available_cpus() if num_workers is None else num_workers
    # spawn, not fork: the caller may hold threads (rich's refresher, torch, a Trainer) whose locks a
    # forked child would inherit mid-flight.
    pool = (
        ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=init_worker, initargs=(str(tok.path),))
        if workers > 0 else None
    )
    try:
        with Progress(*columns, disable=not progress, transient=False) as bar:
            for task in tasks:
                record = run_task(ctx, task, pool, workers, bar, documents)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    records = out / TASKS_DIR
    if all((records / task_record_name(t, num_tasks)).exists() for t in range(num_tasks)):
        return merge_manifests(out)
    log.info("task %d of %d done; manifest.json is written when every task is (the last one merges, or run "
             "`roberta-pl-data merge-manifests %s`)", record["task"], num_tasks, out)
    return record


def _log_shard_choice(train_shards: int, tokens: float, itemsize: int) -> None:
    size = tokens * itemsize / train_shards
    log.info("train split: %d shards of ~%s each, chosen from the input size (~%s tokens); --num-shards sets the count",
             train_shards, _human_bytes(size), f"{tokens:,.0f}")
    if train_shards < FEW_SHARDS:
        log.warning("the input is small, so only %d train shard%s (at least 128 KiB each): a run with more readers "
                    "(GPUs x DataLoader workers) than shards makes every reader scan every shard; pass --num-shards N "
                    "(N >= GPUs x workers) for more, smaller shards", train_shards, "" if train_shards == 1 else "s")


def _human_bytes(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"
