"""Stream shards → documents → packed blocks → masked batches, split over ranks and workers, by the epoch plan
(:mod:`data_pipelines.epochs`: who reads which shards, batches per worker role, blocks dealt between readers).

Exact resume. Batch ``g`` of an epoch is produced by the reader with role ``g % num_workers`` (the
DataLoader round-robins over workers). To restart at batch ``k``, worker ``w`` takes role
``(w + k) % num_workers`` and skips the blocks its role already produced: with counts, ``full_sentences``
and ``packed_docs`` modes seek by token arithmetic to the right group of shards and only reads that group's documents
up to the cursor (O(``interleave_shards`` shards)), in its own stream or in the one it borrows from;
``doc`` mode, or shards without counts, replay the reader's blocks without masking them (O(blocks
skipped)).
"""

from __future__ import annotations

import itertools
import logging
import multiprocessing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from data_pipelines.contract import BATCH_KEYS, DOCUMENT_IDS
from data_pipelines.epochs import (
    Carry,
    Piece,
    batches_before,
    deal_carry,
    epoch_order,
    plan_epoch,
    take_pieces,
)
from data_pipelines.errors import DataError, OnError, SkipReport
from data_pipelines.manifest import ShardSet
from data_pipelines.masking import Masker, mask_generator
from data_pipelines.packing import (
    STREAM_MODES,
    PackMode,
    block_width,
    document_ids,
    frame_documents,
    pack,
    pack_framed,
    stream_tokens,
)
from data_pipelines.shard_format import iter_shard

log = logging.getLogger("data_pipelines")

TRAIN_STREAM, VALID_STREAM = 0, 1


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
        pack_mode: ``"full_sentences"`` (FULL-SENTENCES), ``"doc"`` or ``"packed_docs"`` (documents packed with
            their boundaries: batches carry ``document_ids``).
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
        stacked: yield one int64 numpy array ``[3, B, T]`` (``[4, B, T]`` with ``document_ids``) instead of a dict of tensors (see
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
    """Turn a ``[3, B, T]`` stacked batch into the ``{"input_ids", "attention_mask", "labels"}`` dict (a
    ``[4, B, T]`` one, of ``packed_docs``, adds ``"document_ids"``).

    Args:
        stacked: the array a ``stacked=True`` stream yields.
        pin_memory: copy into page-locked memory for asynchronous host-to-GPU transfer.

    Returns:
        The batch dict of LongTensors ``[B, T]`` (views of one buffer).
    """
    tensor = torch.from_numpy(stacked)
    if pin_memory:
        tensor = tensor.pin_memory()
    return dict(zip((*BATCH_KEYS, DOCUMENT_IDS), tensor.unbind(0)))


def keep_as_is(item):
    """A DataLoader ``collate_fn`` that leaves worker output untouched (no numpy→tensor convert)."""
    return item


class MaskedBatchStream(IterableDataset):
    """An ``IterableDataset`` of masked MLM batches for one rank (use with ``batch_size=None``).

    Each item is ``{"input_ids", "attention_mask", "labels"}``, LongTensors ``[B, T]``, with ``"document_ids"`` in
    ``packed_docs`` mode (or, with ``config.stacked``, the same as one int64 array ``[3 or 4, B, T]``; see
    :func:`unstack_batch`).

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
        :func:`~data_pipelines.epochs.deal_carry`): batches ``first .. len - 1`` of the epoch read them, in the order of the pieces,
        and batches before ``first`` count as done. Later epochs follow this plan.

        Args:
            carry: from :func:`~data_pipelines.epochs.rest_of_epoch` under the old plan; None: no carry.

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
        for src, first, count in take_pieces(self._carry_dealt[reader], skip_blocks)[1]:
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
                one separator each; in ``packed_docs``, plus their ``<s>`` and ``</s>``); whole groups of shards
                are skipped using the manifest counts.

        Returns:
            An iterator of token arrays (the first one possibly a suffix of a document); in ``packed_docs`` mode
            each framed as ``<s> … </s>`` (:func:`~data_pipelines.packing.frame_documents`), the suffix too.
        """
        cfg = self.config
        owned = self.partition[reader]
        # Strided readers share one shard order so that "every readers-th document" is a partition.
        order_key = 0 if self.strided else reader
        order = epoch_order(owned, cfg.seed, self.epoch, order_key, cycle) if cfg.shuffle_shards else list(owned)
        size = cfg.interleave_shards
        framed = cfg.pack_mode == "packed_docs"
        sep = 0 if framed else 1  # the separator full_sentences adds after each document (framed: in the document)
        for group in (order[g : g + size] for g in range(0, len(order), size)):
            shards = [cfg.shards.shards[i] for i in group]
            if skip_tokens and all(s.num_tokens is not None for s in shards):
                tokens = sum(stream_tokens(s.num_docs, s.num_tokens, cfg.pack_mode) for s in shards)
                if skip_tokens >= tokens:
                    skip_tokens -= tokens
                    continue  # seek past the whole group without opening its shards
            docs = self._group_documents(group, reader)
            if framed:
                docs = frame_documents(docs, bos=cfg.bos_id, eos=cfg.eos_id)
            for ids in docs:
                if skip_tokens:
                    if skip_tokens >= len(ids) + sep:
                        skip_tokens -= len(ids) + sep
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
        seekable = cfg.pack_mode in STREAM_MODES and cfg.shards.has_counts and not self.strided
        skip_tokens = skip_blocks * block_width(cfg.seq_len, cfg.pack_mode) if seekable else 0
        replay = 0 if seekable else skip_blocks
        cycle = 0
        while True:
            produced = 0
            docs = self.reader_documents(reader, cycle, skip_tokens)
            if cfg.pack_mode == "packed_docs":
                blocks = pack_framed(docs, cfg.seq_len)  # reader_documents framed them
            else:
                blocks = pack(docs, cfg.seq_len, cfg.pack_mode, bos=cfg.bos_id, eos=cfg.eos_id, pad=cfg.pad_id)
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
            rows = np.stack([next(blocks) for _ in range(cfg.batch_size)])
            batch_index = local * workers + role  # index of this batch within the epoch
            input_ids = torch.from_numpy(rows.astype(np.int64))
            if cfg.mask_stream == TRAIN_STREAM:
                step = self.epoch * steps_per_epoch + batch_index  # global micro-batch index
            else:
                step = batch_index  # validation masks never change
            generator = mask_generator(cfg.seed, step, cfg.rank, cfg.mask_stream)
            masked, labels = self.masker(input_ids, generator, step)  # step: a mask-rate schedule's clock
            attention_mask = (input_ids != cfg.pad_id).long()
            fields = [masked, attention_mask, labels]
            if cfg.pack_mode == "packed_docs":  # from the unmasked rows: <s> marks each document's start
                fields.append(torch.from_numpy(document_ids(rows, cfg.bos_id)))
            if cfg.stacked:
                yield torch.stack(fields).numpy()
            else:
                yield dict(zip((*BATCH_KEYS, DOCUMENT_IDS), fields))
