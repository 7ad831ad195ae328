"""Streaming: shard specs, node/worker splitting, equal batches, seeking, bad shards mid-stream."""

from __future__ import annotations

import itertools
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from data_fixtures import (  # noqa: F401
    corpus_docs,
    corpus_file,
    one_thread,
    shard_dir,
    tok,
    tokenizer_dir,
)
from torch.utils.data import DataLoader

from data_pipelines.contract import IGNORE_INDEX
from data_pipelines.epochs import epoch_order, partition_shards
from data_pipelines.errors import DataError, SkipReport
from data_pipelines.manifest import ShardInfo, ShardSet, resolve_shards
from data_pipelines.masking import Masker
from data_pipelines.packing import block_width, stream_tokens
from data_pipelines.shard_format import iter_shard
from data_pipelines.stream import MaskedBatchStream, StreamConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _stream(tok, shards: ShardSet, **kw) -> MaskedBatchStream:
    cfg = dict(seq_len=64, batch_size=4, expected_hash=tok.hash, vocab_size=tok.vocab_size)
    cfg.update(kw)
    return MaskedBatchStream(StreamConfig(shards=shards, **cfg), Masker(tok.vocab_size, tok.special_ids, tok.mask_id))


def _original(batch: dict) -> torch.Tensor:
    """Undo the masking: labels hold the original id wherever the input was changed."""
    return torch.where(batch["labels"] != IGNORE_INDEX, batch["labels"], batch["input_ids"])


def test_resolve_directory_pattern_and_pipe(shard_dir, tok):
    from_dir = resolve_shards(shard_dir)
    n = len(from_dir.shards)
    assert n >= 8 and from_dir.has_counts and from_dir.tokenizer_hash == tok.hash
    pattern = resolve_shards(str(shard_dir / f"train-{{000000..{n - 1:06d}}}.tar"), manifest=shard_dir)
    assert [s.url for s in pattern.shards] == [s.url for s in from_dir.shards]
    assert pattern.shards == from_dir.shards  # counts found by file name
    piped = resolve_shards(f"pipe:cat {shard_dir}/train-{{000000..000001}}.tar", manifest=shard_dir / "manifest.json")
    assert piped.has_counts
    docs = list(iter_shard(piped.shards[1].url, expected_hash=tok.hash, vocab_size=tok.vocab_size, on_error="raise", report=SkipReport()))
    direct = list(iter_shard(from_dir.shards[1].url, expected_hash=tok.hash, vocab_size=tok.vocab_size, on_error="raise", report=SkipReport()))
    assert len(docs) == len(direct) > 0 and all(np.array_equal(a, b) for a, b in zip(docs, direct))
    assert len(resolve_shards(shard_dir, split="valid").shards) >= 1
    with pytest.raises(DataError, match="no 'test' split"):
        resolve_shards(shard_dir, split="test")


def test_partition_is_exact_balanced_and_seeded():
    shards = [ShardInfo(f"s{i}", 10, t) for i, t in enumerate([900, 100, 500, 500, 300, 700, 200, 800, 400, 600])]
    parts = partition_shards(shards, 4, seed=0)
    assert sorted(i for p in parts for i in p) == list(range(10))
    loads = [sum(shards[i].num_tokens + 10 for i in p) for p in parts]
    assert max(loads) - min(loads) <= 400
    assert partition_shards(shards, 4, seed=0) == parts
    with pytest.raises(DataError, match="3 shards cannot feed 4 readers"):
        partition_shards(shards[:3], 4, seed=0)


def test_shard_order_is_a_function_of_seed_and_epoch():
    owned = list(range(20))
    assert epoch_order(owned, 1, 0, 3) == epoch_order(owned, 1, 0, 3)
    assert epoch_order(owned, 1, 0, 3) != epoch_order(owned, 1, 1, 3)
    assert epoch_order(owned, 1, 0, 3) != epoch_order(owned, 2, 0, 3)
    assert sorted(epoch_order(owned, 1, 5, 3)) == owned


def test_every_document_once_across_ranks_and_workers(shard_dir, tok, corpus_docs):
    shards = resolve_shards(shard_dir)
    world, workers = 2, 3
    seen = []
    for rank in range(world):
        stream = _stream(tok, shards, rank=rank, world_size=world, num_workers=workers)
        stream.set_position(epoch=4)
        for worker in range(workers):
            seen.extend(tuple(d.tolist()) for d in stream.reader_documents(rank * workers + worker))
    train = resolve_shards(shard_dir)
    expected = Counter()
    for s in train.shards:
        expected.update(tuple(d.tolist()) for d in iter_shard(s.url, expected_hash=None, vocab_size=None, on_error="raise", report=SkipReport()))
    assert Counter(seen) == expected
    assert sum(expected.values()) == sum(s.num_docs for s in train.shards)


def _reader_tokens(stream: MaskedBatchStream, reader: int, tok) -> np.ndarray:
    """A reader's packed stream of the current epoch: its documents, each followed by </s>."""
    return np.concatenate([np.append(d, tok.eos_id) for d in stream.reader_documents(reader)])


def test_ranks_get_equal_batches_and_blocks_follow_the_reader_streams(shard_dir, tok):
    shards = resolve_shards(shard_dir)
    world, workers, seq_len = 3, 2, 32
    counts = []
    for rank in range(world):
        stream = _stream(tok, shards, rank=rank, world_size=world, num_workers=workers, seq_len=seq_len, shuffle_window=1)
        batches = list(DataLoader(stream, batch_size=None, num_workers=workers))
        counts.append(len(batches))
        assert len(batches) == len(stream)
        for role in range(workers):
            # Batch g came from reader r = rank*W + g % W: its blocks are r's packed stream (its first
            # plan.own blocks), then the block ranges of other readers' streams the plan deals to r.
            reader = rank * workers + role
            blocks = torch.cat([_original(b) for b in batches[role::workers]])
            assert (blocks[:, 0] == tok.bos_id).all() and (blocks[:, -1] == tok.eos_id).all()
            body = blocks[:, 1:-1].reshape(-1).numpy()
            size = seq_len - 2
            own = _reader_tokens(stream, reader, tok)
            expected = [own[: stream.plan.own[reader] * size]]
            expected += [_reader_tokens(stream, source, tok)[first * size : (first + count) * size]
                         for source, first, count in stream.plan.borrowed[reader]]
            np.testing.assert_array_equal(body, np.concatenate(expected))
            if not stream.plan.borrowed[reader]:
                np.testing.assert_array_equal(body, own[: len(body)])
    assert len(set(counts)) == 1 and counts[0] > 0
    # The equal count is the smallest reader's, so little is left unused.
    total_blocks = (sum(s.num_tokens + s.num_docs for s in shards.shards)) // (seq_len - 2)
    assert counts[0] * world * 4 > 0.8 * total_blocks


@pytest.mark.parametrize("pack_mode", ["full_sentences", "packed_docs"])
def test_seeking_by_counts_matches_replaying(shard_dir, tok, pack_mode):
    shards = resolve_shards(shard_dir)
    no_counts = ShardSet(tuple(ShardInfo(s.url) for s in shards.shards), shards.tokenizer_hash)
    seq_len = 7
    body = block_width(seq_len, pack_mode)
    # Reader 1 owns 4 shards: read 2 at a time, they form 2 groups, so one group is skipped whole by counts.
    seek = _stream(tok, shards, seq_len=seq_len, num_workers=2, shuffle_window=1, interleave_shards=2, pack_mode=pack_mode)
    replay = _stream(tok, no_counts, seq_len=seq_len, num_workers=2, shuffle_window=1, batches_per_epoch=2,
                     interleave_shards=2, pack_mode=pack_mode)
    replay.partition = seek.partition  # same reader → shards assignment for the comparison
    for epoch in (0, 3):
        seek.set_position(epoch)
        replay.set_position(epoch)
        docs = list(seek.reader_documents(1))
        if pack_mode == "packed_docs":  # framed: <s> ... </s> each
            assert all(d[0] == tok.bos_id and d[-1] == tok.eos_id for d in docs)
            stream = np.concatenate(docs)
        else:
            stream = np.concatenate([np.append(d, tok.eos_id) for d in docs])
        full = list(itertools.islice(seek._raw_blocks(1, 0), len(stream) // body))
        # The tricky cursors: on a separator, right after one (a document start), and the blocks
        # around each group's start (whole groups of shards skipped by counts).
        on_sep = [m for m in range(1, len(full)) if stream[m * body] == tok.eos_id][:6]
        after_sep = [m for m in range(1, len(full)) if stream[m * body - 1] == tok.eos_id][:6]
        order = epoch_order(seek.partition[1], seek.config.seed, epoch, 1)
        assert len(order) == 4
        edges = np.cumsum([sum(stream_tokens(shards.shards[i].num_docs, shards.shards[i].num_tokens, pack_mode)
                               for i in order[g : g + 2]) for g in (0, 2)])[:-1]
        group_starts = [int(e) // body + d for e in edges for d in (0, 1)]
        assert on_sep and after_sep and group_starts
        for skip in [0, 1, 2, len(full) - 1] + on_sep + after_sep + group_starts:
            got = next(seek._raw_blocks(1, skip))
            np.testing.assert_array_equal(got, full[skip], err_msg=f"skip={skip}")
            np.testing.assert_array_equal(next(replay._raw_blocks(1, skip)), got, err_msg=f"skip={skip}")
        if pack_mode == "packed_docs":  # the blocks are the framed documents cut every seq_len tokens
            np.testing.assert_array_equal(np.concatenate(full), stream[: len(full) * seq_len])


def test_a_reader_interleaves_its_shards_four_at_a_time_from_its_first_batch(shard_dir, tok):
    # Issue 15: a job array task's shards hold only that task's files, so a reader that read one shard after
    # another trained on one task's files a whole shard at a time. It now reads 4 shards of its order at once.
    shards = resolve_shards(shard_dir)
    stream = _stream(tok, shards, shuffle_window=1)  # one reader owning all 9 shards: groups of 4, 4 and 1
    stream.set_position(epoch=2)
    read = [list(iter_shard(s.url, expected_hash=None, vocab_size=None, on_error="raise", report=SkipReport()))
            for s in shards.shards]
    order = epoch_order(stream.partition[0], stream.config.seed, 2, 0)
    expected = []  # (shard, document): round-robin over each group of 4 consecutive shards of the order
    for group in (order[:4], order[4:8], order[8:]):
        expected += [(i, j) for j in range(max(len(read[i]) for i in group)) for i in group if j < len(read[i])]
    docs = list(stream.reader_documents(0))
    assert len(docs) == len(expected) == sum(s.num_docs for s in shards.shards)
    assert all(np.array_equal(doc, read[i][j]) for doc, (i, j) in zip(docs, expected))
    # The first batch (4 blocks, unshuffled) holds the start of that stream: documents of several shards.
    first = _original(next(iter(stream)))[:, 1:-1].reshape(-1).numpy()
    np.testing.assert_array_equal(first, np.concatenate([np.append(d, tok.eos_id) for d in docs])[: len(first)])
    starts = np.cumsum([0] + [len(d) + 1 for d in docs])
    assert len({expected[k][0] for k in range(len(docs)) if starts[k] < len(first)}) >= 2
    with pytest.raises(DataError, match="interleave_shards must be at least 1, got 0"):
        _stream(tok, shards, interleave_shards=0)


def test_shuffle_window_permutes_within_windows(shard_dir, tok):
    shards = resolve_shards(shard_dir)
    plain = _stream(tok, shards, shuffle_window=1)
    shuffled = _stream(tok, shards, shuffle_window=16)
    total = plain.batches_per_worker * 4
    a = [tuple(b) for b in plain._blocks(0, 0, total)]
    b = [tuple(x) for x in shuffled._blocks(0, 0, total)]
    assert a != b and len(a) == len(b)
    for start in range(0, total - total % 16, 16):
        assert sorted(a[start : start + 16]) == sorted(b[start : start + 16])
    # Resuming in the middle of a window gives the same tail.
    assert [tuple(x) for x in shuffled._blocks(0, 37, total)] == b[37:]


def test_fewer_shards_than_readers_deals_documents(shard_dir, tok):
    shards = resolve_shards(shard_dir)
    few = ShardSet(shards.shards[:2], shards.tokenizer_hash)
    world, workers = 3, 2  # 6 readers, 2 shards
    seen, lengths = Counter(), set()
    for rank in range(world):
        stream = _stream(tok, few, rank=rank, world_size=world, num_workers=workers)
        assert stream.strided
        lengths.add(len(stream))
        for worker in range(workers):
            seen.update(tuple(d.tolist()) for d in stream.reader_documents(rank * workers + worker))
        assert len(list(DataLoader(stream, batch_size=None, num_workers=workers))) == len(stream)
    expected = Counter()
    for s in few.shards:
        expected.update(tuple(d.tolist()) for d in iter_shard(s.url, expected_hash=None, vocab_size=None, on_error="raise", report=SkipReport()))
    assert seen == expected and len(lengths) == 1


def test_too_little_data_is_a_clear_error(shard_dir, tok):
    shards = resolve_shards(shard_dir)
    with pytest.raises(DataError, match="too little data"):
        _stream(tok, shards, seq_len=512, batch_size=10_000)


def test_corrupt_shard_mid_stream_is_skipped_and_counted_but_batches_stay_equal(shard_dir, tok, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(shard_dir, copy)
    victim = sorted(copy.glob("train-*.tar"))[3]
    data = victim.read_bytes()
    victim.write_bytes(data[: len(data) // 3])
    shards = resolve_shards(copy)
    strict = _stream(tok, shards)
    with pytest.raises(DataError, match=victim.name):
        list(strict)
    lenient = _stream(tok, shards, on_error="skip")
    batches = list(lenient)
    assert len(batches) == len(lenient)  # the reader refilled from its other shards
    # Counted once per read of the bad shard: the first pass, and here the refilling second pass that opens it
    # again in its first group of interleaved shards.
    assert lenient.report.counts == {"bad_shard": 2} and lenient.skipped_shards == 2


@pytest.mark.filterwarnings(r"ignore:This DataLoader will create 3 worker processes:UserWarning:torch\.utils\.data")  # on purpose
@pytest.mark.parametrize("world, workers, batch_multiple", [(2, 2, 1), (1, 3, 2), (3, 2, 4)])
def test_at_most_one_global_batch_is_left_unused_and_no_block_is_used_twice(shard_dir, tok, world, workers, batch_multiple):
    # Issue 13, finding 6: equal batches per *reader* left up to 13% of the blocks unused every epoch.
    # Now ranks still take equal steps in whole optimizer steps, but readers with more blocks than
    # their quota deal the rest to readers with fewer: less than one global batch stays unused.
    shards = resolve_shards(shard_dir)
    seq_len, batch = 32, 4
    used, available, lengths = Counter(), Counter(), set()
    for rank in range(world):
        stream = _stream(tok, shards, rank=rank, world_size=world, num_workers=workers, seq_len=seq_len,
                         batch_size=batch, batch_multiple=batch_multiple, shuffle_window=8)
        stream.set_position(epoch=1)
        batches = list(DataLoader(stream, batch_size=None, num_workers=workers))
        assert len(batches) == len(stream) and len(stream) % batch_multiple == 0
        lengths.add(len(stream))
        used.update(tuple(row) for b in batches for row in _original(b)[:, 1:-1].tolist())
        for role in range(workers):
            tokens = _reader_tokens(stream, rank * workers + role, tok)
            n = len(tokens) // (seq_len - 2)
            available.update(tuple(row) for row in tokens[: n * (seq_len - 2)].reshape(n, -1).tolist())
        if rank == 0 and world == 2:
            # Exact resume still holds, also inside borrowed ranges near the end of the epoch.
            for start in (1, len(stream) // 2, len(stream) - 3):
                stream.set_position(epoch=1, start_batch=start)
                tail = list(DataLoader(stream, batch_size=None, num_workers=workers))
                assert len(tail) == len(batches) - start
                assert all(torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["labels"], b["labels"])
                           for a, b in zip(tail, batches[start:]))
    assert len(lengths) == 1  # equal batches on every rank
    assert not used - available  # every block used is one of the epoch's blocks, and no more often than it occurs
    unused = sum(available.values()) - sum(used.values())
    assert 0 <= unused < world * batch * batch_multiple, (unused, sum(available.values()))
    assert stream.plan.unused_blocks == unused
    assert stream.plan.unused_tokens == sum(s.num_tokens + s.num_docs for s in shards.shards) - sum(used.values()) * (seq_len - 2)


SEQ, BATCH = 64, 8  # the world-size test: 8 x 62 tokens a batch


def _epoch_rows(tok, shards, world, workers, multiple, epoch, start=0, carry=None,
                pack_mode="full_sentences") -> tuple[list[tuple], int, int]:
    """The unmasked token rows every rank of a ``world x workers`` plan trains on in ``epoch`` from batch ``start``
    on (all ranks at the same position), with the plan's batches per rank and, under ``carry``, its first batch."""
    rows, first, length = [], 0, 0
    for rank in range(world):
        stream = _stream(tok, shards, rank=rank, world_size=world, num_workers=workers, seq_len=SEQ, batch_size=BATCH,
                         batch_multiple=multiple, shuffle_window=8, pack_mode=pack_mode)
        first = stream.set_carry(carry)
        stream.set_position(epoch, max(start, first))
        batches = list(DataLoader(stream, batch_size=None, num_workers=workers))
        assert len(batches) == len(stream) - max(start, first)
        rows += [tuple(r) for b in batches for r in _original(b)[:, 1:-1].tolist()]
        length = len(stream)
    return rows, first, length


@pytest.mark.filterwarnings(r"ignore:This DataLoader will create 3 worker processes:UserWarning:torch\.utils\.data")  # on purpose
@pytest.mark.parametrize("plans, pack_mode", [([(2, 1, 1), (1, 1, 2)], "full_sentences"),
                                              ([(1, 1, 2), (2, 1, 1)], "full_sentences"),
                                              ([(2, 2, 1), (1, 3, 2), (2, 2, 1)], "full_sentences"),
                                              ([(2, 1, 1), (1, 1, 2)], "packed_docs"),
                                              ([(2, 2, 1), (1, 3, 2), (2, 2, 1)], "packed_docs")],
                         ids=["2to1", "1to2", "2x2workers-to-1x3-to-2x2", "2to1-packed_docs",
                              "2x2workers-to-1x3-to-2x2-packed_docs"])
def test_a_new_world_size_finishes_the_epoch_with_exactly_the_blocks_not_yet_trained_on(shard_dir, tok, plans, pack_mode):
    """Resume mid-epoch under another (world_size, num_workers, batch_multiple): the blocks trained on before and
    after each change, within the epoch, are the epoch's blocks under the first plan, each once, but for less than
    one global batch of the new plan left over (the first plan's own per-epoch leftover is not of the epoch)."""
    from data_pipelines.epochs import rest_of_epoch

    shards, epoch = resolve_shards(shard_dir), 1
    world, workers, multiple = plans[0]
    epoch_blocks, _, length = _epoch_rows(tok, shards, world, workers, multiple, epoch, pack_mode=pack_mode)
    trained: Counter = Counter()
    carry = None
    for (world, workers, multiple), (new_world, new_workers, new_multiple) in zip(plans, plans[1:]):
        # Train the old plan to a step boundary about a third of the way into what is left of the epoch.
        rows, first, length = _epoch_rows(tok, shards, world, workers, multiple, epoch, carry=carry, pack_mode=pack_mode)
        start = first + (length - first) // 3 // multiple * multiple
        done = Counter(r for rank in range(world) for r in rows[rank * len(rows) // world:][:(start - first) * BATCH])
        trained += done
        config = _stream(tok, shards, world_size=world, num_workers=workers, seq_len=SEQ, batch_size=BATCH,
                         batch_multiple=multiple, shuffle_window=8, pack_mode=pack_mode).config
        carry = rest_of_epoch(config, epoch * length + start, carry)
        assert carry.epoch == epoch and carry.blocks + sum(trained.values()) <= len(epoch_blocks)
    rows, first, length = _epoch_rows(tok, shards, new_world, new_workers, new_multiple, epoch, carry=carry,
                                     pack_mode=pack_mode)
    trained += Counter(rows)
    assert not trained - Counter(epoch_blocks), "a block trained on twice, or one not of the epoch"
    left = len(epoch_blocks) - sum(trained.values())
    assert 0 <= left < new_world * BATCH * new_multiple, (left, len(epoch_blocks))
    assert first > 0 and (length - first) % new_multiple == 0 and first % new_multiple == 0
    # Exact resume inside the carried part under the same plan: the same batches as without the interruption.
    tail, _, _ = _epoch_rows(tok, shards, new_world, new_workers, new_multiple, epoch, start=first + new_multiple,
                             carry=carry, pack_mode=pack_mode)
    per_rank = (length - first) * BATCH
    assert tail == [r for rank in range(new_world) for r in rows[rank * per_rank:][new_multiple * BATCH:per_rank]]


def test_a_corpus_sorted_by_source_gives_batches_mixing_both_from_the_first_step(tmp_path, tok, corpus_docs):
    # Issue 15: shards used to be written in corpus order, so a reader trained on one source at a time. Now
    # documents are dealt to shards at random and shuffled within each shard when written.
    from data_pipelines.shards import write_shards

    half = len(corpus_docs) // 2
    docs = [d.lower() for d in corpus_docs[:half]] + [d.upper() for d in corpus_docs[half:]]  # source A, then B
    write_shards(None, tok.path, tmp_path / "s", documents=docs, num_shards=8, num_workers=0, progress=False)
    for world, workers in ((1, 0), (2, 2)):
        texts = []  # the first optimizer step: the first batch of every rank
        for rank in range(world):
            # No block shuffle in the stream: whatever mixing there is comes from the shards themselves.
            stream = _stream(tok, resolve_shards(tmp_path / "s"), rank=rank, world_size=world, num_workers=workers,
                             seq_len=64, batch_size=32, shuffle_window=1)
            first = next(iter(DataLoader(stream, batch_size=None, num_workers=workers)))
            texts += [tok.decode(row.tolist()) for row in _original(first)]
        upper_rows = sum(sum(c.isupper() for c in t) > sum(c.islower() for c in t) for t in texts)
        assert 2 <= upper_rows <= len(texts) - 2, (world, upper_rows, len(texts))  # rows of both sources


def test_default_num_workers_fit_the_cpus_and_the_shards():
    from data_pipelines.epochs import default_num_workers

    assert default_num_workers(num_shards=9, world_size=1, cpus_per_rank=2) == 1  # the 2-core box: one core trains
    assert default_num_workers(num_shards=9, world_size=1, cpus_per_rank=1) == 0
    assert default_num_workers(num_shards=64, world_size=8, cpus_per_rank=16) == 4  # at most 4
    assert default_num_workers(num_shards=9, world_size=4, cpus_per_rank=16) == 2  # readers own whole shards
    assert default_num_workers(num_shards=3, world_size=4, cpus_per_rank=16) == 0
