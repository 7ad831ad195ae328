"""``MLMDataModule``: masked MLM batches for Lightning, with equal batches per rank and exact resume.

Usage::

    dm = MLMDataModule("data/shards", "data/tokenizer", valid_shards="data/shards",
                       masking=MaskingConfig(whole_word=True), settings=DataSettings(num_workers=4))
    dm.connect(seq_len=512, micro_batch_size=16, accumulation=4)  # the trainer's batch plan, given once
    trainer.fit(module, datamodule=dm)

What is read and how it is masked come as objects (:class:`DataSettings`, :class:`~data_pipelines.masking.MaskingConfig`,
built once from a run's config); the batch shape and the trainer's accumulation come once, through :meth:`MLMDataModule.connect`
(litgpt's ``data.connect(tokenizer, batch_size, max_seq_length)``), and everything the data side derives from them
(the epoch rounded to whole optimizer steps, the step windows) follows from that one call.

Batches are ``{"input_ids", "attention_mask", "labels"}`` LongTensors ``[B, T]`` (see
:mod:`data_pipelines.stream`).

Resume. The whole data position is one number: ``consumed``, the micro-batches this rank has
trained on since the start of training. ``state_dict()`` saves it and Lightning stores it in the
checkpoint; ``load_state_dict()`` restores it, and the next train loader iteration starts at
epoch ``consumed // len(loader)``, batch ``consumed % len(loader)`` — the same token blocks and
the same masks (masks are seeded by (seed, step=global micro-batch index, rank)). A checkpoint written
under another plan (world size, workers, micro-batch, accumulation) is re-planned (:meth:`MLMDataModule.replan`):
the rest of its epoch is dealt to this run's readers as the epoch's last batches, and ``consumed`` becomes
this plan's position (``epoch * len + first carried batch``), no longer a count of batches trained.

Counting is automatic inside a Lightning ``fit``: the train loader records each batch it hands
out, and this DataModule's ``on_before_batch_transfer`` hook — which Lightning calls for the batch
about to be trained on, after its one-batch prefetch — advances ``consumed`` when that batch is
really used. Outside Lightning (a plain loop), every batch taken from the iterator counts.
A training module that consumes batches some other way can call :meth:`MLMDataModule.set_consumed`.
"""

from __future__ import annotations

import collections
import ctypes
import dataclasses
import functools
import itertools
import logging
import math
import os
import signal
import sys
import threading
import time
import typing
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import lightning as L
import torch
from torch.utils.data import DataLoader

from data_pipelines.contract import IGNORE_INDEX, STEP_WINDOW
from data_pipelines.errors import DataError, OnError, check_on_error
from data_pipelines.masking import Masker, MaskingConfig, MaskSchedule
from data_pipelines.packing import PackMode
from data_pipelines.stream import (
    TRAIN_STREAM,
    VALID_STREAM,
    Carry,
    MaskedBatchStream,
    StreamConfig,
    keep_as_is,
    plan_epoch,
    resolve_shards,
    rest_of_epoch,
    unstack_batch,
)
from data_pipelines.tokenizer import load_tokenizer

log = logging.getLogger("data_pipelines")


def ignore_requeue_signals(parent_pid: int | None, worker_id: int) -> None:
    """DataLoader ``worker_init_fn`` (bound to the training process's pid): workers ignore SIGUSR1, SIGTERM and
    SIGINT, the training process acts; and a worker dies with the training process (:func:`exit_with_parent`).

    Slurm's ``--signal=SIGUSR1@90`` goes to every process of the job step, DataLoader workers included, and
    a forked worker inherits the trainer's handler: it would act on its stale copy of the run. A requeue or
    ``scancel`` (SIGTERM) and Ctrl-C (SIGINT) also reach every process: a worker that died of them first made
    the training process fail with a traceback per worker. The training process stops the run and shuts its
    workers down. If it is killed outright (SIGKILL, the OOM killer) it cannot: torch's own check of the parent
    runs only while a worker waits for work, and a worker blocked writing batches into the full pipe to its dead
    parent would wait forever, ignoring SIGTERM, holding its memory.
    """
    for signum in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)
    exit_with_parent(parent_pid)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def exit_with_parent(parent_pid: int | None = None, poll_s: float = 1.0) -> str:
    """Make this process die (SIGKILL) within seconds of its parent's death, however the parent died.

    On Linux the kernel does it: ``prctl(PR_SET_PDEATHSIG, SIGKILL)``. It fires when the parent *thread* that
    forked this process exits; DataLoader workers are forked (the default start method on Linux) by the thread
    iterating the loader, Lightning's fit loop in the main thread, so that is the training process's end. A
    parent that died before the call is caught by comparing ``getppid()`` with ``parent_pid`` afterwards (an
    orphan has been re-parented). Elsewhere a daemon thread polls ``getppid()`` every ``poll_s`` seconds.

    Args:
        parent_pid: the process expected to be the parent (the training process, when the worker was forked or
            spawned from it); ``None``: whatever the parent is now (a forkserver's worker).
        poll_s: the fallback watchdog's polling interval.

    Returns:
        ``"prctl"`` or ``"watchdog"``: how the parent is watched.
    """
    parent = os.getppid() if parent_pid is None else parent_pid
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            ok = libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) == 0
        except (OSError, AttributeError):
            ok = False
        if ok:
            if os.getppid() != parent:  # the parent died before prctl: the signal will never come
                os._exit(1)
            return "prctl"

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(poll_s)
        os._exit(1)  # the main thread may be blocked in a write; nothing else would end the process

    threading.Thread(target=watch, name="exit_with_parent", daemon=True).start()
    return "watchdog"


def _start_method() -> str:
    """How the DataLoader starts its workers: the default context (no ``multiprocessing_context`` is passed), read
    without fixing it (the first of ``get_all_start_methods`` is the default: fork on Linux up to Python 3.13)."""
    return torch.multiprocessing.get_start_method(allow_none=True) or torch.multiprocessing.get_all_start_methods()[0]


def _batch_key(batch: Any) -> int:
    """Identifies a handed-out batch when Lightning is about to train on it: its ``input_ids`` tensor, which
    every strategy passes on as it is (Lightning's DeepSpeed precision plugin copies the batch dict itself)."""
    return id(batch["input_ids"]) if isinstance(batch, dict) and "input_ids" in batch else id(batch)


class _ValidLoader(DataLoader):
    """A DataLoader over a stacked stream that hands out batch dicts."""

    def __init__(self, dataset: MaskedBatchStream, *, pin: bool = False, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=None, collate_fn=keep_as_is, **kwargs)
        self._pin = pin

    def __iter__(self) -> Iterator[dict]:
        for stacked in super().__iter__():
            yield unstack_batch(stacked, self._pin)


class StepWindow(NamedTuple):
    """What a train micro-batch carries about its optimizer step (``batch["step_window"]``).

    The masked-LM objective of a step is the cross-entropy summed over every masked token of the global
    batch, divided by how many there are (fairseq's). A micro-batch's loss is backpropagated before the
    step's other micro-batches are seen, so the loader, which can look ahead, counts them: the training
    module sums ``masked`` over the ranks once per step and divides by it.

    Attributes:
        masked: tokens to predict in the whole accumulation window on this rank (a 0-d LongTensor, so it
            travels to the device with the batch, without a sync).
        position: this micro-batch's place in the window (0-based).
        size: micro-batches the plan puts in the window (the accumulation; an epoch's end may cut it short,
            and then ``masked`` counts the micro-batches there are, on which the trainer also steps).
    """

    masked: torch.Tensor
    position: int
    size: int


def window_end(accumulation: int | Sequence[Sequence[int]], index: int) -> int:
    """The index one past the last micro-batch of the accumulation window holding micro-batch ``index``.

    Args:
        accumulation: micro-batches per optimizer step, or a batch ramp's phases
            ``(start_step, start_micro_batch, accumulation)`` (``roberta_pl.optim.BatchPlan.phases``), each
            starting on a whole step of its own accumulation.
        index: a micro-batch index on this rank, counted from the start of training.
    Returns:
        The end of its window (windows are ``start_micro_batch + k * accumulation`` within a phase).
    """
    phases = [(0, 0, accumulation)] if isinstance(accumulation, int) else accumulation
    _, start, acc = [p for p in phases if p[1] <= index][-1]
    return index + acc - (index - start) % acc


def with_step_windows(batches: Iterable[dict], accumulation: int | Sequence[Sequence[int]], start: int = 0,
                      pin: bool = False) -> Iterator[dict]:
    """Yield ``batches``, each with ``batch[STEP_WINDOW]``: its accumulation window's masked-token count.

    Reads each window's micro-batches ahead (``accumulation`` of them), counts their ``labels`` other than
    -100, then yields them one by one. A window that the batches end inside is counted as far as it goes.

    Args:
        batches: micro-batch dicts with ``labels``, in training order.
        accumulation: as in :func:`window_end`, the same plan the trainer steps by.
        start: the index of the first batch, counted from the start of training (a resumed pass).
        pin: put the count in page-locked memory, as the batch is.
    Returns:
        An iterator over the same batch dicts.
    """
    it = iter(batches)
    index = start
    while True:
        size = window_end(accumulation, index) - index
        window = list(itertools.islice(it, size))
        if not window:
            return
        masked = torch.tensor(sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in window))
        if pin:
            masked = masked.pin_memory()
        for position, batch in enumerate(window):
            batch[STEP_WINDOW] = StepWindow(masked, position, size)
            yield batch
        index += len(window)


class _TrainLoader(DataLoader):
    """A DataLoader that starts each pass where the DataModule says, reports what it yields, and tags each
    batch with its step's masked-token count (:class:`StepWindow`)."""

    def __init__(self, datamodule: "MLMDataModule", dataset: MaskedBatchStream, *, pin: bool = False, **kwargs: Any) -> None:
        # Each window is read whole before its first micro-batch trains: let the workers run a window ahead,
        # or the device would wait on the part of every window beyond the default prefetch.
        acc = datamodule.accumulation
        workers, longest = kwargs.get("num_workers", 0), acc if isinstance(acc, int) else max(p[2] for p in acc)
        if workers and kwargs.get("prefetch_factor"):
            kwargs["prefetch_factor"] = max(kwargs["prefetch_factor"], math.ceil(2 * longest / workers))
        super().__init__(dataset, batch_size=None, collate_fn=keep_as_is, **kwargs)
        self._datamodule = datamodule
        self._pin = pin

    def __iter__(self) -> Iterator[dict]:
        dm = self._datamodule
        per_epoch = len(self.dataset)
        epoch, start = divmod(dm.consumed, per_epoch)
        self.dataset.set_position(epoch, start)
        dm._handed_out.clear()
        index = dm.consumed
        batches = (unstack_batch(stacked, self._pin) for stacked in super().__iter__())
        for batch in with_step_windows(batches, dm.accumulation, start=index, pin=self._pin):
            if dm._lightning_counts:
                dm._handed_out.append((_batch_key(batch), index))  # counted when Lightning trains on it
            else:
                dm.consumed = index + 1  # plain loop: taking a batch is using it
            index += 1
            yield batch

    # Lightning also checkpoints a loader that has these two methods, and warns on a mid-epoch
    # resume when it lacks them; the state is the DataModule's, so both routes restore the same.
    def state_dict(self) -> dict[str, int]:
        """The DataModule's consumed count (Lightning's stateful-loader protocol)."""
        return {"consumed": self._datamodule.consumed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        """Restore the DataModule's consumed count."""
        self._datamodule.set_consumed(state_dict["consumed"])


PACK_MODES = typing.get_args(PackMode)  # ("full_sentences", "doc")
_LEGACY_PACK_MODES = {"full": "full_sentences"}  # checkpoints from before the stream took the YAML's name


@dataclasses.dataclass(frozen=True)
class DataSettings:
    """How the streams are read: everything but the masking (:class:`~data_pipelines.masking.MaskingConfig`) and the
    batch shape (:meth:`MLMDataModule.connect`). Built once from a run's config.

    Attributes:
        pack_mode: ``"full_sentences"`` (FULL-SENTENCES, crosses documents, no padding) or ``"doc"``.
        seed: seed of shard assignment, order, shuffle and masks.
        num_workers: DataLoader workers per rank (0 reads in the main process).
        shuffle_window: blocks shuffled together in the train stream.
        on_error: ``"raise"`` or ``"skip"`` (counted warning) for bad shards.
        pin_memory: pin batches for faster host-to-GPU copies.
        batches_per_epoch: train batches per rank per epoch; ``None`` (default) derives the exact equal count
            from the manifest.
    """

    pack_mode: PackMode = "full_sentences"
    seed: int = 0
    num_workers: int = 0
    shuffle_window: int = 1024
    on_error: OnError = "raise"
    pin_memory: bool = False
    batches_per_epoch: int | None = None

    def __post_init__(self) -> None:
        check_on_error(self.on_error)
        if self.pack_mode not in PACK_MODES:
            raise DataError(f"pack_mode must be 'full_sentences' or 'doc', got {self.pack_mode!r}")
        if self.num_workers < 0:
            raise DataError(f"need num_workers >= 0, got {self.num_workers}")


def batch_multiple(accumulation: int | Sequence[Sequence[int]]) -> int:
    """Micro-batches per rank that make whole optimizer steps in every phase of ``accumulation`` (as in
    :func:`window_end`): an epoch holding a multiple of it never ends on a partial step."""
    phases = [(0, 0, accumulation)] if isinstance(accumulation, int) else accumulation
    return math.lcm(*(int(p[2]) for p in phases))


class MLMDataModule(L.LightningDataModule):
    """Streams masked-LM batches from WebDataset shards.

    Args:
        train_shards: shard directory, ``manifest.json``, brace pattern, ``pipe:`` URL or a list.
        tokenizer_dir: directory written by ``roberta-pl-data tokenizer``.
        valid_shards: like ``train_shards``, for validation (``None``: no validation loader).
            A directory means its manifest's ``valid`` split.
        manifest: manifest giving counts/hash for shards passed as patterns or ``pipe:`` URLs.
        masking: how batches are masked (validation always at ``masking.mask_prob``).
        settings: how the streams are read (packing, seed, workers, shuffle window, bad shards).
        mask_schedule: a :class:`~data_pipelines.masking.MaskSchedule` for the training mask rate
            (validation keeps ``masking.mask_prob``).
        rank: data-parallel rank when no Trainer is attached.
        world_size: data-parallel size when no Trainer is attached.

    The batch shape and the trainer's accumulation are given once, by :meth:`connect`, before the first loader.
    """

    def __init__(
        self,
        train_shards: str | os.PathLike | Sequence[str],
        tokenizer_dir: str | os.PathLike,
        *,
        valid_shards: str | os.PathLike | Sequence[str] | None = None,
        manifest: str | os.PathLike | None = None,
        masking: MaskingConfig = MaskingConfig(),
        settings: DataSettings = DataSettings(),
        mask_schedule: MaskSchedule | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        self.train_shards = train_shards
        self.valid_shards = valid_shards
        self.manifest = manifest
        self.tokenizer_dir = tokenizer_dir
        self.masking = masking
        self.settings = settings
        self.mask_schedule = mask_schedule
        self._rank, self._world_size = rank, world_size
        self._shape: tuple[int, int, int | list[tuple[int, int, int]]] | None = None  # see connect
        self.consumed = 0  # the data position: micro-batches of this rank's plan, epoch * len + batch (see resume)
        self._carry: Carry | None = None  # the rest of an epoch begun under another plan (see replan)
        self.replanned = False  # load_state_dict re-planned a checkpoint written under another plan
        self._handed_out: collections.deque = collections.deque()
        self._train: MaskedBatchStream | None = None
        self._valid: MaskedBatchStream | None = None
        self._placement: tuple[int, int] | None = None

    def connect(self, seq_len: int, micro_batch_size: int,
                accumulation: int | Sequence[Sequence[int]] = 1) -> "MLMDataModule":
        """Give the data side the trainer's batch plan, once, before the first loader (litgpt's ``connect``).

        Args:
            seq_len: tokens per sequence, including ``<s>`` and ``</s>``.
            micro_batch_size: sequences per batch on each rank.
            accumulation: micro-batches per optimizer step on each rank, or a batch ramp's phases
                ``(start_step, start_micro_batch, accumulation)`` (``roberta_pl.optim.BatchPlan.phases``). The train
                loader tags each batch with its step's masked-token count (:class:`StepWindow`), and each epoch
                holds whole optimizer steps (:func:`batch_multiple`), so every optimizer step, epoch ends included,
                sums the same number of micro-batches; it must be the plan the trainer steps by.
        Returns:
            This DataModule, so that building and connecting can be one expression.
        """
        acc = accumulation if isinstance(accumulation, int) else [tuple(int(x) for x in p) for p in accumulation]
        phases = [(0, 0, acc)] if isinstance(acc, int) else acc
        if seq_len < 3 or micro_batch_size < 1 or not phases or min(p[2] for p in phases) < 1:
            raise DataError(f"need seq_len >= 3, micro_batch_size >= 1, accumulation >= 1; got {seq_len}, "
                            f"{micro_batch_size}, {accumulation}")
        self._shape = (int(seq_len), int(micro_batch_size), acc)
        self._train = self._valid = None  # planned again with this shape
        return self

    def _connected(self) -> tuple[int, int, int | list[tuple[int, int, int]]]:
        if self._shape is None:
            raise DataError("MLMDataModule has no batch shape: call connect(seq_len, micro_batch_size, accumulation) "
                            "before its loaders are used")
        return self._shape

    @property
    def seq_len(self) -> int:
        """Tokens per sequence (from :meth:`connect`)."""
        return self._connected()[0]

    @property
    def micro_batch_size(self) -> int:
        """Sequences per batch on each rank (from :meth:`connect`)."""
        return self._connected()[1]

    @property
    def accumulation(self) -> int | list[tuple[int, int, int]]:
        """Micro-batches per optimizer step on each rank, or the ramp's phases (from :meth:`connect`)."""
        return self._connected()[2]

    @property
    def batch_multiple(self) -> int:
        """Train batches per epoch are a multiple of this: whole optimizer steps in every phase of the accumulation."""
        return batch_multiple(self.accumulation)

    # -- setup ---------------------------------------------------------------------------------

    @property
    def rank(self) -> int:
        """Data-parallel rank: the Trainer's when attached, else the constructor's."""
        return self.trainer.global_rank if self.trainer is not None else self._rank

    @property
    def world_size(self) -> int:
        """Data-parallel size: the Trainer's when attached, else the constructor's."""
        return self.trainer.world_size if self.trainer is not None else self._world_size

    @property
    def _lightning_counts(self) -> bool:
        # Inside fit, Lightning prefetches one batch; count at transfer time instead of at yield.
        return self.trainer is not None and bool(getattr(self.trainer, "training", False))

    def _stream(self, spec: Any, split: str, mask_stream: int, shuffle: bool) -> MaskedBatchStream:
        tok = load_tokenizer(self.tokenizer_dir)
        shards = resolve_shards(spec, split=split, manifest=self.manifest)
        if shards.tokenizer_hash is not None and shards.tokenizer_hash != tok.hash:
            raise DataError(
                f"{spec}: shards were written with tokenizer {shards.tokenizer_hash}, but {self.tokenizer_dir} is {tok.hash}"
            )
        masker = Masker(
            tok.vocab_size, tok.special_ids, tok.mask_id, self.masking,
            word_start=tok.word_start_table() if (self.masking.whole_word or self.masking.span) else None,
            schedule=self.mask_schedule if mask_stream == TRAIN_STREAM else None,
        )
        d, train = self.settings, mask_stream == TRAIN_STREAM
        config = StreamConfig(
            shards=shards, seq_len=self.seq_len, batch_size=self.micro_batch_size, pack_mode=d.pack_mode,
            seed=d.seed, rank=self.rank, world_size=self.world_size, num_workers=d.num_workers,
            shuffle_window=d.shuffle_window if shuffle else 1, shuffle_shards=shuffle,
            batches_per_epoch=d.batches_per_epoch if train else None,
            batch_multiple=self.batch_multiple if train else 1,
            mask_stream=mask_stream, expected_hash=tok.hash, vocab_size=tok.vocab_size,
            bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id, on_error=d.on_error, stacked=True,
        )
        return MaskedBatchStream(config, masker)

    def setup(self, stage: str | None = None) -> None:
        """Resolve shards, check the tokenizer hash and plan equal epochs (rank/world from the Trainer)."""
        placement = (self.rank, self.world_size)
        if self._placement != placement:  # planned before a Trainer was attached: plan again
            self._train = self._valid = None
            self._placement = placement
        if self._train is None:
            self._train = self._stream(self.train_shards, "train", TRAIN_STREAM, shuffle=True)
            self._train.set_carry(self._carry)
        if self.valid_shards is not None and self._valid is None:
            self._valid = self._stream(self.valid_shards, "valid", VALID_STREAM, shuffle=False)

    def _loader_kwargs(self) -> dict:
        workers = self.settings.num_workers
        return {
            "num_workers": workers,
            # Batches arrive as numpy (see StreamConfig.stacked); pinning happens when unstacking.
            "pin": self.settings.pin_memory,
            "persistent_workers": False,  # each pass re-forks so workers see the new epoch/cursor
            "prefetch_factor": 4 if workers else None,
            # Workers are forked by this process (the default start method on Linux) or spawned from it: they watch
            # its pid. Under a forkserver their parent is the server, which exits with this process.
            "worker_init_fn": functools.partial(ignore_requeue_signals, None if _start_method() == "forkserver"
                                                else os.getpid()) if workers else None,
        }

    def train_dataloader(self) -> DataLoader:
        """The train loader; each pass resumes from :attr:`consumed`."""
        self.setup("fit")
        return _TrainLoader(self, self._train, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        """The validation loader: same batches and masks every time."""
        self.setup("validate")
        if self._valid is None:
            return []
        return _ValidLoader(self._valid, **self._loader_kwargs())

    # -- resume --------------------------------------------------------------------------------

    @property
    def batches_per_epoch_per_rank(self) -> int:
        """Train batches per epoch on each rank (equal on all ranks)."""
        self.setup("fit")
        return len(self._train)

    def unused_per_epoch(self) -> dict[str, Any]:
        """What of the train split each epoch leaves unused, for the run summary.

        Ranks take equal steps in whole optimizer steps, so up to one global batch of blocks per
        epoch is not trained on (readers deal their spare blocks to each other; see
        :mod:`data_pipelines.stream`). Plans the train stream if not done yet.

        Returns:
            ``{"blocks", "total_blocks", "tokens", "total_tokens", "exact"}`` per epoch, over all
            ranks: unused blocks of ``seq_len`` tokens, and unused tokens (separators included;
            unused blocks plus each reader's last partial block; ``None`` when only a lower bound
            on blocks is known, as in ``doc`` packing). ``exact`` is False when the block
            counts are lower bounds, so the figures are at least these.
        """
        self.setup("fit")
        plan = self._train.plan
        return {
            "blocks": plan.unused_blocks,
            "total_blocks": sum(plan.reader_blocks),
            "tokens": plan.unused_tokens,
            "total_tokens": plan.total_tokens,
            "exact": plan.exact,
        }

    def skipped_shards(self) -> dict[str, int]:
        """Bad shard reads skipped so far per split (``on_error="skip"``), DataLoader workers included."""
        streams = {"train": self._train, "valid": self._valid}
        return {split: stream.skipped_shards for split, stream in streams.items() if stream is not None}

    def set_consumed(self, micro_batches: int) -> None:
        """Declare how many micro-batches this rank has trained on since the start of training.

        Args:
            micro_batches: the count; the next train loader pass starts right after it.
        """
        if micro_batches < 0:
            raise ValueError(f"micro_batches must be >= 0, got {micro_batches}")
        self.consumed = int(micro_batches)

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Lightning hook, called for the batch about to be trained on: count it as consumed."""
        handed = self._handed_out
        ids = [entry[0] for entry in handed]
        key = _batch_key(batch)
        if key in ids:
            # Entries before it were handed out but never trained on (e.g. an epoch cut short).
            for _ in range(ids.index(key) + 1):
                _, index = handed.popleft()
            self.consumed = index + 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        """What Lightning saves in the checkpoint: the data position, the settings it assumes, and the carried
        rest of an epoch while this run is still finishing one begun under another plan (``None`` otherwise)."""
        carry = self._carry
        if carry is not None and self.consumed >= (carry.epoch + 1) * self.batches_per_epoch_per_rank:
            carry = None  # that epoch is done
        return {
            "consumed": self.consumed,
            "seed": self.settings.seed,
            "seq_len": self.seq_len,
            "micro_batch_size": self.micro_batch_size,
            "num_workers": self.settings.num_workers,
            "world_size": self.world_size,
            "pack_mode": self.settings.pack_mode,
            "interleave_shards": StreamConfig.interleave_shards,
            "batch_multiple": self.batch_multiple,
            "carry": carry.to_dict() if carry is not None else None,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the data position. A checkpoint written under another plan (world size, workers, micro-batch
        size or accumulation) is re-planned: the rest of its epoch is dealt to this run's readers (one INFO
        line says how; see :meth:`replan`). Other changed settings (seed, seq_len, packing) make different
        blocks: a warning says the resume continues, but not with the same batches."""
        consumed = int(state_dict["consumed"])
        carry = Carry.from_dict(state_dict["carry"]) if state_dict.get("carry") else None
        self.replanned = False
        blocks = {"seed": self.settings.seed, "seq_len": self.seq_len, "pack_mode": self.settings.pack_mode,
                  "interleave_shards": StreamConfig.interleave_shards}
        written = dict(state_dict)
        written.setdefault("interleave_shards", 1)  # checkpoints from before readers interleaved shards read one at a time
        if "pack_mode" in written:
            written["pack_mode"] = _LEGACY_PACK_MODES.get(written["pack_mode"], written["pack_mode"])
        changed = [k for k, v in blocks.items() if k in written and written[k] != v]
        if changed:
            log.warning("data settings changed since the checkpoint (%s): resume continues, but not with the same batches", ", ".join(changed))
            self.consumed, self._carry = consumed, None
            return
        # Checkpoints from before batch_multiple was saved: the global batch is the same, so the accumulation
        # scales inversely with world size x micro-batch.
        saved_world = int(state_dict.get("world_size", self.world_size))
        saved_micro = int(state_dict.get("micro_batch_size", self.micro_batch_size))
        default_multiple = max(1, self.batch_multiple * self.world_size * self.micro_batch_size // (saved_world * saved_micro))
        workers = self.settings.num_workers
        saved = {"world_size": saved_world, "num_workers": int(state_dict.get("num_workers", workers)),
                 "batch_size": saved_micro, "batch_multiple": int(state_dict.get("batch_multiple", default_multiple))}
        here = {"world_size": self.world_size, "num_workers": workers, "batch_size": self.micro_batch_size,
                "batch_multiple": self.batch_multiple}
        if saved == here:
            self.consumed, self._carry = consumed, carry
            if self._train is not None:
                self._train.set_carry(carry)
            return
        self.replan(consumed, saved, carry)

    def replan(self, consumed: int, saved: dict[str, int], carry: Carry | None = None) -> None:
        """Continue from data position ``consumed`` reached under another plan: finish its epoch with exactly
        the blocks that plan's readers had not trained on, dealt to this run's readers in whole optimizer steps
        (less than one global batch of them may be left over), then follow this run's plan.

        Args:
            consumed: the saved data position (a rank's micro-batches, ``epoch * len + batch``, under that plan).
            saved: that plan's ``world_size``, ``num_workers``, ``batch_size`` (micro-batch) and ``batch_multiple``.
            carry: the carry that plan was itself finishing, if any (from the checkpoint).
        """
        if not isinstance(self.accumulation, int) and len(self.accumulation) > 1:
            raise DataError("batch.ramp: a resume on another world size, worker count or micro-batch size is not "
                            "supported under a batch ramp (its phases count micro-batches of the old plan); resume "
                            "with the checkpoint's settings or drop the ramp")
        self.setup("fit")
        stream = self._train
        old = dataclasses.replace(stream.config, rank=0, **saved)
        rest = rest_of_epoch(old, consumed, carry)
        first = stream.set_carry(rest)
        per_epoch = len(stream)
        epoch = rest.epoch if rest is not None else consumed // plan_epoch(old).batches_per_rank
        self.consumed, self._carry, self.replanned = epoch * per_epoch + first, rest, True
        if self.rank != 0:
            return
        where = (f"{saved['world_size']} rank(s) x {max(1, saved['num_workers'])} reader(s), micro-batch {saved['batch_size']}, "
                 f"accumulation {saved['batch_multiple']}")
        now = (f"{self.world_size} x {max(1, self.settings.num_workers)}, micro-batch {self.micro_batch_size}, accumulation "
               f"{self.batch_multiple}")
        if rest is None:
            log.info("data: re-planned for this run (the checkpoint's plan was %s; now %s): resuming at the start of "
                     "epoch %d under the new plan", where, now, epoch)
            return
        if first == per_epoch:
            log.info("data: re-planned for this run (the checkpoint's plan was %s; now %s): the %d blocks of epoch %d its "
                     "readers had not trained on fill no optimizer step on every rank and go unused; resuming at the "
                     "start of epoch %d under the new plan", where, now, rest.blocks, epoch, epoch + 1)
            return
        log.info("data: re-planned for this run (the checkpoint's plan was %s; now %s): the %d blocks of epoch %d its "
                 "readers had not trained on are re-dealt to this run's readers as batches %d-%d of the epoch on each "
                 "rank; %d of them (less than one global batch) go unused; later epochs follow the new plan",
                 where, now, rest.blocks, epoch, first, per_epoch - 1, stream.carry_left)
