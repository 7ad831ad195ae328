"""DeepSpeed ZeRO on CPU ranks as well as on CUDA GPUs.

Lightning's ``DeepSpeedStrategy`` is CUDA-only in three places, although DeepSpeed itself runs on CPU
(``DS_ACCELERATOR=cpu``; its CPU accelerator falls back to the gloo backend when oneCCL is absent).
:class:`ZeroStrategy` bypasses exactly those three on a CPU accelerator (overrides 1-3) and is Lightning's
strategy on CUDA, but for one fix that applies on both (override 4: gradient accumulation). Checked against
lightning 2.6.6 and deepspeed 0.19.8 (``lightning/pytorch/strategies/deepspeed.py``);
``tests/integration/test_zero_cpu.py`` fails loudly if a newer Lightning moves these points.
"""

from __future__ import annotations

import argparse
import os

from lightning.fabric.utilities.seed import reset_seed
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.strategies.ddp import DDPStrategy


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

    def backward(self, closure_loss, optimizer, *args, **kwargs):
        # 4. (CPU and CUDA) Lightning already divides the loss by accumulate_grad_batches, and
        #    DeepSpeedEngine.backward divides it again by gradient_accumulation_steps: gradients came out
        #    1/accumulation of DDP's (AdamW's eps and gradient clipping then act on the wrong scale).
        #    DeepSpeed's ``scale_wrt_gas=False`` turns its division off, so ZeRO's update equals DDP's.
        return super().backward(closure_loss, optimizer, *args, scale_wrt_gas=False, **kwargs)


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


class RendezvousDDPStrategy(DDPStrategy):
    """Lightning's DDP, whose first rendezvous gives up after ``$ROBERTA_PL_RENDEZVOUS_TIMEOUT`` seconds (set by
    the Slurm templates; default: torch's 30 minutes) with one line naming the address and port it waited on.

    A rank whose peers never come (an unresolvable ``MASTER_ADDR``, a node that failed to start, a wrong port)
    would otherwise hang for half an hour. Only the rendezvous gets the short timeout: Lightning's ``timeout``
    would also bound every collective, such as the barrier around a long checkpoint save. Checked against
    lightning 2.6.6 (``DDPStrategy.setup_distributed``, ``_timeout``, ``_get_process_group_backend``)."""

    def setup_distributed(self) -> None:
        import datetime

        import torch.distributed as dist

        seconds = os.environ.get(RENDEZVOUS_TIMEOUT_ENV)
        if seconds and not dist.is_initialized():
            self.set_world_ranks()
            if self.world_size > 1:
                env = self.cluster_environment
                address, port, rank = env.main_address, env.main_port, self.global_rank
                try:
                    store = dist.TCPStore(address, port, self.world_size, is_master=rank == 0, wait_for_workers=True,
                                          timeout=datetime.timedelta(seconds=float(seconds)))
                except (RuntimeError, TimeoutError) as e:  # DistStoreError, a RuntimeError: no peer in time
                    raise SystemExit(
                        f"roberta-pl-train: error: rank {rank} of {self.world_size} waited {float(seconds):g} s for the "
                        f"rendezvous at {address}:{port} (MASTER_ADDR:MASTER_PORT) and gave up "
                        f"({str(e).splitlines()[0][:120] if str(e) else type(e).__name__}); check that every node "
                        f"started and can reach that address, or raise {RENDEZVOUS_TIMEOUT_ENV}") from None
                store.set_timeout(self._timeout)
                dist.init_process_group(self._get_process_group_backend(), store=store, rank=rank,
                                        world_size=self.world_size, timeout=self._timeout)
        super().setup_distributed()  # Lightning's own, which leaves an existing process group as it is
