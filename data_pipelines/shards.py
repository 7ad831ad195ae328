"""Tokenize a corpus into WebDataset tar shards of token ids, with a manifest.

Layout of an output directory::

    manifest.json           shards per split with doc/token counts, tokenizer hash, skipped inputs
    train-000000.tar ...    one document per sample, plus a leading "_shard.json" header sample
    valid-000000.tar ...
    .plan.json              the settings of the run; a rerun with other settings is refused

Each sample is ``{"__key__": "<doc index>", "u16"|"i32": raw little-endian ids}`` — a compact
dtype (uint16 when the vocabulary fits, else int32) and no pickles. The first member of every
tar is a header ``_shard.json`` with the tokenizer hash, dtype and counts, so a reader can refuse
a shard from another tokenizer and detect a truncated tar.

Documents are assigned to shards by position (``docs_per_shard`` per shard, per split), so
which documents belong to a shard is known without tokenizing. Each shard is written as
``NAME.partial`` and renamed when complete; a rerun skips shards that exist under their final
name and rewrites the rest, so an interrupted run resumes and never leaves a shard that looks
valid but is not.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import struct
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path

import numpy as np
import webdataset as wds

from data_pipelines.corpus import iter_documents
from data_pipelines.errors import DataError, OnError, SkipReport, check_on_error
from data_pipelines.tokenizer import SpmTokenizer, load_tokenizer

log = logging.getLogger("data_pipelines")

MANIFEST = "manifest.json"
PLAN = ".plan.json"
HEADER_KEY = "_shard"
FORMAT_VERSION = 1
PARTIAL_SUFFIX = ".partial"


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab < 65536), else int32; always little-endian."""
    return np.dtype("<u2") if vocab_size <= 65536 else np.dtype("<i4")


def dtype_ext(dtype: np.dtype) -> str:
    """The sample field name that carries ids of ``dtype`` ("u16" or "i32")."""
    return {"u2": "u16", "i4": "i32"}[np.dtype(dtype).str[1:]]


def ext_dtype(ext: str) -> np.dtype:
    """Inverse of :func:`dtype_ext`."""
    return {"u16": np.dtype("<u2"), "i32": np.dtype("<i4")}[ext]


def is_valid_split(unit_hash: float, valid_fraction: float) -> bool:
    """Whether a document with this hash-derived number in [0, 1) goes to the valid split."""
    return unit_hash < valid_fraction


def _unit_hash(seed: int, index: int) -> float:
    # A hash of the document index, not an RNG stream, so the split of document i never depends
    # on how many documents were skipped before it or on the number of worker processes.
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return struct.unpack("<Q", digest)[0] / 2**64


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split``, e.g. ``train-000003.tar``."""
    return f"{split}-{index:06d}.tar"


# ---------------------------------------------------------------------------------------------
# Writing one shard (runs in worker processes)
# ---------------------------------------------------------------------------------------------

_WORKER_TOKENIZER: SpmTokenizer | None = None


def _init_worker(tokenizer_dir: str) -> None:
    global _WORKER_TOKENIZER
    _WORKER_TOKENIZER = load_tokenizer(tokenizer_dir)


def _write_shard(path: str, split: str, first_index: int, docs: list[str], tokenizer_dir: str) -> dict:
    """Tokenize ``docs`` and write them as one tar shard at ``path`` (via a ``.partial`` file)."""
    tok = _WORKER_TOKENIZER if _WORKER_TOKENIZER is not None else load_tokenizer(tokenizer_dir)
    dtype = token_dtype(tok.vocab_size)
    ext = dtype_ext(dtype)
    arrays = [np.asarray(ids, dtype=dtype) for ids in tok.encode_batch(docs)]
    num_tokens = int(sum(len(a) for a in arrays))
    header = {
        "format": FORMAT_VERSION,
        "tokenizer_hash": tok.hash,
        "dtype": ext,
        "split": split,
        "name": os.path.basename(path),
        "first_doc": first_index,
        "num_docs": len(arrays),
        "num_tokens": num_tokens,
    }
    partial = path + PARTIAL_SUFFIX
    with open(partial, "wb") as fh:
        # mtime fixed so the same input gives byte-identical shards.
        with wds.TarWriter(fh, encoder=False, mtime=0) as writer:
            writer.write({"__key__": HEADER_KEY, "json": json.dumps(header).encode()})
            for i, arr in enumerate(arrays):
                writer.write({"__key__": f"{first_index + i:010d}", ext: arr.tobytes()})
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(partial, path)  # atomic: the final name only ever holds a complete shard
    return {"name": header["name"], "num_docs": len(arrays), "num_tokens": num_tokens}


def read_shard_header(path: str | os.PathLike) -> dict:
    """Read the ``_shard.json`` header (the first member) of a shard file.

    Args:
        path: a local shard path.

    Returns:
        The header dict.
    """
    try:
        with tarfile.open(path, mode="r|") as tar:
            member = next(iter(tar), None)
            if member is None or member.name != f"{HEADER_KEY}.json":
                raise DataError(f"{path}: not a roberta-pl shard (first member is not {HEADER_KEY}.json)")
            return json.loads(tar.extractfile(member).read())
    except (tarfile.TarError, OSError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: unreadable shard header ({exc})") from None


# ---------------------------------------------------------------------------------------------
# The driver
# ---------------------------------------------------------------------------------------------


def _chunks(
    docs: Iterable[str], valid_fraction: float, seed: int, docs_per_shard: int
) -> Iterator[tuple[str, int, int, list[str]]]:
    """Yield ``(split, shard_index, first_doc_index, docs)`` as each shard's documents are known."""
    pending: dict[str, list[str]] = {"train": [], "valid": []}
    counts = {"train": 0, "valid": 0}  # documents assigned to each split so far
    shards = {"train": 0, "valid": 0}
    for index, doc in enumerate(docs):
        split = "valid" if valid_fraction > 0 and is_valid_split(_unit_hash(seed, index), valid_fraction) else "train"
        pending[split].append(doc)
        counts[split] += 1
        if len(pending[split]) == docs_per_shard:
            yield split, shards[split], counts[split] - docs_per_shard, pending[split]
            shards[split] += 1
            pending[split] = []
    for split in ("train", "valid"):
        if pending[split]:
            yield split, shards[split], counts[split] - len(pending[split]), pending[split]


def write_shards(
    inputs: str | os.PathLike | Sequence[str | os.PathLike] | None,
    tokenizer_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    documents: Iterable[str] | None = None,
    docs_per_shard: int = 10_000,
    valid_fraction: float = 0.0,
    seed: int = 0,
    text_field: str = "text",
    on_error: OnError = "raise",
    num_workers: int | None = None,
    progress: bool = True,
) -> dict:
    """Tokenize documents in parallel and write train/valid WebDataset shards plus ``manifest.json``.

    Args:
        inputs: files, directories, globs or ``"@default"`` (ignored when ``documents`` is given).
        tokenizer_dir: a directory written by :func:`data_pipelines.tokenizer.train_tokenizer`.
        out_dir: where shards and the manifest go. A rerun into the same directory with the same
            settings resumes: complete shards are kept, ``.partial`` leftovers are rewritten.
        documents: an iterable of document strings to use instead of reading ``inputs``.
        docs_per_shard: documents per shard; pick it so a shard is ~50–500 MB at scale and there
            are at least ``world_size × num_workers`` train shards.
        valid_fraction: fraction of documents (chosen by a hash of their index) for validation.
        seed: seed of the train/valid assignment.
        text_field: JSON key holding the text in ``.jsonl`` inputs.
        on_error: ``"raise"`` or ``"skip"`` for bad input; skips are listed in the manifest.
        num_workers: tokenizer processes (default: CPU count; 0 tokenizes in this process).
        progress: show a rich progress bar.

    Returns:
        The manifest dict (also written to ``out_dir/manifest.json``).
    """
    check_on_error(on_error)
    if docs_per_shard < 1:
        raise DataError(f"docs_per_shard must be >= 1, got {docs_per_shard}")
    if not 0.0 <= valid_fraction < 1.0:
        raise DataError(f"valid_fraction must be in [0, 1), got {valid_fraction}")
    tok = load_tokenizer(tokenizer_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = {
        "format": FORMAT_VERSION,
        "tokenizer_hash": tok.hash,
        "docs_per_shard": docs_per_shard,
        "valid_fraction": valid_fraction,
        "seed": seed,
        "text_field": text_field,
        "inputs": None if documents is not None else [os.fspath(i) for i in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs or [])],
    }
    plan_path = out / PLAN
    if plan_path.exists():
        previous = json.loads(plan_path.read_text())
        if previous != plan:
            changed = sorted(k for k in plan if previous.get(k) != plan[k])
            raise DataError(f"{out}: holds shards written with other settings ({', '.join(changed)}); use a new directory")
    else:
        plan_path.write_text(json.dumps(plan, indent=2) + "\n")
    for stale in out.glob("*" + PARTIAL_SUFFIX):
        stale.unlink()  # leftovers of an interrupted run; their shard is rewritten below

    report = SkipReport()
    if documents is None:
        if inputs is None:
            raise DataError("no inputs given")
        documents = iter_documents(inputs, text_field=text_field, on_error=on_error, report=report)
    workers = (os.cpu_count() or 1) if num_workers is None else num_workers
    results: dict[str, dict[int, dict]] = {"train": {}, "valid": {}}
    reused = 0

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    columns = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    # spawn, not fork: the caller may hold threads (rich's refresher, torch, a Trainer) whose locks a
    # forked child would inherit mid-flight.
    pool = (
        ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_init_worker, initargs=(str(tok.path),))
        if workers > 0 else None
    )
    inflight: list[tuple[str, int, Future]] = []
    try:
        with Progress(*columns, disable=not progress, transient=False) as bar:
            task = bar.add_task("shards written", total=None)

            def collect(block: bool) -> None:
                # Keep at most 2 shards per worker in flight, so memory stays bounded by a few shards.
                while inflight and (block or inflight[0][2].done()):
                    split, index, fut = inflight.pop(0)
                    results[split][index] = fut.result()
                    bar.advance(task)

            for split, index, first, docs in _chunks(documents, valid_fraction, seed, docs_per_shard):
                path = out / shard_name(split, index)
                if path.exists():
                    header = read_shard_header(path)
                    if header["tokenizer_hash"] != tok.hash or header["num_docs"] != len(docs) or header["first_doc"] != first:
                        raise DataError(f"{path}: existing shard does not match this run (other input or tokenizer); use a new directory")
                    results[split][index] = {k: header[k] for k in ("name", "num_docs", "num_tokens")}
                    reused += 1
                    bar.advance(task)
                    continue
                if pool is None:
                    results[split][index] = _write_shard(str(path), split, first, docs, str(tok.path))
                    bar.advance(task)
                else:
                    inflight.append((split, index, pool.submit(_write_shard, str(path), split, first, docs, str(tok.path))))
                    collect(block=len(inflight) >= 2 * workers)
            collect(block=True)
    finally:
        if pool is not None:
            pool.shutdown(cancel_futures=True)

    if not results["train"]:
        raise DataError(f"no documents found in {inputs!r}; nothing to shard")
    manifest = {
        "format": FORMAT_VERSION,
        "tokenizer_hash": tok.hash,
        "tokenizer_dir": str(tok.path.resolve()),
        "vocab_size": tok.vocab_size,
        "dtype": dtype_ext(token_dtype(tok.vocab_size)),
        "docs_per_shard": docs_per_shard,
        "valid_fraction": valid_fraction,
        "seed": seed,
        "splits": {},
        "skipped": report.to_dict(),
    }
    for split, shards in results.items():
        if not shards:
            continue
        ordered = [shards[i] for i in sorted(shards)]
        manifest["splits"][split] = {
            "pattern": f"{split}-{{{0:06d}..{len(ordered) - 1:06d}}}.tar",
            "num_shards": len(ordered),
            "num_docs": sum(s["num_docs"] for s in ordered),
            "num_tokens": sum(s["num_tokens"] for s in ordered),
            "shards": ordered,
        }
    tmp = out / (MANIFEST + PARTIAL_SUFFIX)
    tmp.write_text(json.dumps(manifest, indent=2) + "\n")
    os.replace(tmp, out / MANIFEST)
    if report.total:
        log.warning("skipped %d bad inputs: %s (listed in %s)", report.total, dict(report.counts), out / MANIFEST)
    log.info("wrote %s: %s (%d shards reused from an earlier run)", out, {s: v["num_docs"] for s, v in manifest["splits"].items()}, reused)
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
        raise DataError(f"{p}: no manifest; write shards with `roberta-pl-data shards`") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{p}: corrupt manifest ({exc})") from None
    manifest["root"] = str(p.parent)
    return manifest
