"""The DataLoaders :class:`~data_pipelines.datamodule.MLMDataModule` hands to Lightning, and their worker processes.

:class:`TrainLoader` starts each pass at the DataModule's data position, records the batches it hands out (the
DataModule counts one as consumed when Lightning trains on it) and tags each with its optimizer step's
masked-token count (:class:`StepWindow`, :func:`with_step_windows`); :class:`ValidLoader` hands out the same
batches every time. Their workers ignore the signals the training process acts on and die with it
(:func:`ignore_requeue_signals`, :func:`exit_with_parent`).
"""

from __future__ import annotations

import ctypes
import functools
import itertools
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch.utils.data import DataLoader

from data_pipelines.contract import IGNORE_INDEX, STEP_WINDOW
from data_pipelines.stream import MaskedBatchStream, keep_as_is, unstack_batch

if TYPE_CHECKING:
    from data_pipelines.datamodule import MLMDataModule


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


def loader_options(num_workers: int, pin_memory: bool) -> dict[str, Any]:
    """The keyword arguments of :class:`TrainLoader` and :class:`ValidLoader` for ``num_workers`` workers per rank."""
    return {
        "num_workers": num_workers,
        # Batches arrive as numpy (see StreamConfig.stacked); pinning happens when unstacking.
        "pin": pin_memory,
        "persistent_workers": False,  # each pass re-forks so workers see the new epoch/cursor
        "prefetch_factor": 4 if num_workers else None,
        # Workers are forked by this process (the default start method on Linux) or spawned from it: they watch
        # its pid. Under a forkserver their parent is the server, which exits with this process.
        "worker_init_fn": functools.partial(ignore_requeue_signals, None if _start_method() == "forkserver"
                                            else os.getpid()) if num_workers else None,
    }


def batch_key(batch: Any) -> int:
    """Identifies a handed-out batch when Lightning is about to train on it: its ``input_ids`` tensor, which
    every strategy passes on as it is (Lightning's DeepSpeed precision plugin copies the batch dict itself)."""
    return id(batch["input_ids"]) if isinstance(batch, dict) and "input_ids" in batch else id(batch)


class ValidLoader(DataLoader):
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


def batch_multiple(accumulation: int | Sequence[Sequence[int]]) -> int:
    """Micro-batches per rank that make whole optimizer steps in every phase of ``accumulation`` (as in
    :func:`window_end`): an epoch holding a multiple of it never ends on a partial step."""
    phases = [(0, 0, accumulation)] if isinstance(accumulation, int) else accumulation
    return math.lcm(*(int(p[2]) for p in phases))


class TrainLoader(DataLoader):
    """A DataLoader that starts each pass where the DataModule says, reports what it yields, and tags each
    batch with its step's masked-token count (:class:`StepWindow`).

    The data position is the DataModule's: this loader reads ``consumed`` and ``accumulation`` from it and, inside a
    Lightning fit, records each batch it hands out in the DataModule's ``_handed_out`` queue, which the DataModule's
    ``on_before_batch_transfer`` hook settles (see :mod:`data_pipelines.datamodule`).
    """

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
                dm._handed_out.append((batch_key(batch), index))  # counted when Lightning trains on it
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
