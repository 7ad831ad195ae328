"""Tokenize a corpus into WebDataset tar shards of token ids, with a manifest.

Layout of an output directory::

    manifest.json              shards per split with doc/token/byte counts, tokenizer hash, skipped inputs
    train-000000.tar ...       WebDataset shards, many documents per sample (below)
    valid-000000.tar ...
    .plan.json                 the settings and layout of the run; a rerun with other settings is refused
    .tasks/task-00000-of-00001.json   what each task wrote; the last task to finish merges them into manifest.json

**Samples** (shard format 2). Each sample holds about 1 MiB of token ids, as three members::

    KEY.json          {"format": 2, "tokenizer_hash", "dtype", "shard", "sample", "samples",
                       "num_docs", "num_tokens", "crc32"}
    KEY.ids.npy       the ids of the sample's documents end to end: uint16 when the vocabulary fits, else int32
    KEY.offsets.npy   uint32, num_docs + 1 entries: document d is ids[offsets[d]:offsets[d + 1]]

``.npy`` arrays are read with ``allow_pickle=False``; nothing in a shard is a pickle. At ~2 bytes a token
(the offsets and the tar headers add ~3%), a shard is about as large as its ids. ``sample``/``samples``
number the samples of a shard, so a tar cut short between members is detected, and ``crc32`` covers the
ids. Any WebDataset user reads them: ``webdataset.WebDataset(url).decode()`` gives each sample's
``"ids.npy"`` and ``"offsets.npy"`` as arrays (see docs/data.md).

**Global shuffle.** Every document goes to the train or valid split by a hash of (seed, its file's path relative
to the inputs' common directory, its index in the file), and to a shard of its task at random: each chunk of ~1,000 documents is permuted with a seeded
generator and dealt round-robin over the task's shards, so shards hold equal document counts (±1 per
chunk) drawn from the whole input. Each shard's documents are then shuffled again (seeded by the shard)
when the shard is written, so a corpus sorted by source gives shards that each mix every source.

**Tasks** (a Slurm job array, or one process). With ``num_tasks=K`` the input files are dealt to K tasks
(balanced by size, seeded, so each task holds a random mix of files) and each task writes its own range of
shards, independently of the others: tokenized documents are spilled per shard to ``.tasks/task-I.tmp/``,
then each shard is shuffled and written as ``NAME.partial`` and renamed when complete. A task records what
it wrote in ``.tasks/task-I-of-K.json``; the last task to finish merges those into ``manifest.json``
(``roberta-pl-data merge-manifests`` does it by hand). The layout is a function of the settings and the
input files only, so a rerun of a failed task rewrites only its own shards, byte-identically, and a K-task
job array writes the same shards as one process given the same ``num_tasks``. The train/valid split does
not depend on K at all.
"""

from __future__ import annotations

import filecmp
import hashlib
import io
import json
import logging
import math
import multiprocessing
import os
import shutil
import struct
import zlib
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from data_pipelines.corpus import expand_inputs, iter_documents
from data_pipelines.errors import DataError, OnError, SkipReport, check_on_error
from data_pipelines.tokenizer import SpmTokenizer, load_tokenizer

log = logging.getLogger("data_pipelines")

MANIFEST = "manifest.json"
PLAN = ".plan.json"
TASKS_DIR = ".tasks"
FORMAT_VERSION = 2
PARTIAL_SUFFIX = ".partial"
SPLITS = ("train", "valid")

# A sample carries this many bytes of ids (at least; a document is never cut): big enough that tar headers
# and per-sample reading cost nothing (3 members per MiB), small enough to decode at once.
SAMPLE_BYTES = 1 << 20
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
# Documents tokenized per work item (a pool task): bounded by count and by characters.
CHUNK_DOCS = 1024
CHUNK_CHARS = 4 << 20
# Tokenized ids held in memory per task before they are appended to the per-shard spill files.
SPILL_BUFFER_BYTES = 64 << 20

DTYPES = {"uint16": np.dtype("<u2"), "int32": np.dtype("<i4")}
OFFSETS_DTYPE = np.dtype("<u4")
_SPLIT_CODE = {"train": 0, "valid": 1}

REWRITE_HINT = ("rewrite them with `roberta-pl-data shards --tokenizer TOK --out NEW_DIR INPUTS` "
                "(same inputs and tokenizer, a new directory)")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else int32; always little-endian."""
    return DTYPES["uint16"] if vocab_size <= 65536 else DTYPES["int32"]


def dtype_name(dtype: np.dtype) -> str:
    """The name a shard records for its id dtype: ``"uint16"`` or ``"int32"``."""
    return {v.str: k for k, v in DTYPES.items()}[np.dtype(dtype).str]


def is_valid_split(unit_hash: float, valid_fraction: float) -> bool:
    """Whether a document with this hash-derived number in [0, 1) goes to the valid split."""
    return unit_hash < valid_fraction


def _unit_hash(seed: int, source: str, index: int) -> float:
    # A hash of the document's place in its file, not an RNG stream, so the split of a document never
    # depends on how many documents were skipped before it, on the worker processes or on the tasks.
    digest = hashlib.blake2b(f"{seed}:{source}:{index}".encode(), digest_size=8).digest()
    return struct.unpack("<Q", digest)[0] / 2**64


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split``, e.g. ``train-000003.tar``."""
    return f"{split}-{index:06d}.tar"


def check_shard_names(record: dict, where: str | os.PathLike) -> None:
    """Refuse a manifest (or task record) whose shard names would reach outside its directory.

    The writer names every shard :func:`shard_name` (``train-000003.tar``), a plain file name read as
    ``<directory>/<name>``; an absolute path, ``..`` or a path separator would make a manifest from
    elsewhere read (or, for a record, vouch for) any file on the machine.

    Args:
        record: a manifest or task record: ``{"splits": {split: {"shards": [...]}}}`` (manifest) or
            ``{"splits": {split: [...]}}`` (record), each shard ``{"name", ...}``.
        where: the file it was read from, for the message.

    Raises:
        DataError: one line naming the file and the entry.
    """
    splits = record.get("splits")
    if not isinstance(splits, dict):
        raise DataError(f"{where}: corrupt manifest (no 'splits' object)")
    for split, value in splits.items():
        entries = value.get("shards") if isinstance(value, dict) else value
        if not isinstance(entries, list):
            raise DataError(f"{where}: corrupt manifest (splits.{split} has no list of shards)")
        for i, entry in enumerate(entries):
            name = entry.get("name") if isinstance(entry, dict) else None
            if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name
                    or os.path.isabs(name)):
                raise DataError(f"{where}: shard entry splits.{split}[{i}] has name {name!r}, not a plain file name "
                                f"inside the shard directory (the writer names shards like {shard_name(split, i)}); "
                                f"refusing a path that leaves the directory: rewrite the shards with "
                                f"`roberta-pl-data shards`")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f"{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    tmp.write_text(text)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# One sample: encode (writer) and decode with every check (reader)
# ---------------------------------------------------------------------------------------------


def _npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def _npy_array(data: bytes | None, allowed: np.dtype, where: str) -> np.ndarray:
    """A 1-D array of dtype ``allowed`` from ``.npy`` bytes, without a copy (and never unpickling)."""
    if not data:
        raise DataError(f"{where} is missing")
    try:
        stream = io.BytesIO(data)
        version = np.lib.format.read_magic(stream)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = reader(stream)
    except (ValueError, OSError, SyntaxError) as exc:
        raise DataError(f"{where} is not a valid .npy array ({str(exc).splitlines()[0]})") from None
    if dtype != allowed or len(shape) != 1 or fortran:
        raise DataError(f"{where} is {dtype.str} {shape}, expected a 1-D {allowed.str} array")
    start = stream.tell()
    if len(data) - start != shape[0] * dtype.itemsize:
        raise DataError(f"{where} holds {len(data) - start} bytes for {shape[0]} values of {dtype.itemsize} bytes")
    return np.frombuffer(data, dtype=dtype, count=shape[0], offset=start)


def encode_sample(key: str, ids: np.ndarray, offsets: np.ndarray, meta: dict) -> dict:
    """One WebDataset sample (``{"__key__", "json", "ids.npy", "offsets.npy"}``, all bytes).

    Args:
        key: the sample key (no dots).
        ids: the documents' ids end to end (``uint16`` or ``int32``).
        offsets: ``uint32``, ``len(docs) + 1`` entries from 0 to ``len(ids)``.
        meta: shard-level fields for the ``.json`` member (``tokenizer_hash``, ``shard``, ``sample``,
            ``samples``); format, dtype, counts and the CRC are added here.

    Returns:
        The sample dict, ready for ``webdataset.TarWriter(encoder=False)``.
    """
    meta = {"format": FORMAT_VERSION, **meta, "dtype": dtype_name(ids.dtype), "num_docs": len(offsets) - 1,
            "num_tokens": len(ids), "crc32": zlib.crc32(np.ascontiguousarray(ids).data)}
    return {"__key__": key, "json": json.dumps(meta).encode(), "ids.npy": _npy_bytes(ids),
            "offsets.npy": _npy_bytes(offsets.astype(OFFSETS_DTYPE, copy=False))}


def format1_message(where: str) -> str:
    """The one-line refusal of a shard (or manifest) written in format 1."""
    return f"{where}: written in shard format 1 (one document per sample), which this version no longer reads; {REWRITE_HINT}"


def decode_sample(sample: dict, *, url: str, index: int, expected_hash: str | None, vocab_size: int | None) -> tuple[dict, np.ndarray, np.ndarray]:
    """Check one sample of a shard and return ``(meta, ids, offsets)``.

    Args:
        sample: a WebDataset sample (``__key__`` plus raw member bytes by extension).
        url: the shard, for messages.
        index: the sample's position in the shard (must equal its recorded ``sample``).
        expected_hash: the tokenizer hash it must carry (``None``: don't check).
        vocab_size: ids must be below this (``None``: don't check).

    Returns:
        The ``.json`` dict, the ids and the offsets (read-only views of the sample's bytes).

    Raises:
        DataError: one line naming the shard and the sample.
    """
    key = sample.get("__key__")
    where = f"{url}: sample {key}"
    raw = sample.get("json")
    if raw is None:
        if index == 0 and "ids.npy" not in sample and "offsets.npy" not in sample:
            raise DataError(f"{url}: not a roberta-pl shard (its first sample, {key}, has none of its members)")
        raise DataError(f"{where}: incomplete (no .json member): truncated or corrupt shard")
    try:
        meta = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{where}: unreadable .json member ({exc.msg if hasattr(exc, 'msg') else exc})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_VERSION:
        version = meta.get("format") if isinstance(meta, dict) else None
        if version == 1:
            raise DataError(format1_message(url))
        raise DataError(f"{url}: not a roberta-pl shard of format {FORMAT_VERSION} (sample {key} says format {version!r})")
    if expected_hash is not None and meta.get("tokenizer_hash") != expected_hash:
        raise DataError(f"{url}: written with tokenizer {meta.get('tokenizer_hash')}, but the tokenizer/manifest is "
                        f"{expected_hash}; rewrite the shards with this tokenizer")
    if meta.get("sample") != index:
        raise DataError(f"{where}: is sample {meta.get('sample')} of the shard, expected {index} (corrupt or reordered shard)")
    dtype = DTYPES.get(meta.get("dtype"))
    if dtype is None:
        raise DataError(f"{where}: unknown id dtype {meta.get('dtype')!r}")
    ids = _npy_array(sample.get("ids.npy"), dtype, f"{where}: ids.npy")
    offsets = _npy_array(sample.get("offsets.npy"), OFFSETS_DTYPE, f"{where}: offsets.npy")
    if zlib.crc32(ids.data) != meta.get("crc32"):
        raise DataError(f"{where}: ids do not match their crc32 (corrupt shard)")
    if (len(offsets) != meta.get("num_docs", -1) + 1 or offsets[0] != 0 or int(offsets[-1]) != len(ids)
            or (len(offsets) > 2 and bool((np.diff(offsets.astype(np.int64)) < 0).any()))):
        raise DataError(f"{where}: offsets.npy is not {meta.get('num_docs')} + 1 rising offsets into its {len(ids)} ids")
    if vocab_size is not None and len(ids) and (int(ids.max()) >= vocab_size or (dtype.kind == "i" and int(ids.min()) < 0)):
        raise DataError(f"{where}: has ids outside [0, {vocab_size})")
    return meta, ids, offsets


# ---------------------------------------------------------------------------------------------
# The layout: which files each task reads and which shards it writes (the same in every task)
# ---------------------------------------------------------------------------------------------


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


def _layout(files: list[str] | None, sizes: list[float], num_tasks: int, num_shards: int, valid_fraction: float, seed: int) -> Layout:
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


def _init_worker(tokenizer_dir: str) -> None:
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
    encoded = [np.asarray(ids, dtype=dtype) for ids in tok.encode_batch(docs)]
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
    samples = _shard_samples(ids, lengths, order, max(1, SAMPLE_BYTES // ids.dtype.itemsize))
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
# The driver
# ---------------------------------------------------------------------------------------------


def task_record_name(task: int, num_tasks: int) -> str:
    """File name (under ``.tasks/``) of what task ``task`` of ``num_tasks`` wrote."""
    return f"task-{task:05d}-of-{num_tasks:05d}.json"


def _plan_digest(plan: dict) -> str:
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def _check_plan(out: Path, plan: dict) -> None:
    plan_path = out / PLAN
    if plan_path.exists():
        previous = json.loads(plan_path.read_text())
        if previous != plan:
            if previous.get("format") == 1:
                raise DataError(f"{out}: holds shards of format 1; write the new shards into a new directory")
            changed = sorted(k for k in set(plan) | set(previous) if previous.get(k) != plan.get(k))
            raise DataError(f"{out}: holds shards written with other settings ({', '.join(changed)}); use a new directory")
    else:
        _atomic_write_text(plan_path, json.dumps(plan, indent=2) + "\n")


def _task_done(out: Path, record_path: Path, digest: str) -> dict | None:
    """The task's record when it finished under this plan and all its shards are still there, else None."""
    if not record_path.exists():
        return None
    record = json.loads(record_path.read_text())
    if record.get("plan") != digest:
        return None
    for entries in record["splits"].values():
        for s in entries:
            p = out / s["name"]
            if not p.exists() or p.stat().st_size != s["num_bytes"]:
                return None
    return record


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


def _run_task(ctx: dict, task: int, pool: ProcessPoolExecutor | None, workers: int, bar, documents) -> dict:
    """Tokenize one task's documents into its shards and record them in ``.tasks/``; returns the record."""
    out: Path = ctx["out"]
    layout: Layout = ctx["layout"]
    tok: SpmTokenizer = ctx["tok"]
    seed = ctx["seed"]
    K = layout.num_tasks
    record_path = out / TASKS_DIR / task_record_name(task, K)
    done = _task_done(out, record_path, ctx["digest"])
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
    _atomic_write_text(record_path, json.dumps(record, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    if report.total:
        log.warning("task %d: skipped %d bad inputs: %s", task, report.total, dict(report.counts))
    log.info("task %d of %d: %d shards written, %d identical ones kept", task, K, written, sum(counts.values()) - written)
    return record


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
    layout = _layout(files, sizes, num_tasks, max(num_shards, num_tasks) if auto else num_shards, valid_fraction, seed)
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
    _check_plan(out, plan)
    tokens = sum(sizes) / TEXT_BYTES_PER_TOKEN
    if auto:
        _log_shard_choice(sum(layout.train), tokens, itemsize)
    per_shard = tokens * itemsize * (1 - valid_fraction) / sum(layout.train)
    if per_shard > 4 * SHARD_BYTES:
        log.warning("~%s of ids per shard: a shard is held in memory (about twice) while it is written; pass "
                    "--num-shards %d or more for shards of ~%s", _human_bytes(per_shard), math.ceil(per_shard * sum(layout.train) / SHARD_BYTES),
                    _human_bytes(SHARD_BYTES))
    ctx = {"out": out, "layout": layout, "tok": tok, "seed": seed, "digest": _plan_digest(plan), "text_field": text_field,
           "on_error": on_error, "valid_fraction": valid_fraction}
    tasks = range(num_tasks) if task_index is None else [task_index]

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    workers = available_cpus() if num_workers is None else num_workers
    # spawn, not fork: the caller may hold threads (rich's refresher, torch, a Trainer) whose locks a
    # forked child would inherit mid-flight.
    pool = (
        ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=(str(tok.path),))
        if workers > 0 else None
    )
    try:
        with Progress(*columns, disable=not progress, transient=False) as bar:
            for task in tasks:
                record = _run_task(ctx, task, pool, workers, bar, documents)
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


def _task_records(out: Path) -> tuple[dict, list[dict]]:
    """The plan and every task's record of a shard directory; a DataError naming the unfinished tasks."""
    plan_path = out / PLAN
    if not plan_path.exists():
        raise DataError(f"{out}: no {PLAN}; not a directory written by `roberta-pl-data shards`")
    plan = json.loads(plan_path.read_text())
    if plan.get("format") != FORMAT_VERSION:
        raise DataError(format1_message(str(out)))
    digest = _plan_digest(plan)
    K = plan["num_tasks"]
    records, missing = [], []
    for t in range(K):
        path = out / TASKS_DIR / task_record_name(t, K)
        record = json.loads(path.read_text()) if path.exists() else None
        if record is None or record.get("plan") != digest:
            missing.append(t)
        else:
            check_shard_names(record, path)  # its names go into the manifest
        records.append(record)
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise DataError(f"{out}: {len(missing)} of {K} tasks have not finished (task {shown}); run them "
                        f"(`roberta-pl-data shards ... --num-tasks {K} --task-index I`), then merge again")
    return plan, records


def merge_manifests(out_dir: str | os.PathLike) -> dict:
    """Combine the tasks' records of a shard directory into ``manifest.json``.

    Args:
        out_dir: the shard directory (with ``.plan.json`` and ``.tasks/``).

    Returns:
        The manifest dict (also written to ``out_dir/manifest.json``).

    Raises:
        DataError: a task has not finished, or a shard it wrote is missing or has another size.
    """
    out = Path(out_dir)
    plan, records = _task_records(out)
    K = plan["num_tasks"]
    report = SkipReport()
    for r in [plan["input_skips"], *(rec["skipped"] for rec in records)]:
        report.counts.update(r["counts"])
        for reason, examples in r["examples"].items():
            kept = report.examples.setdefault(reason, [])
            kept.extend(examples[: 5 - len(kept)])
    manifest_splits = {}
    for split in SPLITS:
        shards = [s for rec in records for s in rec["splits"].get(split, [])]
        if not shards:
            continue
        for s in shards:
            p = out / s["name"]
            if not p.exists() or p.stat().st_size != s["num_bytes"]:
                raise DataError(f"{p}: missing or changed since its task wrote it; rerun that task")
        docs = sum(s["num_docs"] for s in shards)
        if docs == 0:
            continue  # e.g. a valid fraction too small for a tiny corpus: no such split (its empty shards stay)
        tokens = sum(s["num_tokens"] for s in shards)
        size = sum(s["num_bytes"] for s in shards)
        manifest_splits[split] = {
            "pattern": f"{split}-{{{0:06d}..{len(shards) - 1:06d}}}.tar",
            "num_shards": len(shards),
            "num_docs": docs,
            "num_tokens": tokens,
            "num_bytes": size,
            "bytes_per_token": round(size / max(1, tokens), 4),
            "shards": shards,
        }
    if "train" not in manifest_splits:
        raise DataError(f"no documents found in the inputs of {out}; nothing to shard")
    manifest = {
        "format": FORMAT_VERSION,
        "tokenizer_hash": plan["tokenizer_hash"],
        "tokenizer_dir": records[0]["tokenizer_dir"],
        "vocab_size": records[0]["vocab_size"],
        "dtype": records[0]["dtype"],
        "num_tasks": K,
        "valid_fraction": plan["valid_fraction"],
        "seed": plan["seed"],
        "sample_bytes": SAMPLE_BYTES,
        "splits": manifest_splits,
        "skipped": report.to_dict(),
    }
    _atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    if report.total:
        log.warning("skipped %d bad inputs: %s (listed in %s)", report.total, dict(report.counts), out / MANIFEST)
    log.info("wrote %s: %s", out / MANIFEST, ", ".join(
        f"{s} {v['num_shards']} shards, {v['num_docs']:,} docs, {v['num_tokens']:,} tokens, {v['bytes_per_token']:.2f} bytes/token"
        for s, v in manifest_splits.items()))
    return manifest


def load_manifest(path: str | os.PathLike) -> dict:
    """Read a ``manifest.json`` (or the one inside a shard directory).

    Args:
        path: the manifest file or its directory.

    Returns:
        The manifest dict, with ``"root"`` set to its directory.
    """
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST
    try:
        manifest = json.loads(p.read_text())
    except FileNotFoundError:
        if (p.parent / PLAN).exists():  # tasks started here but not all have finished (or nobody merged)
            try:
                _task_records(p.parent)
            except DataError as exc:
                raise DataError(f"{p}: no manifest yet: {str(exc).split(': ', 1)[1]}") from None
            raise DataError(f"{p}: no manifest yet, but every task has finished: run `roberta-pl-data merge-manifests "
                            f"{p.parent}`") from None
        raise DataError(f"{p}: no manifest; write shards with `roberta-pl-data shards`") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{p}: corrupt manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{p}: corrupt manifest (a JSON {type(manifest).__name__}, not an object)")
    if manifest.get("format") != FORMAT_VERSION:
        raise DataError(format1_message(str(p.parent)) if manifest.get("format") == 1 else
                        f"{p}: manifest of an unknown shard format {manifest.get('format')!r}; {REWRITE_HINT}")
    check_shard_names(manifest, p)
    manifest["root"] = str(p.parent)
    return manifest
