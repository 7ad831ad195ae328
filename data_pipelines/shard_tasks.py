"""The tasks of a shard job (a Slurm job array's, or one process's): which input files each task reads and which
shards it writes (the :class:`Layout`), and what one task does (:func:`run_task`): tokenize its documents in
worker processes, spill them per shard, write each shard shuffled, and record what it wrote.

**Tasks.** With ``num_tasks=K`` the input files are dealt to K tasks (balanced by size, seeded, so each task holds
a random mix of files) and each task writes its own range of shards, independently of the others: tokenized
documents are spilled per shard to ``.tasks/task-I.tmp/``, then each shard is shuffled and written as
``NAME.partial`` and renamed when complete. A task records what it wrote in ``.tasks/task-I-of-K.json``; the last
task to finish merges those into ``manifest.json`` (``roberta-pl-data merge-manifests`` does it by hand). The
layout is a function of the settings and the input files only, so a rerun of a failed task rewrites only its own
shards, byte-identically, and a K-task job array writes the same shards as one process given the same
``num_tasks``. The train/valid split does not depend on K at all.

**Global shuffle.** Every document goes to the train or valid split by a hash of (seed, its file's path relative
to the inputs' common directory, its index in the file), and to a shard of its task at random: each chunk of
~1,000 documents is permuted with a seeded generator and dealt round-robin over the task's shards, so shards hold
equal document counts (±1 per chunk) drawn from the whole input. Each shard's documents are then shuffled again
(seeded by the shard) when the shard is written, so a corpus sorted by source gives shards that each mix every
source.
"""

from __future__ import annotations

import filecmp
import hashlib
import json
import logging
import os
import shutil
import struct
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipelines import shard_format
from data_pipelines.corpus import iter_documents
from data_pipelines.errors import DataError, OnError, SkipReport
from data_pipelines.manifest import (
    PARTIAL_SUFFIX,
    SPLITS,
    TASKS_DIR,
    atomic_write_text,
    shard_name,
    task_done,
    task_record_name,
)
from data_pipelines.shard_format import FORMAT_VERSION, OFFSETS_DTYPE, dtype_name, encode_sample, token_dtype
from data_pipelines.tokenizer import SpmTokenizer, load_tokenizer

log = logging.getLogger("data_pipelines")

# Documents tokenized per work item (a pool task): bounded by count and by characters.
CHUNK_DOCS = 1024
CHUNK_CHARS = 4 << 20
# Tokenized ids held in memory per task before they are appended to the per-shard spill files.
SPILL_BUFFER_BYTES = 64 << 20
_SPLIT_CODE = {"train": 0, "valid": 1}


def is_valid_split(unit_hash: float, valid_fraction: float) -> bool:
    """Whether a document with this hash-derived number in [0, 1) goes to the valid split."""
    return unit_hash < valid_fraction


def _unit_hash(seed: int, source: str, index: int) -> float:
    # A hash of the document's place in its file, not an RNG stream, so the split of a document never
    # depends on how many documents were skipped before it, on the worker processes or on the tasks.
    digest = hashlib.blake2b(f"{seed}:{source}:{index}".encode(), digest_size=8).digest()
    return struct.unpack("<Q", digest)[0] / 2**64


# ---------------------------------------------------------------------------------------------
# The layout: which files each task reads and which shards it writes (the same in every task)
# ---------------------------------------------------------------------------------------------


def _deal_files(sizes: Sequence[float], num_tasks: int, seed: int) -> list[list[int]]:
    """Files → tasks: largest first to the least loaded task, equal sizes in a seeded random order."""
    tiebreak = np.random.default_rng([seed, 0xF11E]).permutation(len(sizes))
    loads = [0.0] * num_tasks
    parts: list[list[int]] = [[] for _ in range(num_tasks)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], tiebreak[i])):
        task = min(range(num_tasks), key=lambda t: (len(parts[t]) > 0, loads[t], t))  # every task gets a file first
        parts[task].append(i)
        loads[task] += sizes[i]
    return [sorted(p) for p in parts]


def _share(total: int, weights: Sequence[float]) -> list[int]:
    """``total`` (>= len(weights)) split in proportion to ``weights``, at least 1 each (largest remainder)."""
    n = len(weights)
    spare = total - n
    whole = sum(weights) or 1.0
    exact = [spare * w / whole for w in weights]
    counts = [1 + int(e) for e in exact]
    for i in sorted(range(n), key=lambda i: (-(exact[i] - int(exact[i])), i))[: total - sum(counts)]:
        counts[i] += 1
    return counts


@dataclass(frozen=True)
class Layout:
    """Which files each task reads and how many shards of each split it writes."""

    files: tuple[str, ...] | None  # None: documents passed as an iterable (one task)
    sources: tuple[str, ...] | None  # each file's path relative to the inputs' common directory: what the split hashes
    parts: tuple[tuple[int, ...], ...]
    train: tuple[int, ...]
    valid: tuple[int, ...]

    @property
    def num_tasks(self) -> int:
        return len(self.parts)

    def count(self, split: str, task: int) -> int:
        """Shards of ``split`` that ``task`` writes."""
        return (self.train if split == "train" else self.valid)[task]

    def first(self, split: str, task: int) -> int:
        """Index of the first shard of ``split`` that ``task`` writes."""
        return sum((self.train if split == "train" else self.valid)[:task])


def make_layout(files: list[str] | None, sizes: list[float], num_tasks: int, num_shards: int, valid_fraction: float,
                seed: int) -> Layout:
    """Deal the files to ``num_tasks`` tasks (balanced by size, seeded) and ``num_shards`` train shards to the tasks
    in proportion to their input (valid shards follow from ``valid_fraction``); ``files=None``: one task."""
    if files is None:
        parts = [[]]
    else:
        if num_tasks > len(files):
            raise DataError(f"{num_tasks} tasks for {len(files)} input file(s): every task reads whole files; use at most "
                            f"--num-tasks {len(files)}, or split the input into more files")
        parts = _deal_files(sizes, num_tasks, seed) if num_tasks > 1 else [list(range(len(files)))]
    if num_shards < num_tasks:
        raise DataError(f"--num-shards {num_shards} is fewer than --num-tasks {num_tasks}: every task writes at least one shard")
    weights = [sum(sizes[i] for i in p) for p in parts] if files is not None else [1.0]
    train = _share(num_shards, weights)
    ratio = valid_fraction / (1.0 - valid_fraction)
    valid = [max(1, round(n * ratio)) if valid_fraction > 0 else 0 for n in train]
    sources = None
    if files is not None:
        # Relative to the inputs' common directory, so the split survives moving the corpus (and pytest's tmp dirs).
        absolute = [os.path.abspath(f) for f in files]
        root = os.path.commonpath([os.path.dirname(a) for a in absolute])
        sources = tuple(os.path.relpath(a, root) for a in absolute)
    return Layout(None if files is None else tuple(files), sources, tuple(map(tuple, parts)), tuple(train), tuple(valid))


# ---------------------------------------------------------------------------------------------
# Tokenizing a chunk of documents (runs in worker processes)
# ---------------------------------------------------------------------------------------------

_WORKER_TOKENIZER: SpmTokenizer | None = None


def init_worker(tokenizer_dir: str) -> None:
    """A tokenizer process's initializer: load the tokenizer once, not once per chunk."""
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_dir)


def _encode_chunk(docs: list[str], valid: list[bool], deal: dict[str, int], counts: dict[str, int], seed: int,
                  task: int, chunk: int, tokenizer_dir: str) -> dict[tuple[str, int], tuple[np.ndarray, np.ndarray]]:
    """Tokenize ``docs`` and deal them to the task's shards: ``{(split, local shard): (ids, lengths)}``.

    Each split's documents of the chunk are permuted (seeded by seed, task, chunk) and dealt round-robin
    from shard ``deal[split]`` on, so the assignment is random and the shards stay equal in documents.
    """
    tok = _WORKER_TOKENIZER if _WORKER_TOKENIZER is not None else load_tokenizer(tokenizer_dir)
    dtype = token_dtype(tok.vocab_size)
    # Corpus text is text only: a literal <s> or <mask> in it is never a control id (packed_docs counts <s>).
    encoded = [np.asarray(ids, dtype=dtype) for ids in tok.encode_corpus(docs)]
    is_valid = np.asarray(valid, dtype=bool)
    out: dict[tuple[str, int], tuple[np.ndarray, np.ndarray]] = {}
    for split in SPLITS:
        members = np.flatnonzero(is_valid if split == "valid" else ~is_valid)
        if not len(members):
            continue
        rng = np.random.default_rng([seed, task, chunk, _SPLIT_CODE[split], 0xDEA1])
        shard_of = np.empty(len(members), dtype=np.int64)
        shard_of[rng.permutation(len(members))] = (deal[split] + np.arange(len(members))) % counts[split]
        for local in np.unique(shard_of).tolist():
            chosen = [encoded[i] for i in members[shard_of == local].tolist()]
            out[(split, local)] = (np.concatenate(chosen), np.fromiter(map(len, chosen), dtype=np.int64, count=len(chosen)))
    return out


# ---------------------------------------------------------------------------------------------
# Spilling a task's documents per shard, then writing each shard shuffled
# ---------------------------------------------------------------------------------------------


class _Spill:
    """Per-shard append-only files of ids and document lengths, buffered in memory up to a bound."""

    def __init__(self, directory: Path, dtype: np.dtype) -> None:
        self.dir = directory
        self.dtype = dtype
        self.buffers: dict[tuple[str, int], list[tuple[np.ndarray, np.ndarray]]] = {}
        self.buffered = 0

    def _paths(self, key: tuple[str, int]) -> tuple[Path, Path]:
        stem = self.dir / f"{key[0]}-{key[1]:06d}"
        return stem.with_suffix(".ids"), stem.with_suffix(".len")

    def add(self, key: tuple[str, int], ids: np.ndarray, lengths: np.ndarray) -> None:
        self.buffers.setdefault(key, []).append((ids, lengths))
        self.buffered += ids.nbytes + lengths.nbytes
        if self.buffered > SPILL_BUFFER_BYTES:
            self.flush()

    def flush(self) -> None:
        for key, parts in self.buffers.items():
            ids_path, len_path = self._paths(key)
            with open(ids_path, "ab") as fh:
                for ids, _ in parts:
                    fh.write(ids.tobytes())
            with open(len_path, "ab") as fh:
                for _, lengths in parts:
                    fh.write(lengths.astype("<i8").tobytes())
        self.buffers.clear()
        self.buffered = 0

    def read(self, key: tuple[str, int]) -> tuple[np.ndarray, np.ndarray]:
        ids_path, len_path = self._paths(key)
        if not len_path.exists():
            return np.empty(0, self.dtype), np.empty(0, np.int64)
        return np.fromfile(ids_path, dtype=self.dtype), np.fromfile(len_path, dtype="<i8")


def _shard_samples(ids: np.ndarray, lengths: np.ndarray, order: np.ndarray, sample_tokens: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Documents in ``order`` cut into samples of at least ``sample_tokens`` ids (whole documents; the last
    sample holds the rest). A shard without documents gets one empty sample, so it is still a valid shard."""
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    bounds = starts.tolist()
    samples, views, sizes, tokens = [], [], [], 0

    def emit() -> None:
        offsets = np.zeros(len(sizes) + 1, dtype=OFFSETS_DTYPE)
        np.cumsum(sizes, out=offsets[1:])
        samples.append((np.concatenate(views) if views else np.empty(0, ids.dtype), offsets))

    for d in order.tolist():
        a, b = bounds[d], bounds[d + 1]
        views.append(ids[a:b])
        sizes.append(b - a)
        tokens += b - a
        if tokens >= sample_tokens:
            emit()
            views, sizes, tokens = [], [], 0
    if views or not samples:
        emit()
    return samples


def _write_shard(path: Path, split: str, index: int, ids: np.ndarray, lengths: np.ndarray, tokenizer_hash: str, seed: int) -> tuple[dict, bool]:
    """Write one shard (shuffled documents, ~1 MiB samples) atomically; keep an identical existing one.

    Returns:
        ``({"name", "num_docs", "num_tokens", "num_bytes"}, written)``; ``written`` is False when a
        byte-identical shard was already there (its file is left untouched).
    """
    import webdataset as wds  # here, not at the top: it imports torch, which tokenizer workers never need

    order = np.random.default_rng([seed, _SPLIT_CODE[split], index, 0x5F]).permutation(len(lengths))
    samples = _shard_samples(ids, lengths, order, max(1, shard_format.SAMPLE_BYTES // ids.dtype.itemsize))
    partial = path.with_name(path.name + PARTIAL_SUFFIX)
    with open(partial, "wb") as fh:
        # mtime fixed so the same input gives byte-identical shards.
        writer = wds.TarWriter(fh, encoder=False, mtime=0)
        for i, (sample_ids, offsets) in enumerate(samples):
            meta = {"tokenizer_hash": tokenizer_hash, "shard": path.name, "sample": i, "samples": len(samples)}
            writer.write(encode_sample(f"{path.stem}-{i:05d}", sample_ids, offsets, meta))
        end = writer.tarstream.offset
        writer.close()
        # tarfile pads an archive to a 10 KiB record; tar readers need only the two zero blocks that end it.
        fh.truncate(end + 2 * 512)
        fh.flush()
        os.fsync(fh.fileno())
    entry = {"name": path.name, "num_docs": int(len(lengths)), "num_tokens": int(lengths.sum()), "num_bytes": partial.stat().st_size}
    if path.exists() and filecmp.cmp(partial, path, shallow=False):
        partial.unlink()
        return entry, False
    if path.exists():
        log.warning("%s: replaced (its content differed from what these settings write)", path)
    os.replace(partial, path)  # atomic: the final name only ever holds a complete shard
    return entry, True


# ---------------------------------------------------------------------------------------------
# One task: read its documents in chunks, tokenize, spill, write its shards, record them
# ---------------------------------------------------------------------------------------------


def _task_documents(layout: Layout, task: int, documents: Iterable[str] | None, text_field: str, on_error: OnError,
                    report: SkipReport) -> Iterator[tuple[str, int, str]]:
    """``(source, index in source, text)`` of every document the task reads, in order."""
    if layout.files is None:
        for i, doc in enumerate(documents):
            yield "", i, doc
        return
    for f in layout.parts[task]:
        for i, doc in enumerate(iter_documents(layout.files[f], text_field=text_field, on_error=on_error, report=report)):
            yield layout.sources[f], i, doc


def _chunks(docs: Iterator[tuple[str, int, str]], seed: int, valid_fraction: float) -> Iterator[tuple[list[str], list[bool]]]:
    texts: list[str] = []
    valid: list[bool] = []
    chars = 0
    for source, index, doc in docs:
        texts.append(doc)
        valid.append(valid_fraction > 0 and is_valid_split(_unit_hash(seed, source, index), valid_fraction))
        chars += len(doc)
        if len(texts) >= CHUNK_DOCS or chars >= CHUNK_CHARS:
            yield texts, valid
            texts, valid, chars = [], [], 0
    if texts:
        yield texts, valid


def run_task(ctx: dict, task: int, pool: ProcessPoolExecutor | None, workers: int, bar, documents) -> dict:
    """Tokenize one task's documents into its shards and record them in ``.tasks/``; returns the record."""
    out: Path = ctx["out"]
    layout: Layout = ctx["layout"]
    tok: SpmTokenizer = ctx["tok"]
    seed = ctx["seed"]
    K = layout.num_tasks
    record_path = out / TASKS_DIR / task_record_name(task, K)
    done = task_done(out, record_path, ctx["digest"])
    if done is not None:
        log.info("task %d of %d: already done (%s); its shards are kept", task, K, record_path)
        return done
    tmp = out / TASKS_DIR / f"task-{task:05d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # the spill of an interrupted earlier attempt
    tmp.mkdir(parents=True)
    for split in SPLITS:  # .partial leftovers of this task's shards (never another task's)
        for j in range(layout.count(split, task)):
            (out / (shard_name(split, layout.first(split, task) + j) + PARTIAL_SUFFIX)).unlink(missing_ok=True)
    dtype = token_dtype(tok.vocab_size)
    spill = _Spill(tmp, dtype)
    counts = {s: layout.count(s, task) for s in SPLITS}
    first = {s: layout.first(s, task) for s in SPLITS}
    report = SkipReport()
    dealt = {s: 0 for s in SPLITS}
    docs_task = bar.add_task(f"task {task}: documents tokenized", total=None)
    inflight: list[tuple[int, Future | dict]] = []

    def collect(block: bool) -> None:
        # At most 2 chunks per worker in flight, results taken in submission order: memory stays bounded and the
        # spill files (so the shards) come out the same whatever the number of workers.
        while inflight and (block or not isinstance(inflight[0][1], Future) or inflight[0][1].done()):
            n, fut = inflight.pop(0)
            result = fut.result() if isinstance(fut, Future) else fut
            for (split, local), (ids, lengths) in result.items():
                spill.add((split, first[split] + local), ids, lengths)
            bar.advance(docs_task, n)

    chunks = _chunks(_task_documents(layout, task, documents, ctx["text_field"], ctx["on_error"], report), seed, ctx["valid_fraction"])
    for c, (texts, valid) in enumerate(chunks):
        deal = dict(dealt)
        n_valid = sum(valid)
        dealt["valid"] += n_valid
        dealt["train"] += len(texts) - n_valid
        if n_valid and not counts["valid"]:
            raise AssertionError("valid documents without valid shards")  # valid_fraction > 0 always plans some
        args = (texts, valid, deal, counts, seed, task, c, str(tok.path))
        inflight.append((len(texts), pool.submit(_encode_chunk, *args) if pool is not None else _encode_chunk(*args)))
        collect(block=len(inflight) >= 2 * max(1, workers))
    collect(block=True)
    spill.flush()

    splits: dict[str, list[dict]] = {}
    written = 0
    shards_task = bar.add_task(f"task {task}: shards written", total=sum(counts.values()))
    for split in SPLITS:
        entries = []
        for j in range(counts[split]):
            index = first[split] + j
            ids, lengths = spill.read((split, index))
            entry, fresh = _write_shard(out / shard_name(split, index), split, index, ids, lengths, tok.hash, seed)
            entries.append(entry)
            written += fresh
            bar.advance(shards_task)
        if entries:
            splits[split] = entries
    record = {"format": FORMAT_VERSION, "plan": ctx["digest"], "task": task, "num_tasks": K,
              "tokenizer_dir": str(tok.path.resolve()), "vocab_size": tok.vocab_size, "dtype": dtype_name(dtype),
              "splits": splits, "skipped": report.to_dict()}
    atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    if report.total:
        log.warning("task %d: skipped %d bad inputs: %s", task, report.total, dict(report.counts))
    log.info("task %d of %d: %d shards written, %d identical ones kept", task, K, written, sum(counts.values()) - written)
    return record
