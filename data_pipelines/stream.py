"""Stream shards → documents → packed blocks → masked batches, split over ranks and workers.

Who reads what. Readers are the ``world_size × num_workers`` DataLoader workers of all ranks;
reader ``rank * num_workers + worker`` owns a fixed subset of shards, chosen once per ``seed``
by a balanced greedy partition on token counts (so every reader holds about the same number of
tokens). Each epoch, a reader visits its shards in an order drawn from (seed, epoch, reader),
reading ``interleave_shards`` consecutive shards of that order at once (a document from each in
turn, then the next group: a shard written by one task of a job array holds only that task's
files, and the mix should not wait for the next shard), packs its documents into blocks, shuffles
blocks in windows of ``shuffle_window`` with an RNG drawn from (seed, epoch, reader, window),
batches them and masks each batch with a generator seeded from (seed, step, rank).

Equal batches everywhere, and (almost) every block used. From the manifest's counts each
reader's block count is known exactly (``full`` packing) or bounded below (``doc``). Every rank
runs the same number of batches per epoch, ``len(stream)``: as many as the blocks of *all* readers
fill (a multiple of ``batch_multiple``), so DDP never waits on a rank that ran dry and less than one
global batch of blocks (``world_size × batch_size × batch_multiple``) is left unused per epoch.
Worker role ``w`` of a rank yields ``ceil((len - w) / workers)`` of them (the DataLoader's
round-robin hands them out in order). A reader first takes blocks from its own shards; a reader
whose shards give fewer blocks than its quota then takes the tail of a reader whose shards give
more (``EpochPlan.borrowed``: which reader, from which block, how many; a function of the shard
counts and the seed only), reading that reader's stream at the block offset, so each block of an
epoch is used once. If a reader runs short anyway (a shard skipped as corrupt with
``on_error="skip"``), it starts its shard list over rather than stop early, and logs it.

Exact resume. Batch ``g`` of an epoch is produced by the reader with role ``g % num_workers`` (the
DataLoader round-robins over workers). To restart at batch ``k``, worker ``w`` takes role
``(w + k) % num_workers`` and skips the blocks its role already produced: with counts, ``full``
mode seeks by token arithmetic to the right group of shards and only reads that group's documents
up to the cursor (O(``interleave_shards`` shards)), in its own stream or in the one it borrows from;
``doc`` mode, or shards without counts, replay the reader's blocks without masking them (O(blocks
skipped)).

Resume on another plan (world size, workers, micro-batch size). :func:`rest_of_epoch` lists, from the old plan
and the saved position, the blocks the old readers had not consumed (a :class:`Carry`: ranges of their shuffled
epoch streams); :meth:`MaskedBatchStream.set_carry` deals them to the new readers in whole batches as the epoch's
last batches (:func:`deal_carry`), read from the old readers' streams. No block of the epoch is used twice or
lost, but for less than one global batch of the new plan; later epochs follow the new plan.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import multiprocessing
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.gopen import gopen
from webdataset.shardlists import expand_urls
from webdataset.tariterators import group_by_keys, tar_file_iterator

from data_pipelines.contract import BATCH_KEYS
from data_pipelines.errors import DataError, OnError, SkipReport
from data_pipelines.masking import Masker, mask_generator
from data_pipelines.packing import PackMode, block_count_lower_bound, pack
from data_pipelines.shards import MANIFEST, decode_sample, load_manifest

log = logging.getLogger("data_pipelines")

TRAIN_STREAM, VALID_STREAM = 0, 1


@dataclass(frozen=True)
class ShardInfo:
    """One shard: where it is, and its counts when a manifest gave them."""

    url: str
    num_docs: int | None = None
    num_tokens: int | None = None


@dataclass(frozen=True)
class ShardSet:
    """The shards of one split, with the tokenizer hash their manifest records (if any)."""

    shards: tuple[ShardInfo, ...]
    tokenizer_hash: str | None = None

    @property
    def has_counts(self) -> bool:
        """Whether every shard has doc and token counts (needed for exact epoch planning)."""
        return all(s.num_docs is not None and s.num_tokens is not None for s in self.shards)


def resolve_shards(spec: str | os.PathLike | Sequence[str], split: str = "train", manifest: str | os.PathLike | None = None) -> ShardSet:
    """Turn a shard spec into a :class:`ShardSet`.

    Args:
        spec: a shard directory or ``manifest.json`` (its ``split`` shards are used); a brace
            pattern like ``/data/train-{000000..000099}.tar``; a ``pipe:`` command such as
            ``"pipe:aws s3 cp s3://bucket/train-{000000..000099}.tar -"``; or a list of these.
        split: which split of a manifest to use.
        manifest: a manifest to take counts and the tokenizer hash from, for shards given as
            patterns or ``pipe:`` URLs (matched by file name).

    Returns:
        The resolved shards in spec order.
    """
    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise DataError("empty shard spec")
    infos: list[ShardInfo] = []
    tokenizer_hash = None
    for item in specs:
        text = os.fspath(item)
        path = Path(text)
        if not text.startswith("pipe:") and (path.is_dir() or path.name == MANIFEST):
            found = load_manifest(path)
            if split not in found["splits"]:
                raise DataError(f"{path}: manifest has no {split!r} split (has {sorted(found['splits'])})")
            root = Path(found["root"])
            tokenizer_hash = found["tokenizer_hash"]
            infos.extend(ShardInfo(str(root / s["name"]), s["num_docs"], s["num_tokens"]) for s in found["splits"][split]["shards"])
            continue
        for url in expand_urls(text):  # webdataset's: braces, '::' lists, $WDS_ variables
            infos.append(ShardInfo(url))
    if manifest is not None:
        found = load_manifest(manifest)
        tokenizer_hash = found["tokenizer_hash"]
        counts = {s["name"]: s for sp in found["splits"].values() for s in sp["shards"]}
        infos = [
            ShardInfo(i.url, counts[n]["num_docs"], counts[n]["num_tokens"]) if (n := _basename(i.url)) in counts else i
            for i in infos
        ]
    return ShardSet(tuple(infos), tokenizer_hash)


def _basename(url: str) -> str:
    # For "pipe:cmd ... s3://b/train-000001.tar -" take the last token that looks like a tar.
    tars = re.findall(r"[^\s/]+\.tar\b", url)
    return tars[-1] if tars else os.path.basename(url)


def partition_shards(shards: Sequence[ShardInfo], num_readers: int, seed: int) -> list[list[int]]:
    """Assign each shard to one reader, balancing token counts (greedy, largest first).

    Args:
        shards: the shards; without counts every shard weighs the same.
        num_readers: ``world_size × num_workers``.
        seed: breaks ties between equal shards, so the assignment is a function of the seed.

    Returns:
        ``num_readers`` lists of shard indices; together they hold every shard exactly once.
    """
    if len(shards) < num_readers:
        raise DataError(
            f"{len(shards)} shards cannot feed {num_readers} readers (world_size × num_workers); "
            "write more shards (roberta-pl-data shards --num-shards) or use fewer DataLoader workers"
        )
    rng = np.random.default_rng([seed, 0x5A4D])
    tiebreak = rng.permutation(len(shards))
    weight = [(s.num_tokens or 0) + (s.num_docs or 0) if s.num_tokens is not None else 1 for s in shards]
    order = sorted(range(len(shards)), key=lambda i: (-weight[i], tiebreak[i]))
    loads = [0] * num_readers
    owned: list[list[int]] = [[] for _ in range(num_readers)]
    for i in order:
        # Fewest shards first, then lightest: every reader gets a shard before any gets two.
        reader = min(range(num_readers), key=lambda r: (len(owned[r]) if len(owned[r]) == 0 else 1, loads[r], r))
        owned[reader].append(i)
        loads[reader] += weight[i]
    return [sorted(o) for o in owned]


MAX_AUTO_WORKERS = 4  # ~4M tokens/s each (bench/data_throughput.py): far more than one GPU trains on


def default_num_workers(num_shards: int, world_size: int, cpus_per_rank: int) -> int:
    """DataLoader workers per rank that fit the machine and the shards, for ``num_workers`` left unset.

    At most :data:`MAX_AUTO_WORKERS`; at most the rank's CPUs less one (the training process needs one); and
    at most ``num_shards // world_size``, so that every reader owns whole shards instead of scanning all of
    them (0, reading in the training process, when even that is not possible).

    Args:
        num_shards: shards of the train split.
        world_size: data-parallel ranks.
        cpus_per_rank: CPUs each rank may use.

    Returns:
        The number of workers, >= 0.
    """
    return max(0, min(MAX_AUTO_WORKERS, cpus_per_rank - 1, num_shards // max(1, world_size)))


def epoch_order(owned: Sequence[int], seed: int, epoch: int, reader: int, cycle: int = 0) -> list[int]:
    """The order in which a reader visits its shards in an epoch: a function of its arguments."""
    rng = np.random.default_rng([seed, epoch, reader, cycle, 0x0D])
    return [owned[i] for i in rng.permutation(len(owned))]


@dataclass(frozen=True)
class EpochPlan:
    """Who reads which blocks in an epoch; the same every epoch and on every rank.

    Attributes:
        partition: per reader, the shard indices it owns.
        strided: fewer shards than readers: every reader scans every shard for its share of documents.
        role_batches: batches per epoch of each worker role of a rank (the same on every rank).
        reader_blocks: blocks a reader's own shards give per epoch (exact for ``full`` packing with
            counts, a lower bound for ``doc``, an estimate when strided).
        own: blocks each reader takes from the start of its own stream.
        borrowed: per reader, ``(source reader, first block, count)`` ranges of other readers'
            streams it takes after its own blocks.
        unused_blocks: blocks per epoch no reader uses (of ``sum(reader_blocks)``).
        total_tokens: tokens per epoch, separators included (``None`` without counts).
        unused_tokens: of those, tokens in no used block: unused blocks plus each reader's last,
            partial block (``None`` unless exact: ``full`` packing with counts, not strided).
    """

    partition: tuple[tuple[int, ...], ...]
    strided: bool
    role_batches: tuple[int, ...]
    reader_blocks: tuple[int, ...]
    own: tuple[int, ...]
    borrowed: tuple[tuple[tuple[int, int, int], ...], ...]
    unused_blocks: int
    total_tokens: int | None
    unused_tokens: int | None

    @property
    def batches_per_rank(self) -> int:
        """Batches per epoch on each rank."""
        return sum(self.role_batches)

    @property
    def exact(self) -> bool:
        """Whether the block counts are exact (else the unused figures are lower bounds or estimates)."""
        return self.unused_tokens is not None


def plan_epoch(config: "StreamConfig") -> EpochPlan:
    """Plan an epoch: the shard partition, batches per worker role, and how blocks are dealt.

    Args:
        config: the stream's settings (shards with counts, seq_len, batch size, world size,
            workers, batch_multiple, seed).

    Returns:
        The :class:`EpochPlan`. Raises :class:`DataError` when the data cannot fill one optimizer
        step on every rank, or when ``batches_per_epoch`` is not a multiple of the workers.
    """
    cfg = config
    workers = cfg.readers_per_rank
    readers = cfg.world_size * workers
    shards = cfg.shards.shards
    # Fewer shards than readers (a small valid split, say): every reader scans every shard
    # and keeps every readers-th document, instead of failing. Correct, but each reader
    # reads all the data, so it is only for small splits; seeking falls back to replay.
    strided = len(shards) < readers
    if strided:
        partition = [list(range(len(shards)))] * readers
    else:
        partition = partition_shards(shards, readers, cfg.seed)
    batch = cfg.batch_size
    body = cfg.seq_len - 2
    total_tokens = sum(s.num_tokens + s.num_docs for s in shards) if cfg.shards.has_counts else None
    if cfg.batches_per_epoch is not None:
        if cfg.batches_per_epoch < workers or cfg.batches_per_epoch % workers:
            raise DataError(f"batches_per_epoch={cfg.batches_per_epoch} must be a positive multiple of num_workers={workers}")
        per_worker = cfg.batches_per_epoch // workers
        quota = per_worker * batch
        blocks = [0] * readers
        if cfg.shards.has_counts:
            blocks = [block_count_lower_bound(sum(shards[i].num_docs for i in o), sum(shards[i].num_tokens for i in o), cfg.seq_len, cfg.pack_mode)
                      for o in partition]
        return EpochPlan(tuple(map(tuple, partition)), strided, (per_worker,) * workers, tuple(blocks), (quota,) * readers,
                         ((),) * readers, max(0, sum(blocks) - quota * readers), total_tokens, None)
    if not cfg.shards.has_counts:
        raise DataError("shards without a manifest have no counts: pass the manifest, or set batches_per_epoch")
    if strided:
        # Documents are dealt round-robin, so a reader's share is only known on average; plan
        # for 90% of it, and a reader that still runs short refills by cycling.
        whole = block_count_lower_bound(sum(s.num_docs for s in shards), sum(s.num_tokens for s in shards), cfg.seq_len, cfg.pack_mode)
        blocks = [whole * 9 // (10 * readers)] * readers
    elif cfg.pack_mode == "full_sentences":
        # Exact: a reader's shards form one contiguous packed stream.
        blocks = [block_count_lower_bound(sum(shards[i].num_docs for i in o), sum(shards[i].num_tokens for i in o), cfg.seq_len, "full_sentences")
                  for o in partition]
    else:
        blocks = [sum(block_count_lower_bound(shards[i].num_docs, shards[i].num_tokens, cfg.seq_len, "doc") for i in o) for o in partition]
    multiple = cfg.batch_multiple
    if strided:
        # Every reader's count is an estimate, so readers do not borrow: equal batches per worker.
        per_worker = min(blocks) // batch
        per_worker -= per_worker % (multiple // math.gcd(multiple, workers))
        per_rank = per_worker * workers
    else:
        # As many batches per rank as all readers' blocks fill, in whole optimizer steps.
        per_rank = sum(blocks) // (cfg.world_size * batch)
        per_rank -= per_rank % multiple
    if per_rank == 0:
        raise DataError(
            f"too little data: {len(blocks)} readers get {sum(blocks)} blocks of {cfg.seq_len} tokens (the smallest "
            f"{min(blocks)}), less than one optimizer step on each of {cfg.world_size} ranks ({multiple} batches of {batch}); "
            f"use more data, a smaller batch/seq_len or fewer workers"
        )
    role_batches = tuple(-(-(per_rank - w) // workers) for w in range(workers))
    quotas = [role_batches[r % workers] * batch for r in range(readers)]
    own = [min(b, q) for b, q in zip(blocks, quotas)]
    borrowed: list[list[tuple[int, int, int]]] = [[] for _ in range(readers)]
    if not strided:
        # Deal the tails of readers with more blocks than their quota to those with fewer, in reader order.
        spare = [[r, quotas[r], blocks[r] - quotas[r]] for r in range(readers) if blocks[r] > quotas[r]]
        for r in range(readers):
            need = quotas[r] - own[r]
            while need:
                source = spare[0]
                take = min(need, source[2])
                borrowed[r].append((source[0], source[1], take))
                source[1] += take
                source[2] -= take
                need -= take
                if not source[2]:
                    spare.pop(0)
    used = sum(quotas)
    unused_tokens = total_tokens - used * body if (cfg.pack_mode == "full_sentences" and not strided) else None
    return EpochPlan(tuple(map(tuple, partition)), strided, role_batches, tuple(blocks), tuple(own),
                     tuple(map(tuple, borrowed)), sum(blocks) - used, total_tokens, unused_tokens)


# ---------------------------------------------------------------------------------------------
# The rest of an epoch, after a resume on another world size or worker count
# ---------------------------------------------------------------------------------------------


def batches_before(position: int, role: int, workers: int) -> int:
    """Batches worker role ``role`` yields before batch ``position`` of an epoch (batch ``g`` is role ``g % workers``'s)."""
    return max(0, -(-(position - role) // workers))


Piece = tuple[int, int, int]  # (reader of the source plan, first block of its epoch stream, count)


def _take(pieces: Sequence[Piece], n: int) -> tuple[list[Piece], list[Piece]]:
    """Split ``pieces`` after their first ``n`` blocks: ``(those n, the rest)``."""
    head: list[Piece] = []
    rest = list(pieces)
    while n and rest:
        reader, first, count = rest.pop(0)
        take = min(n, count)
        head.append((reader, first, take))
        if take < count:
            rest.insert(0, (reader, first + take, count - take))
        n -= take
    return head, rest


@dataclass(frozen=True)
class Carry:
    """The blocks of an interrupted epoch not yet trained on, to be dealt to readers of another plan.

    A resume on another ``world_size`` (or ``num_workers``, or micro-batch size) re-plans the stream. The epoch
    it resumes in is finished with exactly the blocks the old readers had not consumed: they are read from the
    old readers' own streams (the *source* plan: its shard partition, shard order and shuffle windows, all
    functions of the seed and the epoch), in whole batches of the new plan; see :meth:`MaskedBatchStream.set_carry`.

    Attributes:
        epoch: the interrupted epoch.
        world_size, num_workers, batch_size, batch_multiple: the source plan's settings.
        pieces: the blocks left, in order: ``(source reader, first block, count)`` ranges of the source readers'
            epoch streams (block ``i`` of a reader is the ``i``-th block it yields in that epoch, shuffle included).
    """

    epoch: int
    world_size: int
    num_workers: int
    batch_size: int
    batch_multiple: int
    pieces: tuple[Piece, ...]

    @property
    def blocks(self) -> int:
        """Blocks left."""
        return sum(count for _, _, count in self.pieces)

    def source_config(self, config: "StreamConfig") -> "StreamConfig":
        """``config`` with the source plan's settings: the stream whose readers the pieces are read from."""
        return dataclasses.replace(config, world_size=self.world_size, num_workers=self.num_workers,
                                   batch_size=self.batch_size, batch_multiple=self.batch_multiple)

    def to_dict(self) -> dict:
        """Plain ints and lists, for a checkpoint."""
        return {**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, "pieces": [list(p) for p in self.pieces]}

    @classmethod
    def from_dict(cls, state: dict) -> "Carry":
        """The inverse of :meth:`to_dict`."""
        return cls(**{**state, "pieces": tuple(tuple(int(x) for x in p) for p in state["pieces"])})


def deal_carry(carry: Carry, plan: EpochPlan, batch_size: int, batch_multiple: int) -> tuple[int, list[list[Piece]], list[Piece]]:
    """Deal ``carry`` to the readers of ``plan`` as the last batches of the epoch, in whole optimizer steps.

    Each rank takes ``R`` batches: as many as the carried blocks fill on every rank, in multiples of
    ``batch_multiple``, at most one epoch. They are batches ``first .. len - 1`` of the epoch (batch ``g`` read by
    worker role ``g % workers``, as always), so batches ``0 .. first - 1`` count as done. Readers take the pieces in
    order, reader ``rank * workers + role`` after reader ``rank * workers + role - 1``.

    Returns:
        ``(first, per reader of plan its pieces, the pieces left over)``; the leftover is less than one global
        batch of the new plan (``world_size x batch_size x batch_multiple`` blocks) unless the carry holds more
        than an epoch.
    """
    per_rank, workers = plan.batches_per_rank, len(plan.role_batches)
    readers = len(plan.own)
    world = readers // workers
    carried = min(per_rank, carry.blocks // (world * batch_size))
    first = min(per_rank, -(-(per_rank - carried) // batch_multiple) * batch_multiple)  # whole steps done before
    rest = list(carry.pieces)
    dealt = []
    for reader in range(readers):
        role = reader % workers
        quota = (batches_before(per_rank, role, workers) - batches_before(first, role, workers)) * batch_size
        taken, rest = _take(rest, quota)
        dealt.append(taken)
    return first, dealt, rest


def rest_of_epoch(config: "StreamConfig", consumed: int, carry: Carry | None = None) -> Carry | None:
    """The blocks of the epoch holding data position ``consumed`` that are not yet trained on.

    Args:
        config: the stream settings the position was reached with (world size, workers, batch size...).
        consumed: a rank's data position: ``epoch * len + batch`` under ``config``'s plan.
        carry: the carry that plan was finishing when it is still in that epoch (else ignored).

    Returns:
        A :class:`Carry` (the source is ``carry``'s when there is one, else ``config``'s plan), or None at an
        epoch boundary (nothing of the epoch is left to deal).
    """
    plan = plan_epoch(config)
    epoch, position = divmod(consumed, plan.batches_per_rank)
    workers = len(plan.role_batches)
    if carry is not None and carry.epoch == epoch:
        first, dealt, left = deal_carry(carry, plan, config.batch_size, config.batch_multiple)
        pieces = []
        for reader, own in enumerate(dealt):
            role = reader % workers
            done = batches_before(position, role, workers) - batches_before(first, role, workers)
            pieces += _take(own, max(0, done) * config.batch_size)[1]
        return dataclasses.replace(carry, pieces=tuple(pieces + left))
    if position == 0:
        return None
    pieces = []
    for reader in range(len(plan.own)):
        role = reader % workers
        first, end = batches_before(position, role, workers) * config.batch_size, plan.role_batches[role] * config.batch_size
        if end > first:
            pieces.append((reader, first, end - first))
    return Carry(epoch, config.world_size, config.num_workers, config.batch_size, config.batch_multiple, tuple(pieces))


# ---------------------------------------------------------------------------------------------
# Reading one shard
# ---------------------------------------------------------------------------------------------


def _open_shard(url: str):
    if url.startswith("pipe:") or "://" in url:
        return gopen(url, "rb")  # webdataset's opener: pipe: commands, http(s), etc.
    return open(url, "rb", buffering=1 << 20)


def iter_shard(
    url: str, *, expected_hash: str | None, vocab_size: int | None, on_error: OnError, report: SkipReport
) -> Iterator[np.ndarray]:
    """Yield the documents of one shard, checking every sample and that the shard is complete.

    The tar is read with webdataset's own iteration (``tar_file_iterator`` + ``group_by_keys``, as
    ``webdataset.WebDataset`` does); each sample is checked by :func:`data_pipelines.shards.decode_sample`
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


# ---------------------------------------------------------------------------------------------
# The dataset
# ---------------------------------------------------------------------------------------------


@dataclass
class StreamConfig:
    """Everything a reader needs; picklable so DataLoader workers get a copy.

    Attributes:
        shards: the split's shards.
        seq_len: block length (incl. ``<s>``/``</s>``).
        batch_size: blocks per batch (the micro-batch).
        pack_mode: ``"full_sentences"`` (FULL-SENTENCES) or ``"doc"``.
        seed: the run's seed.
        rank: this process's data-parallel rank.
        world_size: number of data-parallel ranks.
        num_workers: DataLoader workers per rank (0 = read in the main process).
        shuffle_window: blocks shuffled together (0 or 1: no shuffle).
        shuffle_shards: visit shards in a per-epoch order (False: manifest order).
        batches_per_epoch: per rank; ``None`` derives it from the manifest counts.
        batch_multiple: a rank's batches per epoch are rounded down to a multiple of this (the gradient
            accumulation), so no optimizer step at an epoch end sums fewer micro-batches than the others.
        mask_stream: ``TRAIN_STREAM`` (masks vary with the step) or ``VALID_STREAM`` (fixed).
        expected_hash: tokenizer hash shards must carry.
        vocab_size: ids must be below it.
        bos_id, eos_id, pad_id: special ids used for framing and padding.
        on_error: ``"raise"`` or ``"skip"`` for bad shards.
        interleave_shards: shards a reader reads at once, taking a document from each in turn (consecutive
            shards of its epoch order; 1: one shard after another). A shard of a job array's task holds only
            that task's files, so this mixes several tasks' documents from the first block; it costs one open
            shard (about 1 MiB of ids) each, and a resume reads up to this many shards to its cursor.
        stacked: yield one int64 numpy array ``[3, B, T]`` instead of a dict of tensors (see
            :func:`unstack_batch`). A DataLoader worker sends tensors through a fresh
            shared-memory segment each (~10M tokens/s at best on one core) but numpy arrays by
            value through its pipe (~33M tokens/s), so the worker→main hop stops being the
            bottleneck. Use with ``collate_fn=keep_as_is`` so the worker does not convert it.
    """

    shards: ShardSet
    seq_len: int
    batch_size: int
    pack_mode: PackMode = "full_sentences"
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    num_workers: int = 0
    shuffle_window: int = 1024
    shuffle_shards: bool = True
    batches_per_epoch: int | None = None
    batch_multiple: int = 1
    mask_stream: int = TRAIN_STREAM
    stacked: bool = False
    expected_hash: str | None = None
    vocab_size: int | None = None
    bos_id: int = 0
    eos_id: int = 2
    pad_id: int = 1
    on_error: OnError = "raise"
    interleave_shards: int = 4

    @property
    def readers_per_rank(self) -> int:
        """Workers per rank, counting the main process as one reader when ``num_workers == 0``."""
        return max(1, self.num_workers)


def unstack_batch(stacked: np.ndarray, pin_memory: bool = False) -> dict[str, torch.Tensor]:
    """Turn a ``[3, B, T]`` stacked batch into the ``{"input_ids", "attention_mask", "labels"}`` dict.

    Args:
        stacked: the array a ``stacked=True`` stream yields.
        pin_memory: copy into page-locked memory for asynchronous host-to-GPU transfer.

    Returns:
        The batch dict of LongTensors ``[B, T]`` (views of one buffer).
    """
    tensor = torch.from_numpy(stacked)
    if pin_memory:
        tensor = tensor.pin_memory()
    return dict(zip(BATCH_KEYS, tensor.unbind(0)))


def keep_as_is(item):
    """A DataLoader ``collate_fn`` that leaves worker output untouched (no numpy→tensor convert)."""
    return item


class MaskedBatchStream(IterableDataset):
    """An ``IterableDataset`` of masked MLM batches for one rank (use with ``batch_size=None``).

    Each item is ``{"input_ids", "attention_mask", "labels"}``, LongTensors ``[B, T]`` (or, with
    ``config.stacked``, the same as one int64 array ``[3, B, T]``; see :func:`unstack_batch`).

    Args:
        config: the :class:`StreamConfig`.
        masker: the :class:`~data_pipelines.masking.Masker` to apply.
        log_plan: log the epoch plan at INFO (rank 0 of a derived plan).
    """

    def __init__(self, config: StreamConfig, masker: Masker, *, log_plan: bool = True) -> None:
        super().__init__()
        self.config = config
        self.masker = masker
        if config.interleave_shards < 1:
            raise DataError(f"interleave_shards must be at least 1, got {config.interleave_shards}")
        self.plan = plan_epoch(config)
        self.strided = self.plan.strided
        self.partition = [list(owned) for owned in self.plan.partition]
        if self.strided:
            readers = len(self.partition)
            log.warning("%d shards for %d readers: each reader scans all shards and keeps 1/%d of the documents",
                        len(config.shards.shards), readers, readers)
        if log_plan:
            self._log_plan()
        self.epoch = 0
        self.start_batch = 0  # batches of this epoch already consumed (resume)
        self.carry: Carry | None = None  # the rest of an epoch begun under another plan (see set_carry)
        self._carry_first = self.carry_left = 0
        self._carry_dealt: list[list[Piece]] = []
        self._carry_source: MaskedBatchStream | None = None
        self.report = SkipReport()
        # Skips counted in shared memory, so those made in DataLoader workers (which hold copies of this
        # object and of `report`) reach the training process's logs and metrics.
        self._skips = multiprocessing.Value("q", 0)

    @property
    def skipped_shards(self) -> int:
        """Bad shard reads skipped so far (``on_error="skip"``), by this process and its DataLoader workers."""
        return int(self._skips.value)

    # -- planning ------------------------------------------------------------------------------

    @property
    def batches_per_worker(self) -> int:
        """Batches per epoch of worker role 0, the most any role yields (later roles may yield one fewer)."""
        return self.plan.role_batches[0]

    def _log_plan(self) -> None:
        plan, cfg = self.plan, self.config
        if cfg.rank != 0 or cfg.batches_per_epoch is not None:
            return
        dealt = sum(count for segments in plan.borrowed for _, _, count in segments)
        tokens = f", {plan.unused_tokens:,} of {plan.total_tokens:,} tokens" if plan.unused_tokens is not None else ""
        bound = "" if plan.exact else " (at least: block counts are lower bounds or estimates here)"
        log.info(
            "%s epoch plan: %d batches of %d per rank on %d rank(s) x %d reader(s); %d blocks dealt from readers with more to "
            "readers with fewer; %d of %d blocks%s left unused per epoch%s", "train" if cfg.mask_stream == TRAIN_STREAM else "valid", len(self), cfg.batch_size, cfg.world_size,
            cfg.readers_per_rank, dealt, plan.unused_blocks, sum(plan.reader_blocks), tokens, bound,
        )

    def __len__(self) -> int:
        """Batches this rank yields per epoch (the same on every rank)."""
        return self.plan.batches_per_rank

    def set_position(self, epoch: int, start_batch: int = 0) -> None:
        """Set the epoch and the number of its batches already consumed before iterating.

        Args:
            epoch: epoch number (changes shard order, shuffle and — via the step — masks).
            start_batch: batches of this epoch to skip (exact resume).
        """
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch {start_batch} outside [0, {len(self)}]")
        if self.carry is not None and epoch == self.carry.epoch and start_batch < self._carry_first:
            raise ValueError(f"start_batch {start_batch} of epoch {epoch}: its batches before {self._carry_first} "
                             f"were trained under the plan the carried rest of the epoch comes from")
        self.epoch, self.start_batch = epoch, start_batch

    def set_carry(self, carry: Carry | None) -> int:
        """Finish ``carry.epoch`` with the carried blocks instead of this plan's own (a resume on another plan).

        The carried blocks are dealt in whole batches to this plan's readers as the epoch's last batches (see
        :func:`deal_carry`): batches ``first .. len - 1`` of the epoch read them, in the order of the pieces,
        and batches before ``first`` count as done. Later epochs follow this plan.

        Args:
            carry: from :func:`rest_of_epoch` under the old plan; None: no carry.

        Returns:
            ``first``: the epoch's first batch that reads carried blocks (``len(self)`` when they fill no batch).
        """
        self.carry, self._carry_source = carry, None
        if carry is None:
            self._carry_first, self._carry_dealt, self.carry_left = 0, [], 0
            return 0
        self._carry_first, self._carry_dealt, left = deal_carry(carry, self.plan, self.config.batch_size,
                                                                self.config.batch_multiple)
        self.carry_left = sum(count for _, _, count in left)  # carried blocks no batch reads
        return self._carry_first

    def _carried_blocks(self, reader: int, skip_blocks: int) -> Iterator[np.ndarray]:
        """The carried blocks dealt to ``reader``, from block ``skip_blocks`` of its share on."""
        carry = self.carry
        if self._carry_source is None:
            # The old readers' streams: the same shards, shard order and shuffle windows they had.
            self._carry_source = MaskedBatchStream(carry.source_config(self.config), self.masker, log_plan=False)
            self._carry_source.report, self._carry_source._skips = self.report, self._skips
        source = self._carry_source
        source.epoch = carry.epoch
        source_workers = source.config.readers_per_rank
        for src, first, count in _take(self._carry_dealt[reader], skip_blocks)[1]:
            quota = source.plan.role_batches[src % source_workers] * source.config.batch_size
            yield from itertools.islice(source._blocks(src, first, quota), count)

    # -- reading ------------------------------------------------------------------------------

    def reader_documents(self, reader: int, cycle: int = 0, skip_tokens: int = 0) -> Iterator[np.ndarray]:
        """Documents of one reader for one pass over its shards, in this epoch's order.

        The shards are read in groups of ``config.interleave_shards`` consecutive shards of the order,
        one document from each open shard of the group in turn (see :meth:`_group_documents`).

        Args:
            reader: global reader index, ``rank * workers + worker``.
            cycle: pass number within the epoch (> 0 only when data ran short).
            skip_tokens: start this many tokens into the reader's packed stream (documents plus
                one separator each); whole groups of shards are skipped using the manifest counts.

        Returns:
            An iterator of token arrays (the first one possibly a suffix of a document).
        """
        cfg = self.config
        owned = self.partition[reader]
        # Strided readers share one shard order so that "every readers-th document" is a partition.
        order_key = 0 if self.strided else reader
        order = epoch_order(owned, cfg.seed, self.epoch, order_key, cycle) if cfg.shuffle_shards else list(owned)
        size = cfg.interleave_shards
        for group in (order[g : g + size] for g in range(0, len(order), size)):
            shards = [cfg.shards.shards[i] for i in group]
            if skip_tokens and all(s.num_tokens is not None for s in shards):
                tokens = sum(s.num_tokens + s.num_docs for s in shards)  # a separator follows every document
                if skip_tokens >= tokens:
                    skip_tokens -= tokens
                    continue  # seek past the whole group without opening its shards
            for ids in self._group_documents(group, reader):
                if skip_tokens:
                    if skip_tokens > len(ids):
                        skip_tokens -= len(ids) + 1
                        continue
                    # The cursor is inside this document (or on its separator): resume from there.
                    # (An empty suffix is fine: it packs to exactly the separator that is left.)
                    ids, skip_tokens = ids[skip_tokens:], 0
                yield ids

    def _group_documents(self, group: Sequence[int], reader: int) -> Iterator[np.ndarray]:
        """The documents of a group of shards, one from each open shard in turn until all are read.

        Round-robin over the group's shards in order: the ``n``-th document taken from every shard
        comes before the ``n + 1``-th of any, and a shard that ends (or is cut short and skipped)
        drops out. Strided readers take document ``j`` of shard ``i`` only when
        ``(i + j) % readers == reader``, so they still partition every shard's documents.
        """
        cfg, report = self.config, self.report
        readers = len(self.partition)
        open_shards = []
        for i in group:
            docs = iter_shard(cfg.shards.shards[i].url, expected_hash=cfg.expected_hash, vocab_size=cfg.vocab_size,
                              on_error=cfg.on_error, report=report)
            if self.strided:
                docs = itertools.islice(docs, (reader - i) % readers, None, readers)
            open_shards.append(docs)
        counted = report.total
        turns: Iterator = iter(open_shards)
        for still_open in range(len(open_shards), 0, -1):
            # itertools' roundrobin recipe: the turns run in C, and map stops at the first shard that ends;
            # the turns then go on from the shard after it, without it.
            turns = itertools.cycle(itertools.islice(turns, still_open))
            yield from map(next, turns)
            # A shard that is cut short records its skip in the call that ends it, so counting at each
            # shard's end counts that shard's skips and no other's.
            if report.total > counted:
                with self._skips.get_lock():
                    self._skips.value += report.total - counted
                counted = report.total

    def _raw_blocks(self, reader: int, skip_blocks: int) -> Iterator[np.ndarray]:
        """Unshuffled blocks of a reader from block ``skip_blocks`` on, cycling if data runs short."""
        cfg = self.config
        seekable = cfg.pack_mode == "full_sentences" and cfg.shards.has_counts and not self.strided
        skip_tokens = skip_blocks * (cfg.seq_len - 2) if seekable else 0
        replay = 0 if seekable else skip_blocks
        cycle = 0
        while True:
            produced = 0
            blocks = pack(self.reader_documents(reader, cycle, skip_tokens), cfg.seq_len, cfg.pack_mode,
                          bos=cfg.bos_id, eos=cfg.eos_id, pad=cfg.pad_id)
            for block in blocks:
                produced += 1
                if replay:
                    replay -= 1
                    continue
                yield block
            if produced == 0 and cycle > 0:
                raise DataError(f"reader {reader} has no readable data in shards {[cfg.shards.shards[i].url for i in self.partition[reader]]}")
            cycle += 1
            skip_tokens = 0
            log.warning("reader %d ran out of data in epoch %d; starting its shards over (cycle %d)", reader, self.epoch, cycle)

    def _epoch_blocks(self, reader: int, skip_blocks: int) -> Iterator[np.ndarray]:
        """A reader's unshuffled blocks of the epoch from block ``skip_blocks`` on: its own first
        ``plan.own`` blocks, then the ranges it borrows from other readers, then (past its quota)
        the rest of its own stream."""
        own = self.plan.own[reader]
        segments = [(reader, 0, own), *self.plan.borrowed[reader], (reader, own, None)]
        for source, first, count in segments:
            if count is not None and skip_blocks >= count:
                skip_blocks -= count
                continue
            blocks = self._raw_blocks(source, first + skip_blocks)
            yield from blocks if count is None else itertools.islice(blocks, count - skip_blocks)
            skip_blocks = 0

    def _blocks(self, reader: int, skip_blocks: int, total_blocks: int) -> Iterator[np.ndarray]:
        """Blocks ``skip_blocks`` to ``total_blocks`` of a reader's epoch, shuffled in windows."""
        cfg = self.config
        window = max(1, cfg.shuffle_window)
        first_window = skip_blocks // window
        # Stop the raw stream at the epoch's quota, so the last window never reads past it.
        raw = itertools.islice(self._epoch_blocks(reader, first_window * window), total_blocks - first_window * window)
        skip_in_window = skip_blocks - first_window * window
        index = first_window
        while True:
            chunk = [block for _, block in zip(range(window), raw)]
            if not chunk:
                return
            if window > 1:
                rng = np.random.default_rng([cfg.seed, self.epoch, reader, index, 0x5B])
                chunk = [chunk[i] for i in rng.permutation(len(chunk))]
            yield from chunk[skip_in_window:]
            skip_in_window = 0
            index += 1

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        cfg = self.config
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if workers != cfg.readers_per_rank:
            raise DataError(f"the DataLoader has {workers} workers but the stream was planned for {cfg.readers_per_rank}")
        if info is not None:
            torch.set_num_threads(1)  # one core per worker; masking is vectorised, not threaded
        start = self.start_batch
        role = (worker + start) % workers  # see the module docstring: batch g comes from role g % W
        done = batches_before(start, role, workers)
        reader = cfg.rank * workers + role
        batches = self.plan.role_batches[role]
        if self.carry is not None and self.carry.epoch == self.epoch:  # finishing an epoch begun under another plan
            before = batches_before(self._carry_first, role, workers)  # this role's batches that count as done
            blocks = self._carried_blocks(reader, (done - before) * cfg.batch_size)
        else:
            blocks = self._blocks(reader, done * cfg.batch_size, batches * cfg.batch_size)
        steps_per_epoch = len(self)
        for local in range(done, batches):
            rows = [next(blocks) for _ in range(cfg.batch_size)]
            batch_index = local * workers + role  # index of this batch within the epoch
            input_ids = torch.from_numpy(np.stack(rows).astype(np.int64))
            if cfg.mask_stream == TRAIN_STREAM:
                step = self.epoch * steps_per_epoch + batch_index  # global micro-batch index
            else:
                step = batch_index  # validation masks never change
            generator = mask_generator(cfg.seed, step, cfg.rank, cfg.mask_stream)
            masked, labels = self.masker(input_ids, generator, step)  # step: a mask-rate schedule's clock
            attention_mask = (input_ids != cfg.pad_id).long()
            if cfg.stacked:
                yield torch.stack((masked, attention_mask, labels)).numpy()
            else:
                yield {"input_ids": masked, "attention_mask": attention_mask, "labels": labels}
