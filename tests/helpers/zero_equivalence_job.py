"""A real 2-rank CPU (gloo) job for tests/integration/test_zero_cpu.py: one tiny MLM training under DDP, ZeRO-2 and ZeRO-3.

Usage: python zero_equivalence_job.py OUT_DIR STRATEGY[,STRATEGY...] [PRECISION]   (ddp | zero2 | zero3 | zero3_offload)

The strategies run one after another in the same two processes (Lightning launches rank 1 once; the
later Trainers find the rank variables and the gloo group already there), from the same initial weights
(seed 0), on the same pre-masked global batches as tests/helpers/ddp_equivalence_job.py. Each rank records its
loss at every micro-batch; rank 0 saves the final parameters (gathered from the ZeRO-3 shards) and the
ZeRO-3 run also writes its DeepSpeed checkpoint directory.
"""

import json
import os
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from ddp_equivalence_job import GLOBAL, MICRO, SEQ, STEPS, VOCAB, Data, Module
from omegaconf import OmegaConf

from roberta_pl.batch_plan import plan_batch
from roberta_pl.strategies import ZeroStrategy
from roberta_pl.trainer import deepspeed_config

WORLD = 2


class Recorded(Module):
    """Records this rank's masked-LM loss at every training micro-batch."""

    losses: list

    def _shared_step(self, batch):
        out = super()._shared_step(batch)
        self.losses = getattr(self, "losses", []) + [out[0].item()]
        return out


def strategy(name: str):
    if name == "ddp":
        return "ddp"
    plan = plan_batch(GLOBAL, MICRO, WORLD, SEQ)
    offload = name.endswith("_offload")  # zero3_offload: optimizer state and parameters in CPU memory
    cfg = OmegaConf.create({"trainer": {"deepspeed": {"stage": int(name[4]), "offload_optimizer": offload,
                                                      "offload_parameters": offload}}})
    return ZeroStrategy(config=deepspeed_config(cfg, plan))  # the project's own DeepSpeed config


def full_state(module: pl.LightningModule, trainer: pl.Trainer) -> dict[str, torch.Tensor]:
    """The model's full parameters on every rank (ZeRO-3 keeps only a shard of each on a rank)."""
    if getattr(trainer.strategy, "zero_stage_3", False):
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.model.parameters()), modifier_rank=None):
            return {k: v.detach().clone().float() for k, v in module.model.state_dict().items()}
    return {k: v.detach().clone().float() for k, v in module.model.state_dict().items()}


def main(out: str, names: str, precision: str = "32-true") -> None:
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    optimizers = {}
    for name in names.split(","):
        torch.manual_seed(0)
        module = Recorded(model=dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                     max_seq_len=SEQ, dropout=0.0, attention_dropout=0.0),
                          optim=dict(lr=1e-3, betas=[0.9, 0.98], eps=1e-6, weight_decay=0.01, warmup_steps=0,
                                     decay="linear"),
                          max_steps=STEPS, seq_len=SEQ, micro_batch_size=MICRO)
        trainer = pl.Trainer(accelerator="cpu", devices=WORLD, strategy=strategy(name), precision=precision,
                             max_steps=STEPS, accumulate_grad_batches=GLOBAL // (MICRO * WORLD), logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             use_distributed_sampler=False)
        if "LOCAL_RANK" not in os.environ:  # rank 0, before it launches rank 1: the shared initial weights
            torch.save({k: v.clone() for k, v in module.model.state_dict().items()}, out_dir / "init.pt")
        started = time.monotonic()
        trainer.fit(module, datamodule=Data())
        print(f"{name}: fit took {time.monotonic() - started:.1f} s", file=sys.stderr)
        engine = getattr(trainer.strategy, "deepspeed_engine", None)
        optimizers[name] = type(engine.basic_optimizer if engine is not None else trainer.optimizers[0]).__name__
        assert trainer.global_step == STEPS
        rank = trainer.global_rank
        (out_dir / f"losses-{name}-rank{rank}.json").write_text(json.dumps(module.losses))
        state = full_state(module, trainer)
        if name == "zero3":  # the checkpoint of one run is enough
            trainer.save_checkpoint(out_dir / "zero3.ckpt")  # every rank writes its shard
        if rank == 0:
            torch.save(state, out_dir / f"final-{name}.pt")
    if rank == 0:
        (out_dir / "optimizers.json").write_text(json.dumps(optimizers))


if __name__ == "__main__":
    main(*sys.argv[1:])
