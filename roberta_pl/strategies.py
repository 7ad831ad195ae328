"""DeepSpeed ZeRO on CPU ranks as well as on CUDA GPUs.

Lightning's ``DeepSpeedStrategy`` is CUDA-only in three places, although DeepSpeed itself runs on CPU
(``DS_ACCELERATOR=cpu``; its CPU accelerator falls back to the gloo backend when oneCCL is absent).
:class:`ZeroStrategy` bypasses exactly those three on a CPU accelerator (overrides 1-3) and is Lightning's
strategy on CUDA, but for two fixes that apply on both (override 4: gradient accumulation; override 5: loading a
checkpoint written by another number of ranks). Checked against lightning 2.6.6 and deepspeed 0.19.8
(``lightning/pytorch/strategies/deepspeed.py``); ``tests/integration/test_zero_cpu.py`` fails loudly if a newer
Lightning moves these points.

Resume on another world size (after losing a node, say), for any strategy: a ZeRO checkpoint is converted to DeepSpeed's
universal checkpoint (:func:`to_universal`; DDP checkpoints are whole already), the DataModule re-deals the rest of the
interrupted epoch (``MLMDataModule.replan``) and ``roberta_pl.callbacks.WorldSizeResume`` puts Lightning's micro-batch counters on the
new plan. See the README's resume section and docs/data.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
from pathlib import Path

from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.strategies.ddp import DDPStrategy

log = logging.getLogger("roberta_pl")


class ZeroStrategy(DeepSpeedStrategy):
    """Lightning's ``DeepSpeedStrategy`` that also runs on CPU ranks (gloo), e.g. ``trainer.devices=2``."""

    def _on_cpu(self) -> bool:
        return isinstance(self.accelerator, CPUAccelerator)

    def setup_environment(self) -> None:
        # 1. Lightning raises unless the accelerator is CUDA. On CPU: pin DeepSpeed's accelerator to CPU
        #    (read once, when deepspeed is first imported, which happens after this in setup_distributed;
        #    on a GPU machine it would otherwise pick CUDA), then do what the parent's parent does.
        if not self._on_cpu():
            return super().setup_environment()
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        DDPStrategy.setup_environment(self)

    def setup_distributed(self) -> None:
        # 2. Lightning checks that the CUDA device indices equal the local ranks; CPU devices have no index.
        #    The rest is the parent's body.
        #    Both first start the process group with the rendezvous timeout, as DDP does (rendezvous).
        rendezvous(self)
        if not self._on_cpu():
            return super().setup_distributed()
        reset_seed()
        self.set_world_ranks()
        self._init_deepspeed_distributed()

    def _setup_model_and_optimizer(self, model, optimizer, lr_scheduler=None):
        # 3. Lightning passes ``root_device.index`` as DeepSpeed's device rank: None on CPU, which DeepSpeed
        #    compares with 0. The local rank is what DeepSpeed's CPU accelerator expects (it ignores it).
        #    Otherwise the parent's body. (Only the training path: this project never runs DeepSpeed inference.)
        if not self._on_cpu():
            return super()._setup_model_and_optimizer(model, optimizer, lr_scheduler)
        import deepspeed

        engine, ds_optimizer, _, _ = deepspeed.initialize(
            args=argparse.Namespace(device_rank=self.local_rank), config=self.config, model=model,
            model_parameters=filter(lambda p: p.requires_grad, model.parameters()), optimizer=optimizer,
            lr_scheduler=lr_scheduler, dist_init_required=False,
        )
        return engine, ds_optimizer

    def load_checkpoint(self, checkpoint_path, weights_only=None):
        # 5. (CPU and CUDA) A ZeRO checkpoint holds one optimizer partition per rank, and DeepSpeed refuses to load
        #    it on another number of ranks. Written by another number: convert it to DeepSpeed's universal format
        #    (one file per parameter and state) and load that, re-partitioned for this run (see to_universal).
        #    (CPU and CUDA) Before DeepSpeed reads anything (it unpickles with weights_only=False): every file of the
        #    directory's current save is read with weights_only=True, or the load is refused naming the file.
        from roberta_pl.checkpoints import vet_zero_checkpoint

        path = Path(checkpoint_path)
        if path.is_dir():
            vet_zero_checkpoint(path)
        saved = zero_checkpoint_ranks(path)
        if saved in (None, self.world_size) or (self.load_full_weights and self.zero_stage_3):
            return super().load_checkpoint(checkpoint_path, weights_only)
        universal = to_universal(path, self.world_size, self.global_rank, self.barrier)
        engine = self.deepspeed_engine
        engine._config.load_universal_checkpoint = True  # read by engine.load_checkpoint (deepspeed 0.19.8)
        try:
            _, client_state = engine.load_checkpoint(
                str(universal.parent), tag=universal.name,
                load_optimizer_states=self.lightning_module.trainer.state.fn == "fit",
                load_lr_scheduler_states=False, load_module_strict=self.lightning_module.strict_loading)
        finally:
            engine._config.load_universal_checkpoint = False
        _unshare_adam_steps(engine.optimizer)
        self.barrier("universal checkpoint loaded")
        if self.global_rank == 0:
            shutil.rmtree(universal.parent, ignore_errors=True)
            log.info("ZeRO checkpoint %s was written by %d rank(s), this run has %d: converted it to DeepSpeed's universal "
                     "checkpoint and loaded the parameters and optimizer state (Adam moments, step) re-partitioned "
                     "for %d rank(s)", path, saved, self.world_size, self.world_size)
        if client_state is None:
            raise RuntimeError(f"{path}: DeepSpeed could not load its universal conversion {universal}")
        return client_state

    def save_checkpoint(self, checkpoint, filepath, storage_options=None):
        # 6. (CPU and CUDA) Atomic saves. Lightning saves every checkpoint under DeepSpeed's tag `checkpoint`, which
        #    DeepSpeed writes in place, rank by rank: a kill mid-save left a `last.ckpt` with files of two steps (and
        #    under ZeRO a rank restores its weights from its own partition, so ranks resumed from different steps).
        #    Here each save goes to a fresh tag directory, and only once every rank has written (and synced) its
        #    files does rank 0 point `checkpoint` at it (roberta_pl.checkpoints.publish_zero_save). A fresh directory
        #    also holds no partition of an earlier save by more ranks. The rest is Lightning 2.6.6's body.
        from roberta_pl.checkpoints import (
            ZERO_TAG_PREFIX,
            fsync_files,
            publish_zero_save,
        )

        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options (got {storage_options!r})")
        filepath = Path(self.broadcast(str(filepath)))  # rank 0's path and tag, on every rank
        tag = self.broadcast(f"{ZERO_TAG_PREFIX}{os.urandom(6).hex()}")
        state = {k: v for k, v in checkpoint.items() if k not in ("state_dict", "optimizer_states")}
        self.deepspeed_engine.save_checkpoint(str(filepath), client_state=state, tag=tag, save_latest=False,
                                              exclude_frozen_parameters=self.exclude_frozen_parameters)
        # DeepSpeed's save ends at a barrier: every rank's files are closed. Each rank syncs a share of them.
        files = sorted(p for p in (filepath / tag).rglob("*") if p.is_file())
        fsync_files(files[self.global_rank::self.world_size])
        self.barrier("checkpoint files written")
        if self.global_rank == 0:
            publish_zero_save(filepath, tag)
        self.barrier("checkpoint published")

    def backward(self, closure_loss, optimizer, *args, **kwargs):
        # 4. (CPU and CUDA) Lightning already divides the loss by accumulate_grad_batches, and
        #    DeepSpeedEngine.backward divides it again by gradient_accumulation_steps: gradients came out
        #    1/accumulation of DDP's (AdamW's eps and gradient clipping then act on the wrong scale).
        #    DeepSpeed's ``scale_wrt_gas=False`` turns its division off, so ZeRO's update equals DDP's.
        return super().backward(closure_loss, optimizer, *args, scale_wrt_gas=False, **kwargs)


_RANK_FILE = re.compile(r"(?:bf16_)?zero_pp_rank_(\d+)_mp_rank_00_(?:optim|model)_states\.pt$")


def zero_checkpoint_ranks(path: Path) -> int | None:
    """Ranks that wrote a DeepSpeed ZeRO checkpoint directory (its recorded ``dp_world_size``); None if ``path`` is
    not one (a single-file checkpoint, or no ``latest`` tag). Counting the per-rank files would not do: a
    checkpoint saved over one written by more ranks kept their files (see :meth:`ZeroStrategy.save_checkpoint`)."""
    from roberta_pl.checkpoints import load_zero_file, zero_tag_dir

    tag = zero_tag_dir(path)  # the last completed save (see roberta_pl.checkpoints.publish_zero_save)
    states = sorted(tag.glob("*mp_rank_00_model_states.pt")) if tag else []
    if not states:
        return None
    saved = load_zero_file(states[0])  # weights_only: a file with pickled code is refused, naming it
    return int(saved["dp_world_size"]) if "dp_world_size" in saved else None


def _stale_rank_files(folder: Path, ranks: int) -> list[Path]:
    """Per-rank ZeRO files in ``folder`` of ranks ``>= ranks``: left by an earlier save of more ranks to the same path."""
    return [f for f in folder.iterdir() if (m := _RANK_FILE.match(f.name)) and int(m.group(1)) >= ranks]


def _unshare_adam_steps(ds_optimizer) -> None:
    """Give each optimizer state its own ``step`` tensor after a universal load.

    DeepSpeed 0.19.8's ZeRO-3 universal load (``load_hp_checkpoint_state_from_checkpoint_dir_stage3``) assigns one
    and the same ``step`` tensor to every sub-group's state (one per parameter group: ours are two, with and without
    weight decay), and torch's Adam increments each state's step in place: the shared step then advanced once per
    sub-group per update (a run resumed at step 4 on another world size saved Adam step 12 at step 8), and Adam's
    bias correction used that wrong step. ZeRO-1/2 loads read one step per parameter; copying them is harmless."""
    import torch

    inner = getattr(ds_optimizer, "optimizer", None)  # the torch optimizer DeepSpeed's ZeRO optimizer wraps
    for state in getattr(inner, "state", {}).values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def to_universal(path: Path, world_size: int, rank: int, barrier) -> Path:
    """Convert a ZeRO checkpoint directory to DeepSpeed's universal checkpoint, for loading on another number of ranks.

    Why universal and not consolidating to fp32: a universal checkpoint keeps, per parameter, the fp32 master
    weights *and* the optimizer state (Adam's ``exp_avg``, ``exp_avg_sq``, ``step``), and DeepSpeed itself
    re-partitions them for any number of ranks and either ZeRO stage (``load_universal_checkpoint``); the fp32
    consolidation (``zero_to_fp32``) keeps the weights only. DeepSpeed's elastic ZeRO-1/2 loading is refused by
    its engine when the data-parallel size differs. The conversion (``ds_to_universal``) reads files only, so it
    runs the same on CPU ranks (gloo) as on GPUs.

    Rank 0 converts, in one process (no worker pool inside a training process), into ``.universal/`` beside the
    checkpoint; the others wait at ``barrier``. The caller removes it once loaded.

    Returns:
        The universal checkpoint's directory (load it with ``tag=path.name`` from ``path.parent``).
    """
    import contextlib
    import io

    from roberta_pl.checkpoints import vet_zero_checkpoint

    out = path.parent / ".universal" / f"{path.name}-for-{world_size}"
    if rank == 0:
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

        # The converter unpickles with weights_only=False: it gets only files that load with weights_only=True.
        source = vet_zero_checkpoint(path)  # the last completed save's tag directory
        shutil.rmtree(out, ignore_errors=True)
        # The converter reads every per-rank file in its folder: give it those of the ranks that wrote this save.
        stale = set(_stale_rank_files(source, zero_checkpoint_ranks(path)))
        staged = out.with_name(out.name + "-input")
        shutil.rmtree(staged, ignore_errors=True)
        staged.mkdir(parents=True)
        for f in source.iterdir():
            if f not in stale:
                (staged / f.name).symlink_to(f.resolve())
        args = argparse.Namespace(input_folder=str(staged), output_folder=str(out), num_extract_workers=1,
                                  num_merge_workers=1, keep_temp_folder=False, strict=True,
                                  # checkpoints written without DeepSpeed's universal-checkpoint metadata (a plain
                                  # data-parallel model has none to give) get its default
                                  inject_missing_state=True)
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # progress bars
            ds_to_universal(args)
        shutil.rmtree(staged)
    barrier("universal checkpoint written")
    return out


def load_cpu_adam(accelerator: str) -> str | None:
    """Build (first time: a minute or more, then cached by torch) and load DeepSpeed's CPU Adam op, which
    ZeRO-Offload needs. The compiler's output is kept off the terminal. Returns None when the op loads,
    else one line saying why not (the compiler's first error line when there is one)."""
    import sys
    import tempfile

    if accelerator == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is first imported
    error = None
    with tempfile.TemporaryFile("w+") as log:
        sys.stdout.flush(), sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        os.dup2(log.fileno(), 1), os.dup2(log.fileno(), 2)  # the compiler runs as a child: redirect the fds
        try:
            from deepspeed.ops.op_builder import CPUAdamBuilder

            CPUAdamBuilder().load(verbose=False)
        except Exception as e:  # a missing compiler or headers, a failed compile
            error = e
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
            os.close(saved[0]), os.close(saved[1])
        if error is None:
            return None
        log.seek(0)
        output = [line.strip() for line in log.read().splitlines()]
    message = [line.strip() for line in str(error).splitlines() if line.strip()] or [type(error).__name__]
    causes = [line for line in [*message, *output]  # torch puts the compiler's output in the exception
              if ("error:" in line.lower() or "not found" in line) and not line.startswith("Error building")]
    return (causes[0] if causes else f"{type(error).__name__}: {message[-1]}")[:200]


RENDEZVOUS_TIMEOUT_ENV = "ROBERTA_PL_RENDEZVOUS_TIMEOUT"


def process_group_options(strategy: DDPStrategy) -> dict:
    """What Lightning 2.6.6's ``DDPStrategy.setup_distributed`` passes to ``init_process_group`` besides the backend:
    its collective ``timeout``, and the rank's CUDA ``device_id`` (NCCL binds its communicator to it at once; None
    on CPU)."""
    device = strategy.root_device
    return {"timeout": strategy._timeout, "device_id": device if device.type == "cuda" else None}


def rendezvous(strategy: DDPStrategy, prog: str = "roberta-pl-train") -> None:
    """Start the process group with a first rendezvous that gives up after ``$ROBERTA_PL_RENDEZVOUS_TIMEOUT`` seconds
    (set by the Slurm templates) with one line naming the address and port it waited on; without the variable,
    or with one rank, or with a process group already there, nothing is done and the strategy starts its own
    (torch's 30 minutes).

    A rank whose peers never come (an unresolvable ``MASTER_ADDR``, a node that failed to start, a wrong port)
    would otherwise hang for half an hour. Only the rendezvous gets the short timeout: Lightning's ``timeout``
    still bounds every collective, such as the barrier around a long checkpoint save. DDP and DeepSpeed both call
    it first in ``setup_distributed``; both then find the group started (DeepSpeed's ``init_distributed`` wraps an
    existing torch group). Checked against lightning 2.6.6 (``DDPStrategy.setup_distributed``, ``_timeout``,
    ``_get_process_group_backend``) and deepspeed 0.19.8 (``deepspeed.comm.init_distributed``)."""
    import datetime

    import torch.distributed as dist

    seconds = os.environ.get(RENDEZVOUS_TIMEOUT_ENV)
    if not seconds or dist.is_initialized():
        return
    strategy.set_world_ranks()
    if strategy.world_size < 2:
        return
    env = strategy.cluster_environment
    address, port, rank = env.main_address, env.main_port, strategy.global_rank
    try:
        store = dist.TCPStore(address, port, strategy.world_size, is_master=rank == 0, wait_for_workers=True,
                              timeout=datetime.timedelta(seconds=float(seconds)))
    except (RuntimeError, TimeoutError) as e:  # DistStoreError, a RuntimeError: no peer in time
        raise SystemExit(
            f"{prog}: error: rank {rank} of {strategy.world_size} waited {float(seconds):g} s for the "
            f"rendezvous at {address}:{port} (MASTER_ADDR:MASTER_PORT) and gave up "
            f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__}); check that every node "
            f"started and can reach that address, or raise {RENDEZVOUS_TIMEOUT_ENV}") from None
    options = process_group_options(strategy)
    store.set_timeout(options["timeout"])
    dist.init_process_group(strategy._get_process_group_backend(), store=store, rank=rank,
                            world_size=strategy.world_size, **options)


class RendezvousDDPStrategy(DDPStrategy):
    """Lightning's DDP, whose first rendezvous gives up after ``$ROBERTA_PL_RENDEZVOUS_TIMEOUT`` seconds
    (:func:`rendezvous`)."""

    def setup_distributed(self) -> None:
        rendezvous(self)
        super().setup_distributed()  # Lightning's own, which leaves an existing process group as it is
