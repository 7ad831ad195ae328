"""Training throughput: our ``RobertaForMaskedLM`` against ``transformers.RobertaForMaskedLM``, side by side.

Both models get the same config, the same weights (ours are copied into HF), the same batch of packed token
blocks (no padding, no attention mask), the same 15% masked labels, the same precision (fp32 on CPU, bf16
autocast on CUDA) and the same optimizer (AdamW, ``fused=True`` on CUDA). They run in one process, in
interleaved rounds (the order rotates every round) so that machine noise hits every contender alike.

Usage (from the repository root):

    python bench/train_throughput.py                          # cpu-tiny, the default; about 1-2 min
    python bench/train_throughput.py --case all-gpu           # gpu-base then gpu-large, one process
    python bench/train_throughput.py --case gpu-base --no-compile --micro-batch 32
    python bench/train_throughput.py --case cpu-tiny --compile --eager-too   # compiled and eager ours vs HF

What is measured:
- tokens/s = micro_batch * seq_len * steps / wall time of the timed steps (after ``--warmup`` untimed steps
  per contender); the device is synchronised at the edges of every round, never inside the step.
- peak memory: on CUDA, ``torch.cuda.max_memory_allocated`` over a contender's steps, minus what the other
  contenders keep resident at that moment (their weights, grads and optimizer state, summed exactly); on CPU,
  one subprocess per contender that builds only that model and reports the growth of its resident set
  (``ru_maxrss`` at the end minus RSS before the model was built): weights + grads + AdamW state + activations.
- MFU (CUDA, or with ``--peak-tflops``): tokens/s * ``mlm_flops_per_token(sparse=True)`` / peak bf16 FLOP/s.
  Both contenders are credited with the same useful FLOPs per token; HF's dense head does ~30% more work at
  base size, which is waste, not utilisation.

Results go to ``bench/results/train_throughput_<case>.json`` and the plot ``bench/results/train_throughput.png``
is redrawn from every JSON there (``bench/plot_throughput.py``).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import transformers
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout, installed or not

from roberta_pl.hf import config_to_hf, to_hf_state_dict  # noqa: E402
from roberta_pl.model import (  # noqa: E402
    IGNORE_INDEX,
    RobertaConfig,
    RobertaForMaskedLM,
    mlm_flops_per_token,
)

RESULTS = REPO / "bench" / "results"
MASK_ID = 4  # fairseq/RoBERTa <mask>
MASK_PROB = 0.15


@dataclass(frozen=True)
class Case:
    """One benchmark setting; every field but ``name`` and ``device`` can be overridden on the command line."""

    name: str
    preset: str
    seq_len: int
    micro_batch: int
    device: str  # "cpu" or "cuda"
    steps: int  # timed steps per contender, split over ``rounds``
    warmup: int  # untimed steps per contender before the first round
    rounds: int
    compile: bool = False
    eager_too: bool = False  # with compile: also time eager ours, to show what compile buys
    pad_vocab: int = 1
    activation_checkpointing: bool = False
    shape: tuple[tuple[str, int], ...] = ()  # RobertaConfig fields over the preset's (a shape no preset has)
    fused_adamw: bool = False  # CPU: torch's fused AdamW for every contender (CUDA always uses it)


CASES = {
    # tiny: 2 layers, 128 hidden, 8k vocab. 32 x 128 = 4096 tokens a step; ~1 min for both on 2 cores.
    # 30 rounds of 2 steps: short rounds pair up well on a shared, noisy machine.
    "cpu-tiny": Case("cpu-tiny", "tiny", 128, 32, "cpu", steps=60, warmup=3, rounds=30),
    # The outside side-by-side check of issue 27: 4 layers x 256 hidden (4 heads, FFN 1024), vocab 32000 (small's),
    # seq 128, batch 16 = 2048 tokens a step. One step of each, alternating: 30 pairs.
    "cpu-4x256": Case("cpu-4x256", "small", 128, 16, "cpu", steps=30, warmup=3, rounds=30,
                      shape=(("hidden_size", 256), ("num_layers", 4), ("num_heads", 4), ("intermediate_size", 1024))),
    # base at seq 512: 32 x 512 = 16384 tokens a step (fairseq's RoBERTa reached 8k x 512 per update through
    # accumulation and data parallelism; one micro batch only has to fill the GPU). Vocab 50265 -> 50304.
    "gpu-base": Case("gpu-base", "base", 512, 32, "cuda", steps=60, warmup=8, rounds=6,
                     compile=True, eager_too=True, pad_vocab=64),
    # large at seq 512: 16 x 512 = 8192 tokens a step; HF's dense head alone holds ~2.5 GB of logits here.
    "gpu-large": Case("gpu-large", "large", 512, 16, "cuda", steps=40, warmup=8, rounds=4,
                      compile=True, eager_too=True, pad_vocab=64),
}
GROUPS = {"all-gpu": ["gpu-base", "gpu-large"]}

# Dense bf16 tensor-core peak (no sparsity), by substring of the device name; the first match wins.
PEAK_BF16_FLOPS = [("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
                   ("A100", 312e12), ("L40S", 362e12), ("A10G", 125e12)]


# ----------------------------------------------------------------------------------------------- contenders

@dataclass
class Contender:
    name: str
    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (input_ids, labels) -> scalar loss
    optimizer: torch.optim.Optimizer
    seconds: list[float] = dataclasses.field(default_factory=list)  # one entry per timed round
    cpu_seconds: list[float] = dataclasses.field(default_factory=list)  # the process's CPU time in each round
    steps: list[int] = dataclasses.field(default_factory=list)
    peak_memory: int | None = None
    peak_rss_delta: int | None = None  # CPU only, for reference: resident-set growth of the probe process
    final_loss: float | None = None


def build_config(case: Case) -> RobertaConfig:
    preset = RobertaConfig.from_name(case.preset)
    return RobertaConfig.from_name(case.preset, max_seq_len=max(case.seq_len, preset.max_seq_len),
                                   pad_vocab_multiple=case.pad_vocab,
                                   activation_checkpointing=case.activation_checkpointing, **dict(case.shape))


def build_hf(config: RobertaConfig) -> transformers.RobertaForMaskedLM:
    """HF's model on the same shape, with its default (and fastest) attention: SDPA."""
    hf_config = transformers.RobertaConfig(**{k: v for k, v in config_to_hf(config).items() if k != "architectures"})
    hf_config._attn_implementation = "sdpa"
    return transformers.RobertaForMaskedLM(hf_config)


def copy_weights_into_hf(ours: RobertaForMaskedLM, hf: transformers.RobertaForMaskedLM) -> None:
    result = hf.load_state_dict(to_hf_state_dict(ours), strict=False)
    tied = {"lm_head.decoder.weight", "lm_head.decoder.bias"}  # tied to word embeddings / lm_head.bias in HF
    if set(result.missing_keys) - tied or result.unexpected_keys:
        raise RuntimeError(f"weight copy into HF is incomplete: {result}")


def make_optimizer(model: nn.Module, device: str, fused: bool | None = None) -> torch.optim.Optimizer:
    # RoBERTa's AdamW settings (betas 0.9/0.98, eps 1e-6, wd 0.01); one group, identical for both sides. Fused on
    # CUDA; on CPU torch's default (for-each) unless --fused-adamw (what roberta-pl's build_adamw trains with).
    return torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01,
                             fused=device == "cuda" if fused is None else fused)


def spread(values: list[float]) -> list[float]:
    """Minimum, lower quartile, median, upper quartile and maximum."""
    q = statistics.quantiles(values, n=4, method="inclusive") if len(values) > 1 else values * 3
    return [min(values), q[0], q[1], q[2], max(values)]


def make_batch(config: RobertaConfig, case: Case, device: str, seed: int = 0):
    """Packed FULL-SENTENCES-like blocks: no padding anywhere, <s> first, 15% of the rest masked with <mask>."""
    g = torch.Generator().manual_seed(seed)
    B, T = case.micro_batch, case.seq_len
    ids = torch.randint(5, config.vocab_size, (B, T), generator=g)
    ids[:, 0] = config.bos_token_id
    pick = torch.rand((B, T), generator=g) < MASK_PROB
    pick[:, 0] = False
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[pick] = ids[pick]
    ids[pick] = MASK_ID
    return ids.to(device), labels.to(device)


def contender_names(case: Case, hf_compile: bool = False) -> list[str]:
    """HF first (the baseline), then ours compiled and/or eager."""
    ours = ["ours+compile", "ours"] if case.compile and case.eager_too else ["ours+compile"] if case.compile else ["ours"]
    return ["hf+compile" if hf_compile else "hf", *ours]


def make_contender(name: str, model: nn.Module, device: str, fused: bool | None = None) -> Contender:
    """Wrap a model (already on ``device``, weights set) with its loss call and its own AdamW."""
    if name.endswith("+compile"):
        model.roberta.compile()  # in place: parameter names (state_dict keys) stay as they are
    if name.startswith("hf"):
        loss_fn = lambda ids, labels: model(input_ids=ids, labels=labels).loss  # noqa: E731
    else:
        loss_fn = lambda ids, labels: model(ids, None, labels).loss  # noqa: E731  packed: no attention mask
    return Contender(name, model, loss_fn, make_optimizer(model, device, fused))


# ----------------------------------------------------------------------------------------------- measuring

def autocast(device: str):
    if device == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)  # fp32 on CPU


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def train_step(c: Contender, ids: torch.Tensor, labels: torch.Tensor, device: str) -> torch.Tensor:
    """One optimizer step; returns the loss tensor without reading it (no host sync)."""
    c.optimizer.zero_grad(set_to_none=True)
    with autocast(device):
        loss = c.loss_fn(ids, labels)
    loss.backward()
    c.optimizer.step()
    return loss


def parity_check(ours: RobertaForMaskedLM, hf: nn.Module, ids, labels, device: str) -> dict:
    """Same weights, same batch, dropout off: both losses must agree, or the comparison is meaningless."""
    ours.eval(), hf.eval()
    with torch.no_grad(), autocast(device):
        a = ours(ids, None, labels).loss.float().item()
        b = hf(input_ids=ids, labels=labels).loss.float().item()
    ours.train(), hf.train()
    tol = 1e-4 if device == "cpu" else 3e-2  # bf16 autocast rounds differently in the two graphs
    if abs(a - b) > tol * max(1.0, abs(b)):
        raise RuntimeError(f"parity check failed: ours loss {a:.6f} vs HF {b:.6f}")
    return {"ours_loss": a, "hf_loss": b, "abs_diff": abs(a - b), "tolerance": tol}


def _unique_bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t is None or not isinstance(t, torch.Tensor):
            continue
        key = (t.untyped_storage().data_ptr(), t.device)
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def resident_bytes(c: Contender) -> int:
    """Weights + grads + optimizer state that a contender keeps between steps."""
    params = list(c.model.parameters())
    state = [v for s in c.optimizer.state.values() for v in s.values()]
    return _unique_bytes(params + [p.grad for p in params] + state)


def run_round(c: Contender, contenders: list[Contender], ids, labels, steps: int, device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        others = sum(resident_bytes(o) for o in contenders if o is not c)
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(steps):
        loss = train_step(c, ids, labels, device)
    sync(device)
    c.seconds.append(time.perf_counter() - t0)
    c.cpu_seconds.append(time.process_time() - cpu0)
    c.steps.append(steps)
    c.final_loss = loss.float().item()  # outside the timed region
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated() - others
        c.peak_memory = max(c.peak_memory or 0, peak)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_allocated(prof) -> int:
    """Highest ``total_allocated`` the CPU allocator reported while the profiler ran: tensor bytes only,
    counting allocations made under the profiler (so start it before the model exists)."""
    from torch._C._profiler import _EventType

    peak, stack = 0, list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            peak = max(peak, e.extra_fields.total_allocated)
        stack.extend(e.children)
    return peak


def probe_memory(case: Case, name: str, device: str) -> dict:
    """Child-process side of the CPU memory measurement: build one contender and train a few steps under
    ``torch.profiler(profile_memory=True)``, so every tensor byte (weights, grads, AdamW state, activations,
    the logits) passes through the allocator's books; also report the resident-set growth for reference."""
    config = build_config(case)
    ids, labels = make_batch(config, case, device)
    baseline = _rss_bytes()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.manual_seed(0)
        model = build_hf(config) if name.startswith("hf") else RobertaForMaskedLM(config)  # nothing else resident
        c = make_contender(name, model, device, device == "cuda" or case.fused_adamw)
        for _ in range(2):  # the first step allocates AdamW state, the second frees the first step's grads
            train_step(c, ids, labels, device)
    rss_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {"name": name, "peak_allocated": _peak_allocated(prof), "peak_rss_delta": rss_peak - baseline}


def measure_cpu_memory(case: Case, names: list[str]) -> dict[str, dict]:
    """One fresh process per contender, so that nothing of another model is on the books."""
    out = {}
    for name in names:
        cmd = [sys.executable, __file__, "--case", case.name, "--device", "cpu", "--probe-memory", name,
               *case_overrides_argv(case)]
        res = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if res.returncode != 0:
            raise RuntimeError(f"memory probe for {name} failed:\n{res.stderr[-3000:]}")
        out[name] = json.loads(res.stdout.strip().splitlines()[-1])
    return out


def case_overrides_argv(case: Case) -> list[str]:
    """The command-line flags that reproduce ``case`` (for the memory-probe subprocesses)."""
    argv = ["--preset", case.preset, "--micro-batch", str(case.micro_batch), "--seq-len", str(case.seq_len), "--warmup", str(case.warmup),
            "--pad-vocab", str(case.pad_vocab), "--compile" if case.compile else "--no-compile"]
    if case.eager_too:
        argv.append("--eager-too")
    if case.activation_checkpointing:
        argv.append("--activation-checkpointing")
    if case.fused_adamw:
        argv.append("--fused-adamw")
    return argv


def device_description(device: str) -> dict:
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        return {"type": "cuda", "name": torch.cuda.get_device_name(0), "memory_bytes": props.total_memory,
                "cuda": torch.version.cuda, "count": torch.cuda.device_count()}
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"type": "cpu", "name": cpu, "threads": torch.get_num_threads(), "cores": os.cpu_count()}


def peak_flops(device: str, override_tflops: float | None) -> float | None:
    if override_tflops:
        return override_tflops * 1e12
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name(0)
    return next((flops for key, flops in PEAK_BF16_FLOPS if key in name), None)


# ----------------------------------------------------------------------------------------------- one case

def run_case(case: Case, args) -> dict:
    device = case.device
    load_before = os.getloadavg()
    config = build_config(case)
    ids, labels = make_batch(config, case, device)
    names = contender_names(case, args.hf_compile)

    torch.manual_seed(0)
    ours = RobertaForMaskedLM(config)
    hf = build_hf(config)
    copy_weights_into_hf(ours, hf)
    ours.to(device), hf.to(device)
    parity = parity_check(ours, hf, ids, labels, device)
    # Copies first (deepcopy keeps the decoder tied to the embeddings), compile after.
    ours_models = [ours] + [copy.deepcopy(ours) for _ in names[2:]]
    fused = device == "cuda" or case.fused_adamw
    contenders = [make_contender(names[0], hf, device, fused)]
    contenders += [make_contender(n, m, device, fused) for n, m in zip(names[1:], ours_models)]
    del ours, hf, ours_models

    if device == "cpu":
        memory = measure_cpu_memory(case, [c.name for c in contenders])
        for c in contenders:
            c.peak_memory, c.peak_rss_delta = memory[c.name]["peak_allocated"], memory[c.name]["peak_rss_delta"]

    for c in contenders:  # warm-up: compile, autotune, allocator growth, AdamW state
        for _ in range(case.warmup):
            train_step(c, ids, labels, device)
    sync(device)

    per_round = [case.steps // case.rounds + (r < case.steps % case.rounds) for r in range(case.rounds)]
    for r, steps in enumerate(s for s in per_round if s > 0):
        order = contenders[r % len(contenders):] + contenders[: r % len(contenders)]  # rotate who goes first
        for c in order:
            run_round(c, contenders, ids, labels, steps, device)

    tokens_per_step = case.micro_batch * case.seq_len
    flops_tok = mlm_flops_per_token(config, case.seq_len, MASK_PROB, sparse=True)
    peak = peak_flops(device, args.peak_tflops)
    results = {}
    for c in contenders:
        tps = tokens_per_step * sum(c.steps) / sum(c.seconds)
        round_tps = [tokens_per_step * n / s for n, s in zip(c.steps, c.seconds)]
        results[c.name] = {
            "tokens_per_s": tps,
            "tokens_per_s_rounds": round_tps,
            "step_ms": 1e3 * sum(c.seconds) / sum(c.steps),
            "cpu_ms_per_step": 1e3 * sum(c.cpu_seconds) / sum(c.steps),  # the process's CPU time (all threads)
            "timed_steps": sum(c.steps),
            "peak_memory_bytes": c.peak_memory,
            "peak_rss_delta_bytes": c.peak_rss_delta,
            "mfu": tps * flops_tok / peak if peak else None,
            "final_loss": c.final_loss,
            "parameters": sum(p.numel() for p in c.model.parameters()),
        }
    hf_name, by_name = contenders[0].name, {c.name: c for c in contenders}
    for name, r in results.items():
        r["speedup_vs_hf"] = r["tokens_per_s"] / results[hf_name]["tokens_per_s"]
        # Round r of every contender ran back to back, so per-round ratios cancel slow drifts of the machine.
        paired = [a / b for a, b in zip(r["tokens_per_s_rounds"], results[hf_name]["tokens_per_s_rounds"])]
        r["speedup_vs_hf_median_round"] = statistics.median(paired)
        r["speedup_vs_hf_round_spread"] = spread(paired)  # min, quartiles, max of the per-round ratios
        # CPU time: what the steps cost whatever else runs (with one thread; more threads add their spin-waits).
        c_ours, c_hf = by_name[name].cpu_seconds, by_name[hf_name].cpu_seconds
        cpu_paired = [b / a for a, b in zip(c_ours, c_hf)]
        r["speedup_vs_hf_cpu_time_median_round"] = statistics.median(cpu_paired)
        r["speedup_vs_hf_cpu_time_spread"] = spread(cpu_paired)
        r["memory_vs_hf"] = r["peak_memory_bytes"] / results[hf_name]["peak_memory_bytes"]

    record = {
        "case": case.name,
        "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device_description(device),
        "load_average": {"before": load_before, "after": os.getloadavg()},  # 1/5/15-min: others on the machine
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
        "settings": {**dataclasses.asdict(case), "precision": "bf16-autocast" if device == "cuda" else "fp32",
                     "optimizer": f"AdamW(lr=1e-4, betas=(0.9, 0.98), eps=1e-6, wd=0.01, fused={fused})",
                     "torch_threads": torch.get_num_threads(),
                     "mask_prob": MASK_PROB, "tokens_per_step": tokens_per_step,
                     "hf_attention": "sdpa", "hf_compile": args.hf_compile, "attention_mask": None},
        "config": config.to_dict(),
        "flops_per_token": {"sparse_head": flops_tok,
                            "dense_head": mlm_flops_per_token(config, case.seq_len, MASK_PROB, sparse=False)},
        "peak_flops": peak,
        "memory_method": ("torch.cuda.max_memory_allocated over the contender's rounds minus the other "
                          "contenders' resident weights/grads/optimizer state" if device == "cuda" else
                          "separate subprocess per contender that builds only that model and trains 2 steps "
                          "under torch.profiler(profile_memory=True): peak bytes held by the CPU allocator"),
        "parity": parity,
        "hf": hf_name,
        "results": results,
    }
    for c in contenders:  # free device memory before the next case
        c.model = c.optimizer = c.loss_fn = None
    if device == "cuda":
        torch.cuda.empty_cache()
    return record


def print_table(record: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    s, d = record["settings"], record["device"]
    title = (f"{record['case']}: {s['preset']} seq {s['seq_len']} x micro batch {s['micro_batch']}, "
             f"{s['precision']}, {d['name']}")
    table = Table(title=title)
    table.add_column("model", no_wrap=True)
    for col in ("tokens/s", "x HF", "x HF median round [IQR]", "x HF CPU time", "step ms", "peak mem (MiB)",
                "mem / HF", "MFU", "final loss"):
        table.add_column(col, justify="right")
    for name, r in record["results"].items():
        table.add_row(name, f"{r['tokens_per_s']:,.0f}", f"{r['speedup_vs_hf']:.2f}",
                      f"{r['speedup_vs_hf_median_round']:.2f} [{r['speedup_vs_hf_round_spread'][1]:.2f}-"
                      f"{r['speedup_vs_hf_round_spread'][3]:.2f}]", f"{r['speedup_vs_hf_cpu_time_median_round']:.2f}",
                      f"{r['step_ms']:.1f}",
                      f"{r['peak_memory_bytes'] / 2**20:,.0f}", f"{r['memory_vs_hf']:.2f}",
                      f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-", f"{r['final_loss']:.3f}")
    console = Console(width=max(130, shutil.get_terminal_size().columns))
    console.print(table)
    p = record["parity"]
    console.print(f"parity (eval, same weights): ours loss {p['ours_loss']:.5f}, HF {p['hf_loss']:.5f}; "
                    f"memory: {record['memory_method']}")


# ----------------------------------------------------------------------------------------------- entry

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", default="cpu-tiny", choices=[*CASES, *GROUPS])
    p.add_argument("--steps", type=int, help="timed steps per contender (split over the rounds)")
    p.add_argument("--warmup", type=int, help="untimed steps per contender before timing")
    p.add_argument("--rounds", type=int, help="interleaved rounds")
    p.add_argument("--preset", choices=["tiny", "small", "base", "large"], help="override the case's model size")
    p.add_argument("--micro-batch", type=int)
    p.add_argument("--seq-len", type=int)
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile our encoder (default: on for GPU cases)")
    p.add_argument("--eager-too", action=argparse.BooleanOptionalAction, default=None,
                   help="with --compile, also time eager ours")
    p.add_argument("--pad-vocab", type=int, help="pad our vocab to this multiple (1 = none)")
    p.add_argument("--activation-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--fused-adamw", action=argparse.BooleanOptionalAction, default=None,
                   help="CPU: torch's fused AdamW for every contender (default: for-each, as torch and HF default)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's own, one per core)")
    p.add_argument("--hf-compile", action="store_true", help="also torch.compile HF's encoder (off: HF as shipped)")
    p.add_argument("--peak-tflops", type=float, help="peak bf16 TFLOP/s for MFU (default: from the device name)")
    p.add_argument("--device", choices=["cpu", "cuda"], help="override the case's device (for smoke tests)")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--probe-memory", metavar="CONTENDER", help=argparse.SUPPRESS)  # internal: CPU memory child
    return p.parse_args(argv)


def resolve_case(name: str, args) -> Case:
    case = CASES[name]
    overrides = {"preset": args.preset, "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "micro_batch": args.micro_batch,
                 "seq_len": args.seq_len, "compile": args.compile, "eager_too": args.eager_too,
                 "pad_vocab": args.pad_vocab, "activation_checkpointing": args.activation_checkpointing,
                 "device": args.device, "fused_adamw": args.fused_adamw}
    case = dataclasses.replace(case, **{k: v for k, v in overrides.items() if v is not None})
    if case.rounds > case.steps:
        case = dataclasses.replace(case, rounds=max(1, case.steps))
    if case.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"case {name} needs a CUDA GPU (none visible); pass --device cpu for a smoke run")
    return case


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    names = GROUPS.get(args.case, [args.case])
    if args.probe_memory:
        print(json.dumps(probe_memory(resolve_case(names[0], args), args.probe_memory, "cpu")))
        return []
    if any(CASES[n].device == "cuda" for n in names) and (args.device or "cuda") == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # only fp32 leftovers outside autocast; same for both
        torch.backends.cudnn.allow_tf32 = True
    if args.threads:
        torch.set_num_threads(args.threads)
    records = []
    args.out_dir.mkdir(parents=True, exist_ok=True)
    failed = []
    for name in names:
        case = resolve_case(name, args)
        try:
            record = run_case(case, args)
        except Exception:  # e.g. an OOM in one case of all-gpu: keep the other case's figures
            if len(names) == 1:
                raise
            traceback.print_exc()
            failed.append(name)
            if case.device == "cuda":
                torch.cuda.empty_cache()
            continue
        # Smoke runs on another device or model size keep out of the way of the real figures.
        moved = "" if case.device == CASES[name].device else f"-on-{case.device}"
        moved += "" if case.preset == CASES[name].preset else f"-{case.preset}"
        moved += "-fused-adamw" if case.fused_adamw and not CASES[name].fused_adamw else ""
        path = args.out_dir / f"train_throughput_{case.name}{moved}.json"
        path.write_text(json.dumps(record, indent=2) + "\n")
        print_table(record)
        print(f"wrote {path}")
        records.append(record)
    if not args.no_plot:
        sys.path.insert(0, str(Path(__file__).parent))
        from plot_throughput import plot

        print(f"wrote {plot(args.out_dir)}")
    if failed:
        raise SystemExit(f"failed cases: {failed}")
    return records


if __name__ == "__main__":
    main()
