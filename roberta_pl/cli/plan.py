"""roberta-pl-plan: size a pretraining job before submitting it.

For a model, sequence length, global batch, nodes x GPUs and ZeRO stage it prints the micro batch,
accumulation, tokens per step, an estimate of memory per GPU and the time to N steps at a given
throughput. The arithmetic is printed with the answer, so it can be checked.

Memory model (bytes, P = parameters, N = data-parallel ranks):
- DDP, bf16 autocast: fp32 weights 4P + fp32 grads 4P + Adam m, v 8P = 16P per GPU.
- DeepSpeed bf16: bf16 weights 2P, bf16 grads 2P, fp32 master + m + v 12P. ZeRO-1 divides the 12P by N,
  ZeRO-2 also the grads, ZeRO-3 also the weights; offload moves the 12P (and at stage 3 the weights) to CPU.
- Activations per layer with flash attention (Korthikanti et al. 2022, no s^2 term): 34 * micro * T * H bytes
  in 16-bit; with activation checkpointing only the layer inputs, 2 * micro * T * H, plus one layer's 34.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

from roberta_pl.model import RobertaConfig, RobertaForMaskedLM, mlm_flops_per_token
from roberta_pl.optim import BatchPlanError, plan_batch

GIB = 1024**3


@dataclass
class JobEstimate:
    micro_batch_size: int
    accumulation: int
    world_size: int
    tokens_per_step: int
    params: int
    state_gib: float
    activation_gib: float
    total_gib: float
    step_seconds: float
    total_hours: float
    flops_per_token: float


def count_parameters(config: RobertaConfig) -> int:
    import torch

    with torch.device("meta"):
        return RobertaForMaskedLM(config).num_parameters()


def estimate(model: str, seq_len: int, global_batch: int, micro_batch: int, nodes: int, gpus_per_node: int,
             zero_stage: int = 0, offload: bool = False, activation_checkpointing: bool = False,
             tokens_per_sec_per_gpu: float | None = None, mfu: float = 0.45, peak_tflops: float = 989.0,
             steps: int = 500_000, vocab_size: int | None = None) -> JobEstimate:
    """The numbers behind the printed plan (see the module docstring for the memory model)."""
    overrides = {"vocab_size": vocab_size} if vocab_size else {}
    config = RobertaConfig.from_name(model, max_seq_len=max(seq_len, 1), **overrides)
    world = nodes * gpus_per_node
    plan = plan_batch(global_batch, micro_batch, world, seq_len)
    P = count_parameters(config)
    if zero_stage == 0:
        state = 16 * P
    else:
        weights, grads, optimizer = 2 * P, 2 * P, 12 * P
        optimizer = 0 if offload else optimizer / world
        if zero_stage >= 2:
            grads /= world
        if zero_stage >= 3:
            weights = 0 if offload else weights / world
        state = weights + grads + optimizer
    H, L = config.hidden_size, config.num_layers
    per_layer = 34 * micro_batch * seq_len * H
    activations = (2 * micro_batch * seq_len * H * L + per_layer) if activation_checkpointing else per_layer * L
    flops = mlm_flops_per_token(config, seq_len)
    if tokens_per_sec_per_gpu is None:
        tokens_per_sec_per_gpu = mfu * peak_tflops * 1e12 / flops
    step_seconds = plan.tokens_per_step / (tokens_per_sec_per_gpu * world)
    return JobEstimate(micro_batch, plan.accumulation, world, plan.tokens_per_step, P, state / GIB,
                       activations / GIB, (state + activations) / GIB, step_seconds,
                       step_seconds * steps / 3600, flops)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="roberta-pl-plan",
        description="Size a pretraining job: micro batch, accumulation, tokens per step, memory per GPU and "
                    "time to N steps. Example (RoBERTa-base's recipe on 8 nodes of 8 GPUs): "
                    "roberta-pl-plan --model base --global-batch 8192 --micro-batch 32 --nodes 8 --gpus-per-node 8",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", default="base", choices=["tiny", "small", "base", "large"])
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--global-batch", type=int, default=8192, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=int, default=32, help="sequences per forward pass per GPU")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage (0 = DDP)")
    p.add_argument("--offload", action="store_true", help="offload optimizer state (and stage-3 weights) to CPU")
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--vocab-size", type=int, help="default: the preset's (50265 for base/large)")
    p.add_argument("--tokens-per-sec-per-gpu", type=float, help="measured throughput (default: from --mfu)")
    p.add_argument("--mfu", type=float, default=0.45, help="assumed model FLOPs utilisation")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="GPU peak (H100 SXM bf16 dense: 989)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="warn above this")
    p.add_argument("--steps", type=int, default=500_000)
    a = p.parse_args(argv)
    try:
        e = estimate(a.model, a.seq_len, a.global_batch, a.micro_batch, a.nodes, a.gpus_per_node, a.zero,
                     a.offload, a.activation_checkpointing, a.tokens_per_sec_per_gpu, a.mfu, a.peak_tflops,
                     a.steps, a.vocab_size)
    except (BatchPlanError, ValueError) as err:
        sys.exit(f"roberta-pl-plan: error: {err}")
    tps = e.tokens_per_step / (e.step_seconds * e.world_size)
    print(f"model {a.model}: {e.params / 1e6:.1f}M parameters, {e.flops_per_token / 1e9:.2f} GFLOP/token (train, sparse head)")
    print(f"global batch {a.global_batch} = micro {e.micro_batch_size} x accumulation {e.accumulation} "
          f"x {e.world_size} GPUs ({a.nodes} nodes x {a.gpus_per_node})")
    print(f"tokens per step: {a.global_batch} x {a.seq_len} = {e.tokens_per_step:,}")
    print(f"memory per GPU: {e.total_gib:.1f} GiB = model/optimizer state {e.state_gib:.1f} GiB "
          f"({'DDP' if a.zero == 0 else f'ZeRO-{a.zero}' + (' + offload' if a.offload else '')}) "
          f"+ activations {e.activation_gib:.1f} GiB")
    print(f"throughput: {tps:,.0f} tokens/s per GPU -> {e.step_seconds:.2f} s/step, "
          f"{a.steps:,} steps in {e.total_hours:.1f} h ({e.total_hours / 24:.1f} days)")
    if e.total_gib > a.gpu_memory_gib:
        print(f"warning: {e.total_gib:.1f} GiB exceeds {a.gpu_memory_gib:.0f} GiB per GPU: lower --micro-batch "
              f"(accumulation grows), add --activation-checkpointing or a higher --zero stage")


if __name__ == "__main__":
    main()
