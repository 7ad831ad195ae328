"""The shard format (2): a WebDataset sample of many documents' token ids, encoded by the writer
(:mod:`data_pipelines.shard_tasks`), decoded with every check by the reader, and a whole shard read back
document by document (:func:`iter_shard`).

**Samples**. Each sample holds about 1 MiB of token ids, as three members::

    KEY.json          {"format": 2, "tokenizer_hash", "dtype", "shard", "sample", "samples",
                       "num_docs", "num_tokens", "crc32"}
    KEY.ids.npy       the ids of the sample's documents end to end: uint16 when the vocabulary fits, else int32
    KEY.offsets.npy   uint32, num_docs + 1 entries: document d is ids[offsets[d]:offsets[d + 1]]

``.npy`` arrays are read with ``allow_pickle=False``; nothing in a shard is a pickle. At ~2 bytes a token
(the offsets and the tar headers add ~3%), a shard is about as large as its ids. ``sample``/``samples``
number the samples of a shard, so a tar cut short between members is detected, and ``crc32`` covers the
ids. Any WebDataset user reads them: ``webdataset.WebDataset(url).decode()`` gives each sample's
``"ids.npy"`` and ``"offsets.npy"`` as arrays (see docs/data.md).
"""

from __future__ import annotations

import io
import json
import zlib
from collections.abc import Iterator

import numpy as np

from data_pipelines.errors import DataError, OnError, SkipReport

FORMAT_VERSION = 2

# A sample carries this many bytes of ids (at least; a document is never cut): big enough that tar headers
# and per-sample reading cost nothing (3 members per MiB), small enough to decode at once.
# The writer reads it as ``shard_format.SAMPLE_BYTES`` when it writes, so a test can make small samples.
SAMPLE_BYTES = 1 << 20

DTYPES = {"uint16": np.dtype("<u2"), "int32": np.dtype("<i4")}
OFFSETS_DTYPE = np.dtype("<u4")

REWRITE_HINT = ("rewrite them with `roberta-pl-data shards --tokenizer TOK --out NEW_DIR INPUTS` "
                "(same inputs and tokenizer, a new directory)")


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab <= 65536), else int32; always little-endian."""
    return DTYPES["uint16"] if vocab_size <= 65536 else DTYPES["int32"]


def dtype_name(dtype: np.dtype) -> str:
    """The name a shard records for its id dtype: ``"uint16"`` or ``"int32"``."""
    return {v.str: k for k, v in DTYPES.items()}[np.dtype(dtype).str]


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
# Reading one shard
# ---------------------------------------------------------------------------------------------


def _open_shard(url: str):
    if url.startswith("pipe:") or "://" in url:
        from webdataset.gopen import gopen
        return gopen(url, "rb")  # webdataset's opener: pipe: commands, http(s), etc.
    return open(url, "rb", buffering=1 << 20)


def iter_shard(
    url: str, *, expected_hash: str | None, vocab_size: int | None, on_error: OnError, report: SkipReport
) -> Iterator[np.ndarray]:
    """Yield the documents of one shard, checking every sample and that the shard is complete.

    The tar is read with webdataset's own iteration (``tar_file_iterator`` + ``group_by_keys``, as
    ``webdataset.WebDataset`` does); each sample is checked by :func:`decode_sample`
    (format, tokenizer hash, dtype, CRC of the ids, offsets, id range, its place in the shard).

    Args:
        url: local path or ``pipe:`` command.
        expected_hash: the tokenizer hash the shard must carry (``None``: don't check).
        vocab_size: ids must be below this (``None``: don't check).
        on_error: ``"raise"`` a :class:`DataError` naming the shard, or ``"skip"`` the rest of
            the shard with a counted warning.
        report: where skips are counted.

    Returns:
        An iterator of 1-D integer arrays (read-only views), one per document.
    """
    # Here, not at the top: webdataset imports torch, which the writer's tokenizer processes never need.
    from webdataset.tariterators import group_by_keys, tar_file_iterator

    samples = 0
    total = None
    try:
        with _open_shard(url) as stream:
            members = ({**member, "__url__": url} for member in tar_file_iterator(stream))
            for sample in group_by_keys(members):
                meta, ids, offsets = decode_sample(sample, url=url, index=samples, expected_hash=expected_hash, vocab_size=vocab_size)
                total = meta["samples"]
                samples += 1
                bounds = offsets.tolist()
                for a, b in zip(bounds[:-1], bounds[1:]):
                    yield ids[a:b]
        if total is None:
            raise DataError(f"{url}: empty or unreadable shard")
        if samples != total:
            # A tar cut between members, or a corrupt member header (tarfile then stops as if at the end).
            raise DataError(f"{url}: truncated or corrupt shard ({samples} of {total} samples readable)")
    except DataError as exc:
        if on_error == "raise":
            raise
        report.handle("skip", "bad_shard", url, str(exc).split(": ", 1)[-1])
    except Exception as exc:  # tarfile/gzip/OS errors from a truncated or corrupt tar, a failed pipe
        # webdataset appends " @ <the file object>" (and more args) to errors it passes on: the url says it already.
        first = exc.strerror if isinstance(exc, OSError) and exc.strerror else (
            exc.args[0] if exc.args and isinstance(exc.args[0], str) else str(exc))
        detail = first.splitlines()[0].split(" @ ")[0] if first else ""
        message = f"{url}: corrupt or unreadable shard ({type(exc).__name__}: {detail})"
        if on_error == "raise":
            raise DataError(message) from None
        report.handle("skip", "bad_shard", url, message.split(": ", 1)[-1])
