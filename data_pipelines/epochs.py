"""Epoch planning: which reader reads which shards, how many batches each worker role yields, and how the blocks
of an epoch are dealt, so that every rank takes the same batches and (almost) every block is used; and, after a
resume on another plan, the rest of the interrupted epoch. Pure functions of the shard counts, the settings and the
seed: every rank and every DataLoader worker computes the same plan. :mod:`data_pipelines.stream` reads by it.

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

Resume on another plan (world size, workers, micro-batch size). :func:`rest_of_epoch` lists, from the old plan
and the saved position, the blocks the old readers had not consumed (a :class:`Carry`: ranges of their shuffled
epoch streams); :meth:`~data_pipelines.stream.MaskedBatchStream.set_carry` deals them to the new readers in whole batches as the epoch's
last batches (:func:`deal_carry`), read from the old readers' streams. No block of the epoch is used twice or
lost, but for less than one global batch of the new plan; later epochs follow the new plan.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from data_pipelines.errors import DataError
from data_pipelines.manifest import ShardInfo
from data_pipelines.packing import (
    STREAM_MODES,
    block_count_lower_bound,
    block_width,
    stream_tokens,
)

if TYPE_CHECKING:
    from data_pipelines.stream import StreamConfig


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
    body = block_width(cfg.seq_len, cfg.pack_mode)  # stream tokens per block (a stream mode's)
    total_tokens = sum(stream_tokens(s.num_docs, s.num_tokens, cfg.pack_mode) for s in shards) if cfg.shards.has_counts else None
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
    elif cfg.pack_mode in STREAM_MODES:
        # Exact: a reader's shards form one contiguous packed stream.
        blocks = [block_count_lower_bound(sum(shards[i].num_docs for i in o), sum(shards[i].num_tokens for i in o), cfg.seq_len, cfg.pack_mode)
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
    unused_tokens = total_tokens - used * body if (cfg.pack_mode in STREAM_MODES and not strided) else None
    return EpochPlan(tuple(map(tuple, partition)), strided, role_batches, tuple(blocks), tuple(own),
                     tuple(map(tuple, borrowed)), sum(blocks) - used, total_tokens, unused_tokens)


# ---------------------------------------------------------------------------------------------
# The rest of an epoch, after a resume on another world size or worker count
# ---------------------------------------------------------------------------------------------


def batches_before(position: int, role: int, workers: int) -> int:
    """Batches worker role ``role`` yields before batch ``position`` of an epoch (batch ``g`` is role ``g % workers``'s)."""
    return max(0, -(-(position - role) // workers))


Piece = tuple[int, int, int]  # (reader of the source plan, first block of its epoch stream, count)


def take_pieces(pieces: Sequence[Piece], n: int) -> tuple[list[Piece], list[Piece]]:
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
    functions of the seed and the epoch), in whole batches of the new plan; see :meth:`~data_pipelines.stream.MaskedBatchStream.set_carry`.

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
        taken, rest = take_pieces(rest, quota)
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
            pieces += take_pieces(own, max(0, done) * config.batch_size)[1]
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
