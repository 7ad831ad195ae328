"""roberta-pl-plan: size a pretraining job before submitting it.

For a model, sequence length, global batch, nodes x GPUs and ZeRO stage it prints the micro batch,
accumulation, tokens per step, memory per GPU for DDP and each ZeRO stage, and the time to N steps. The
assumptions (MFU, bandwidths) and the arithmetic are printed with the answer, so they can be checked.

Memory model (bytes, P = parameters, N = data-parallel ranks; the ZeRO paper's accounting,
Rajbhandari et al. 2020):
- DDP (ZeRO-0), bf16 autocast or fp32: fp32 weights 4P + fp32 grads 4P + Adam m, v 8P = 16P per GPU.
- DeepSpeed bf16: bf16 weights 2P, bf16 grads 2P, fp32 master + m + v 12P. DeepSpeed fp32: weights 4P, grads 4P,
  and still its own fp32 master copy + m + v 12P (measured: bench/zero_memory.py). ZeRO-1 divides the
  optimizer state by N, ZeRO-2 also the grads, ZeRO-3 also the weights; offload moves the optimizer state
  (and at stage 3 the weights) to CPU.
  Communication buckets (DeepSpeed's ``reduce_bucket_size``) are not counted.
- Activations per layer with flash attention (Korthikanti et al. 2022, no s^2 term): 34 * micro * T * H bytes
  in 16-bit; with activation checkpointing only the layer inputs, 2 * micro * T * H, plus one layer's 34.

Time model per optimizer step (communication is not overlapped with compute: an upper bound):
- compute = tokens per GPU x training FLOPs per token / (MFU x peak); activation checkpointing recomputes
  each layer's forward once more: the layers' 3x forward becomes 4x (about +33% FLOPs, the head excepted).
- communication per rank, ring collectives ((N-1)/N of the tensor per all-gather or reduce-scatter, twice
  that per all-reduce), in units of P elements: DDP all-reduces the fp32 grads once per step (no sync while
  accumulating): 2P. ZeRO-1: reduce-scatter grads + all-gather weights once per step: 2P. ZeRO-2 reduce-scatters
  the grads every micro-batch: (accumulation + 1)P. ZeRO-3 all-gathers the weights in forward and again in
  backward and reduce-scatters the grads, every micro-batch: 3P x accumulation (1.5x DDP at accumulation 1).
  Bandwidth: the inter-node one per GPU when there is more than one node, else the intra-node one.
- offload (PCIe-bound; the CPU Adam's own time is not modelled): each rank's gradient partition goes to the
  CPU every micro-batch (once per step at ZeRO-1) and its updated weight partition comes back once per step;
  at ZeRO-3 the offloaded weight partition also crosses for the forward and the backward gathers.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from dataclasses import dataclass

from data_pipelines.cli import DefaultsHelpFormatter
from roberta_pl.batch_plan import BatchPlanError, parse_duration, plan_batch
from roberta_pl.model import PRESETS, RobertaConfig, mlm_flops_per_token
from roberta_pl.models import masked_lm

GIB = 1024**3
STAGE_NAMES = {0: "DDP (ZeRO-0)", 1: "ZeRO-1", 2: "ZeRO-2", 3: "ZeRO-3"}
DEFAULT_SEQ_LEN = 512  # RoBERTa's; models whose preset is shorter default to their max_seq_len


@dataclass(frozen=True)
class Assumptions:
    """What the time estimate rests on; every field is a command-line flag and is printed with the plan."""

    mfu: float = 0.45  # model FLOPs utilisation of the compute (typical for a well-tuned encoder on H100)
    peak_tflops: float = 989.0  # H100 SXM dense bf16
    intra_node_gbps: float = 300.0  # GB/s per GPU, NVLink/NVSwitch bus bandwidth NCCL reaches on an HGX H100
    inter_node_gbps: float = 40.0  # GB/s per GPU: one 400 Gb/s NIC per GPU at ~80% of line rate
    pcie_gbps: float = 25.0  # GB/s per GPU host<->device with pinned memory (Gen5 x16 shared by two GPUs)

    def describe(self) -> str:
        return (f"MFU {self.mfu:.0%} of {self.peak_tflops:g} TFLOP/s peak (--mfu, --peak-tflops); bandwidth per GPU: "
                f"intra-node {self.intra_node_gbps:g} GB/s (--intra-node-bw), inter-node {self.inter_node_gbps:g} GB/s "
                f"(--inter-node-bw), PCIe {self.pcie_gbps:g} GB/s (--pcie-bw); no compute/communication overlap")


@dataclass
class StageEstimate:
    """Memory and time of one strategy (DDP or a ZeRO stage) at the job's shape."""

    stage: int
    offload: bool
    weights_gib: float
    grads_gib: float
    optimizer_gib: float
    state_gib: float
    activation_gib: float
    total_gib: float
    comm_elements: float  # elements each rank sends per optimizer step, in units of P (ring factor included)
    comm_bytes: float
    compute_seconds: float
    comm_seconds: float
    offload_seconds: float
    step_seconds: float

    @property
    def name(self) -> str:
        return STAGE_NAMES[self.stage] + (" + offload" if self.offload and self.stage else "")


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
    seq_len: int = DEFAULT_SEQ_LEN
    compute_seconds: float = 0.0
    comm_seconds: float = 0.0
    offload_seconds: float = 0.0
    comm_elements: float = 0.0
    recompute_factor: float = 1.0  # hardware FLOPs / useful FLOPs (activation checkpointing's recompute)
    tokens_per_sec_per_gpu: float = 0.0
    measured_throughput: bool = False
    assumptions: Assumptions = dataclasses.field(default_factory=Assumptions)
    stages: dict[int, StageEstimate] = dataclasses.field(default_factory=dict)  # 0..3, same shape and flags


def count_parameters(config: RobertaConfig) -> int:
    import torch

    with torch.device("meta"):
        return masked_lm(config).num_parameters()


def default_seq_len(model: str) -> int:
    """512, or the preset's ``max_seq_len`` when that is shorter (``tiny``: 128), which the trainer accepts."""
    return min(DEFAULT_SEQ_LEN, RobertaConfig.from_name(model).max_seq_len)


def state_bytes(P: int, stage: int, world: int, precision: str = "bf16", offload: bool = False) -> tuple[float, float, float]:
    """``(weights, grads, optimizer)`` bytes per GPU (see the module docstring)."""
    if stage == 0:
        return 4.0 * P, 4.0 * P, 8.0 * P
    if precision == "bf16":
        weights, grads, optimizer = 2.0 * P, 2.0 * P, 12.0 * P
    else:  # fp32: DeepSpeed still keeps its own fp32 master partition beside the model's fp32 weights
        weights, grads, optimizer = 4.0 * P, 4.0 * P, 12.0 * P
    optimizer = 0.0 if offload else optimizer / world
    if stage >= 2:
        grads /= world
    if stage >= 3:
        weights = 0.0 if offload else weights / world
    return weights, grads, optimizer


def comm_elements(stage: int, world: int, accumulation: int) -> float:
    """Elements each rank sends per optimizer step, in units of P (ring collectives)."""
    if world == 1:
        return 0.0
    ring = (world - 1) / world
    per_step = {0: 2.0, 1: 2.0, 2: accumulation + 1.0, 3: 3.0 * accumulation}[stage]
    return per_step * ring


def suggest_shapes(global_batch: int, micro_batch: int, world: int) -> str:
    """One clause naming micro batches that divide ``global_batch`` over ``world`` ranks and the nearest
    global batches that ``micro_batch`` divides."""
    per_pass = micro_batch * world
    below, above = (global_batch // per_pass) * per_pass, (global_batch // per_pass + 1) * per_pass
    nearest = " or ".join(str(g) for g in (below, above) if g > 0)
    parts = []
    if global_batch % world == 0:
        per_rank = global_batch // world
        divisors = [m for m in range(1, per_rank + 1) if per_rank % m == 0]
        smaller = [m for m in divisors if m < micro_batch]
        larger = [m for m in divisors if m > micro_batch]
        picks = ([smaller[-1]] if smaller else []) + ([larger[0]] if larger else [])
        parts.append("or --micro-batch " + " / ".join(
            f"{m} (accumulation {per_rank // m})" for m in picks) + f" with --global-batch {global_batch}")
    else:
        parts.append(f"no micro batch fits: {global_batch} sequences do not split over {world} GPUs")
    return f"nearest global batches for micro {micro_batch}: {nearest}; " + "; ".join(parts)


def _stage(P, stage, world, plan, offload, precision, activations, compute_s, a: Assumptions, nodes) -> StageEstimate:
    offload = offload and stage > 0  # DDP has nothing to offload
    w, g, o = state_bytes(P, stage, world, precision, offload)
    elements = comm_elements(stage, world, plan.accumulation)
    elem_bytes = 4 if stage == 0 or precision == "fp32" else 2  # DDP reduces fp32 grads even under bf16 autocast
    comm_b = elements * P * elem_bytes
    bandwidth = (a.inter_node_gbps if nodes > 1 else a.intra_node_gbps) * 1e9
    comm_s = comm_b / bandwidth
    offload_s = 0.0
    if offload:
        shard = P / world
        pcie = shard * elem_bytes * (1 if stage == 1 else plan.accumulation)  # gradient partition to the CPU
        pcie += shard * elem_bytes  # the updated weight partition back
        if stage == 3:
            pcie += 2 * plan.accumulation * shard * elem_bytes  # offloaded weights fetched for forward and backward
        offload_s = pcie / (a.pcie_gbps * 1e9)
    state = w + g + o
    return StageEstimate(stage, offload, w / GIB, g / GIB, o / GIB, state / GIB, activations / GIB,
                         (state + activations) / GIB, elements, comm_b, compute_s, comm_s, offload_s,
                         compute_s + comm_s + offload_s)


def estimate(model: str, seq_len: int | None, global_batch: int, micro_batch: int, nodes: int, gpus_per_node: int,
             zero_stage: int = 0, offload: bool = False, activation_checkpointing: bool = False,
             tokens_per_sec_per_gpu: float | None = None, mfu: float = Assumptions.mfu,
             peak_tflops: float = Assumptions.peak_tflops, steps: int = 500_000, vocab_size: int | None = None,
             intra_node_gbps: float = Assumptions.intra_node_gbps, inter_node_gbps: float = Assumptions.inter_node_gbps,
             pcie_gbps: float = Assumptions.pcie_gbps, precision: str = "bf16") -> JobEstimate:
    """The numbers behind the printed plan (see the module docstring for the memory and time models).

    Args:
        seq_len: tokens per sequence; None = :func:`default_seq_len` of the model.
        tokens_per_sec_per_gpu: a measured throughput; it replaces the time model (compute and communication).
        precision: ``bf16`` (mixed) or ``fp32``; changes DeepSpeed's state bytes and the bytes communicated.
    Returns:
        The selected strategy's figures, plus ``stages``: the same shape under DDP and ZeRO-1/2/3.
    Raises:
        BatchPlanError: the global batch does not split; the message suggests micro and global batches that do.
    """
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"precision={precision!r}; choose bf16 or fp32")
    seq_len = default_seq_len(model) if seq_len is None else seq_len
    overrides = {"vocab_size": vocab_size} if vocab_size else {}
    config = RobertaConfig.from_name(model, max_seq_len=max(seq_len, 1), **overrides)
    world = nodes * gpus_per_node
    try:
        plan = plan_batch(global_batch, micro_batch, world, seq_len)
    except BatchPlanError as err:
        if global_batch < 1 or micro_batch < 1 or world < 1 or seq_len < 1:
            raise
        raise BatchPlanError(f"{err}; {suggest_shapes(global_batch, micro_batch, world)}") from None
    P = count_parameters(config)
    a = Assumptions(mfu, peak_tflops, intra_node_gbps, inter_node_gbps, pcie_gbps)
    H, L = config.hidden_size, config.num_layers
    per_layer = 34 * micro_batch * seq_len * H
    activations = (2 * micro_batch * seq_len * H * L + per_layer) if activation_checkpointing else per_layer * L
    flops = mlm_flops_per_token(config, seq_len)
    head_flops = mlm_flops_per_token(dataclasses.replace(config, num_layers=0), seq_len)
    hardware_flops = flops + ((flops - head_flops) / 3 if activation_checkpointing else 0.0)  # forward once more
    tokens_per_gpu = plan.tokens_per_step / world
    compute_s = tokens_per_gpu * hardware_flops / (mfu * peak_tflops * 1e12)
    stages = {s: _stage(P, s, world, plan, offload, precision, activations, compute_s, a, nodes) for s in range(4)}
    chosen = stages[zero_stage]
    if tokens_per_sec_per_gpu is None:
        step_seconds = chosen.step_seconds
    else:
        step_seconds = plan.tokens_per_step / (tokens_per_sec_per_gpu * world)
    return JobEstimate(micro_batch, plan.accumulation, world, plan.tokens_per_step, P, chosen.state_gib,
                       chosen.activation_gib, chosen.total_gib, step_seconds, step_seconds * steps / 3600, flops,
                       seq_len, chosen.compute_seconds, chosen.comm_seconds, chosen.offload_seconds,
                       chosen.comm_elements, hardware_flops / flops, plan.tokens_per_step / (step_seconds * world),
                       tokens_per_sec_per_gpu is not None, a, stages)


def budget_buys(e: JobEstimate, seconds: float) -> tuple[int, int]:
    """What a wall-clock budget buys at the estimate's step time (the inverse of ``--steps``).

    Args:
        e: the job's estimate (its ``step_seconds``: the time model, or a measured throughput).
        seconds: the training budget.
    Returns:
        ``(optimizer steps, tokens)``; ``trainer.max_time`` fixes the real count from the rate the run measures.
    """
    steps = int(seconds // e.step_seconds) if e.step_seconds > 0 else 0
    return steps, steps * e.tokens_per_step


def _size(gib: float) -> str:
    """GiB with two decimals, or MiB below 1 GiB (tiny models would print 0.00)."""
    return f"{gib:.2f} GiB" if gib >= 1 else f"{gib * 1024:.1f} MiB"


def _secs(x: float) -> str:
    return "0 s" if x == 0 else f"{x:.3f} s" if x >= 0.01 else f"{x * 1e3:.3f} ms"


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def main(argv: list[str] | None = None) -> None:
    d = Assumptions()
    p = argparse.ArgumentParser(
        prog="roberta-pl-plan",
        description="Size a pretraining job: micro batch, accumulation, tokens per step, memory per GPU under DDP and "
                    "each ZeRO stage, and time to N steps. Example (RoBERTa-base's recipe on 8 nodes of 8 GPUs): "
                    "roberta-pl-plan --model base --global-batch 8192 --micro-batch 32 --nodes 8 --gpus-per-node 8",
        formatter_class=DefaultsHelpFormatter,
    )
    p.add_argument("--model", default="base", choices=list(PRESETS), help="model preset")
    p.add_argument("--seq-len", type=int, help=f"default: {DEFAULT_SEQ_LEN}, or the preset's max_seq_len if shorter")
    p.add_argument("--global-batch", type=int, default=8192, help="sequences per optimizer step")
    p.add_argument("--micro-batch", type=int, default=32, help="sequences per forward pass per GPU")
    p.add_argument("--nodes", type=int, default=1, help="nodes in the job")
    p.add_argument("--gpus-per-node", type=int, default=8, help="GPUs on each node")
    p.add_argument("--zero", type=int, default=0, choices=[0, 1, 2, 3], help="DeepSpeed ZeRO stage (0 = DDP)")
    p.add_argument("--offload", action="store_true", help="offload optimizer state (and stage-3 weights) to CPU")
    p.add_argument("--activation-checkpointing", action="store_true", help="recompute activations in the backward")
    p.add_argument("--precision", default="bf16", choices=["bf16", "fp32"], help="training precision")
    p.add_argument("--vocab-size", type=int, help="default: the preset's (50265 for base/large)")
    p.add_argument("--tokens-per-sec-per-gpu", type=float, help="measured throughput (default: the time model)")
    p.add_argument("--mfu", type=float, default=d.mfu, help="assumed model FLOPs utilisation of the compute")
    p.add_argument("--peak-tflops", type=float, default=d.peak_tflops, help="GPU peak (H100 SXM bf16 dense: 989)")
    p.add_argument("--intra-node-bw", type=float, default=d.intra_node_gbps, help="GB/s per GPU within a node")
    p.add_argument("--inter-node-bw", type=float, default=d.inter_node_gbps, help="GB/s per GPU between nodes")
    p.add_argument("--pcie-bw", type=float, default=d.pcie_gbps, help="GB/s per GPU host<->device (offload)")
    p.add_argument("--gpu-memory-gib", type=float, default=80.0, help="warn above this")
    p.add_argument("--steps", type=int, default=500_000, help="optimizer steps to time")
    p.add_argument("--budget", help="a wall-clock budget (2h, 10m, 00:01:30:00): print the steps and tokens it buys")
    a = p.parse_args(argv)
    try:
        budget = None if a.budget is None else parse_duration(a.budget, "--budget")
        e = estimate(a.model, a.seq_len, a.global_batch, a.micro_batch, a.nodes, a.gpus_per_node, a.zero,
                     a.offload, a.activation_checkpointing, a.tokens_per_sec_per_gpu, a.mfu, a.peak_tflops,
                     a.steps, a.vocab_size, a.intra_node_bw, a.inter_node_bw, a.pcie_bw, a.precision)
    except (BatchPlanError, ValueError) as err:
        sys.exit(f"roberta-pl-plan: error: {err}")
    chosen = e.stages[a.zero]
    gflop = e.flops_per_token / 1e9
    print(f"model {a.model}: {e.params / 1e6:.1f}M parameters, {gflop:.{2 if gflop >= 0.1 else 4}f} GFLOP/token "
          f"(train, sparse head)")
    print(f"global batch {a.global_batch} = micro {e.micro_batch_size} x accumulation {e.accumulation} "
          f"x {_plural(e.world_size, 'GPU')} ({_plural(a.nodes, 'node')} x {a.gpus_per_node})")
    print(f"tokens per step: {a.global_batch} x {e.seq_len} = {e.tokens_per_step:,}")
    print(f"assumptions: {e.assumptions.describe()}; {a.precision}")
    print(f"memory per GPU: {_size(e.total_gib)} = model/optimizer state {_size(e.state_gib)} ({chosen.name}) "
          f"+ activations {_size(e.activation_gib)}")
    if e.measured_throughput:
        print(f"throughput: {e.tokens_per_sec_per_gpu:,.0f} tokens/s per GPU (measured, given) -> "
              f"{e.step_seconds:.2f} s/step, {a.steps:,} steps in {e.total_hours:.1f} h ({e.total_hours / 24:.1f} days)")
    else:
        link = "none" if e.world_size == 1 else ("inter-node" if a.nodes > 1 else "intra-node")
        recompute = f" (x{e.recompute_factor:.2f} FLOPs: activation recompute)" if a.activation_checkpointing else ""
        print(f"step time ({chosen.name}): compute {_secs(e.compute_seconds)}{recompute} + communication "
              f"{_secs(e.comm_seconds)} ({e.comm_elements:.2f} x P elements per rank, {link}) + offload "
              f"{_secs(e.offload_seconds)} (PCIe) = {_secs(e.step_seconds)}")
        print(f"throughput: {e.tokens_per_sec_per_gpu:,.0f} tokens/s per GPU -> {e.step_seconds:.2f} s/step, "
              f"{a.steps:,} steps in {e.total_hours:.1f} h ({e.total_hours / 24:.1f} days)")
    print("per strategy at this shape (per GPU; state = weights + grads + optimizer; total adds activations):")
    print(f"  {'strategy':<22} {'weights':>10} {'grads':>10} {'optimizer':>10} {'state':>10} {'total':>10}  "
          f"{'comm/step':>9}  {'tokens/s/GPU':>12}")
    for s in e.stages.values():
        tps = e.tokens_per_step / (s.step_seconds * e.world_size)
        mark = " <" if s.stage == a.zero else ""
        sizes = " ".join(f"{_size(x):>10}" for x in (s.weights_gib, s.grads_gib, s.optimizer_gib, s.state_gib,
                                                         s.total_gib))
        comm = f"{s.comm_bytes / 1e9:.2f} GB" if s.comm_bytes >= 1e8 else f"{s.comm_bytes / 1e6:.1f} MB"
        print(f"  {s.name:<22} {sizes}  {comm:>9}  {tps:>12,.0f}{mark}")
    if budget is not None:
        steps, tokens = budget_buys(e, budget)
        short = f"{tokens / 1e9:.2f}B" if tokens >= 1e9 else f"{tokens / 1e6:.1f}M"
        print(f"budget {a.budget} buys {steps:,} steps = {tokens:,} tokens ({short}) at {e.step_seconds:.3g} s/step "
              f"({chosen.name}); roberta-pl-train trainer.max_time={a.budget} fixes the exact count from the rate it "
              f"measures in its warm-up")
    if e.total_gib > a.gpu_memory_gib:
        print(f"warning: {e.total_gib:.1f} GiB exceeds {a.gpu_memory_gib:.0f} GiB per GPU: lower --micro-batch "
              f"(accumulation grows), add --activation-checkpointing or a higher --zero stage")


if __name__ == "__main__":
    main()
