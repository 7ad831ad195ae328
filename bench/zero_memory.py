"""Memory per rank under DDP, ZeRO-2 and ZeRO-3, measured on 2 CPU ranks (gloo, fp32), beside roberta-pl-plan's prediction.

Usage (from the repository root):

    python bench/zero_memory.py                 # small (29.6M parameters), seq 128, 3 steps; about 2-3 min on 2 cores
    python bench/zero_memory.py --model base    # 125M parameters; slower
    python bench/zero_memory.py --quick         # tiny, 2 steps (the smoke test's setting)

Each strategy runs in its own pair of processes (a real Lightning job: ``ZeroStrategy`` with the project's own
DeepSpeed config from ``roberta_pl.trainer.deepspeed_config``, ``DS_ACCELERATOR=cpu``, gloo; Lightning's DDP for
``ddp``), from the same seed, on random pre-masked batches. At the last optimizer step, after the backward and
before the update (``on_before_optimizer_step``: gradients and Adam's m and v all alive), every rank measures:

- **tensor accounting** (the headline figure): the bytes of the distinct storages it holds, walked from the model
  (each parameter, or its ZeRO-3 shard ``ds_tensor``), the gradients (``.grad``, DeepSpeed's partitioned
  gradient buffers), the optimizer (torch AdamW's state, DeepSpeed's fp32 partitions) and every other tensor
  reachable from DeepSpeed's ZeRO optimizer object (its reduce buckets and scratch buffers, counted apart);
  each storage is counted once, in the first category that reaches it;
- **allocator**: ``torch.profiler(profile_memory=True)`` runs from before the model is built; the CPU allocator's
  running total at the measurement point (read from a marker allocation) and its peak over the job, which also
  include activations, the batch and DeepSpeed's communication buckets. RSS is not used: allocator slack,
  library pages and untouched ``torch.empty`` pages make it noise at this size.

The prediction is ``roberta_pl.cli.plan.estimate(..., precision="fp32")`` for the same model, sequence length,
batch and 2 ranks: the ZeRO paper's accounting (weights + grads + Adam m and v, divided by the ranks where the
stage shards them). Results: a table on stdout and ``bench/results/zero_memory.json`` (other models:
``zero_memory_<model>.json``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout, installed or not

RESULTS = REPO / "bench" / "results"
WORLD = 2
MARKER = 7_654_321  # bytes of a marker allocation whose profiler event gives the allocator total at the measurement
MIB = 2**20
CATEGORIES = ("weights", "grads", "optimizer", "buffers", "other")


# ------------------------------------------------------------------------------------------ rank side (child)

def _tensors(obj, depth=0, seen=None):
    """(attribute path, tensor) pairs reachable from a DeepSpeed object through attributes, lists, tuples, dicts."""
    import torch

    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 4:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield "", obj
        return
    if isinstance(obj, (torch.nn.Module, torch.optim.Optimizer)):
        return  # reached through the model and the optimizer categories
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple, set)):
        items = enumerate(obj)
    elif type(obj).__module__.startswith("deepspeed") and hasattr(obj, "__dict__"):
        items = vars(obj).items()
    else:
        return
    for key, value in items:
        for path, t in _tensors(value, depth + 1, seen):
            yield f"{key}.{path}" if path else str(key), t


def account(module, trainer) -> dict:
    """Bytes of the distinct CPU storages this rank holds, by category (see the module docstring)."""
    import torch

    totals: dict[str, int] = defaultdict(int)
    counted: set[int] = set()
    detail: dict[str, int] = defaultdict(int)

    def add(category, t, where):
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu":
            return
        storage = t.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in counted:
            return
        counted.add(storage.data_ptr())
        totals[category] += storage.nbytes()
        detail[where] += storage.nbytes()

    params = list(module.model.parameters())
    for p in params:
        add("weights", getattr(p, "ds_tensor", None), "param.ds_tensor (ZeRO-3 shard)")
        add("weights", p.data, "param")
    for p in params:
        add("grads", p.grad, "param.grad")
    engine = getattr(trainer.strategy, "deepspeed_engine", None)
    zero_opt = engine.optimizer if engine is not None else None
    basic = engine.basic_optimizer if engine is not None else trainer.optimizers[0]
    for state in basic.state.values():
        for name, t in state.items():
            add("optimizer", t, f"AdamW state {name}")
    for group in basic.param_groups:
        for p in group["params"]:
            add("optimizer", p, "optimizer's fp32 partition (master)")
            add("grads", p.grad, "optimizer's fp32 partition .grad")
    if zero_opt is not None and zero_opt is not basic:
        for path, t in _tensors(zero_opt):
            low = path.lower()
            category = ("buffers" if any(k in low for k in ("ipg", "bucket")) else
                        "grads" if "grad" in low else  # e.g. grad_partitions_flat_buffer, all_grad_tensors
                        "optimizer" if any(k in low for k in ("fp32", "master", "optimizer")) else
                        "buffers" if any(k in low for k in ("buffer", "temp", "scratch")) else "other")
            add(category, t, f"{type(zero_opt).__name__}.{path.split('.')[0]}")
    return {"bytes": {c: totals.get(c, 0) for c in CATEGORIES}, "by_source": dict(detail)}


def _allocator_figures(prof) -> dict:
    """Allocator total at the marker allocation (minus the marker) and the peak over the profiled job."""
    from torch._C._profiler import _EventType

    peak, at_marker = 0, None
    stack = list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        e = stack.pop()
        if e.tag == _EventType.Allocation and e.extra_fields.device.type == "cpu":
            peak = max(peak, e.extra_fields.total_allocated)
            if e.extra_fields.alloc_size == MARKER:
                at_marker = e.extra_fields.total_allocated - MARKER
        stack.extend(e.children)
    return {"allocator_at_step": at_marker, "allocator_peak": peak}


def run_rank(args) -> None:
    """One strategy on this rank (Lightning re-runs this command for rank 1)."""
    import lightning.pytorch as pl
    import torch
    from omegaconf import OmegaConf
    from torch.utils.data import DataLoader, Dataset

    from roberta_pl.batch_plan import plan_batch
    from roberta_pl.model import RobertaConfig
    from roberta_pl.pretraining.module import MaskedLMModule
    from roberta_pl.strategies import ZeroStrategy
    from roberta_pl.trainer import deepspeed_config

    plan = plan_batch(args.global_batch, args.micro_batch, WORLD, args.seq_len)
    config = RobertaConfig.from_name(args.model, max_seq_len=args.seq_len)  # as roberta-pl-plan counts it

    class Rows(Dataset):
        def __init__(self, n):
            g = torch.Generator().manual_seed(1)
            self.ids = torch.randint(5, config.vocab_size, (n, args.seq_len), generator=g)
            self.labels = torch.where(torch.rand(n, args.seq_len, generator=g) < 0.15, self.ids, -100)

        def __len__(self):
            return len(self.ids)

        def __getitem__(self, i):
            return {"input_ids": self.ids[i], "labels": self.labels[i]}

    class Data(pl.LightningDataModule):
        def train_dataloader(self):
            return DataLoader(Rows(plan.micro_batch_size * plan.accumulation * args.steps), batch_size=args.micro_batch)

    measured: dict = {}

    class Measure(pl.Callback):
        def on_before_optimizer_step(self, trainer, module, optimizer):
            if trainer.global_step == args.steps - 1 and not measured:  # step 2+: Adam's m and v exist
                measured.update(account(module, trainer))
                measured["marker"] = torch.empty(MARKER, dtype=torch.uint8)  # its event carries the allocator total

    if args.run == "ddp":
        strategy = "ddp"
    else:
        cfg = OmegaConf.create({"trainer": {"deepspeed": {"stage": int(args.run[4]), "offload_optimizer": False,
                                                          "offload_parameters": False}}})
        strategy = ZeroStrategy(config=deepspeed_config(cfg, plan))  # the project's own DeepSpeed config
    started = time.monotonic()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        torch.manual_seed(0)
        module = MaskedLMModule(model=config.to_dict(), optim=dict(lr=1e-4, betas=[0.9, 0.98], eps=1e-6,
                                                                   weight_decay=0.01, warmup_steps=0, decay="linear"),
                                max_steps=args.steps, seq_len=args.seq_len, micro_batch_size=args.micro_batch)
        trainer = pl.Trainer(accelerator="cpu", devices=WORLD, strategy=strategy, precision="32-true",
                             max_steps=args.steps, accumulate_grad_batches=plan.accumulation, logger=False,
                             enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                             use_distributed_sampler=False, callbacks=[Measure()])
        trainer.fit(module, datamodule=Data())
    measured.pop("marker", None)
    engine = getattr(trainer.strategy, "deepspeed_engine", None)
    result = {"strategy": args.run, "rank": trainer.global_rank, "params": module.model.num_parameters(),
              "zero_stage": engine.zero_optimization_stage() if engine is not None else 0,
              "zero_optimizer": type(engine.optimizer).__name__ if engine is not None else None,
              "fit_seconds": round(time.monotonic() - started, 1), **measured, **_allocator_figures(prof)}
    Path(args.child_out, f"{args.run}-rank{trainer.global_rank}.json").write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------- driver (parent)

def predict(args, stage: int) -> dict:
    from roberta_pl.cli.plan import GIB, estimate

    e = estimate(args.model, args.seq_len, args.global_batch, args.micro_batch, nodes=1, gpus_per_node=WORLD,
                 zero_stage=stage, precision="fp32")
    s = e.stages[stage]
    return {"weights": s.weights_gib * GIB, "grads": s.grads_gib * GIB, "optimizer": s.optimizer_gib * GIB,
            "state": s.state_gib * GIB, "activations": s.activation_gib * GIB, "params": e.params}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="small", choices=["tiny", "small", "base"])
    p.add_argument("--seq-len", type=int, default=128, help="state does not depend on it; activations do")
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--global-batch", type=int, default=8, help="2 ranks x micro 2 x accumulation 2")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--strategies", default="ddp,zero2,zero3")
    p.add_argument("--quick", action="store_true", help="tiny, seq 32, 2 steps: the smoke-test setting")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--run", help=argparse.SUPPRESS)  # child mode: one strategy on this rank
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.seq_len, args.steps = "tiny", 32, 2
    if args.run:
        run_rank(args)
        return 0

    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    names = args.strategies.split(",")
    ranks: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="zero-memory-") as tmp:
        for name in names:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--run", name, "--child-out", tmp,
                   "--model", args.model, "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch),
                   "--global-batch", str(args.global_batch), "--steps", str(args.steps)]
            started = time.monotonic()
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
            if proc.returncode:
                sys.stderr.write(proc.stderr[-4000:])
                print(f"{name}: failed (exit {proc.returncode})", file=sys.stderr)
                return 1
            ranks[name] = [json.loads(Path(tmp, f"{name}-rank{r}.json").read_text()) for r in range(WORLD)]
            print(f"{name}: {time.monotonic() - started:.0f} s", file=sys.stderr)

    rows = []
    for name in names:
        stage = 0 if name == "ddp" else int(name[4])
        pred = predict(args, stage)
        per_rank = ranks[name]
        measured = {c: max(r["bytes"][c] for r in per_rank) for c in CATEGORIES}  # the fuller rank
        state = measured["weights"] + measured["grads"] + measured["optimizer"]
        by_rank = [r["bytes"]["weights"] + r["bytes"]["grads"] + r["bytes"]["optimizer"] for r in per_rank]
        rows.append({"strategy": name, "stage": stage, "zero_optimizer": per_rank[0]["zero_optimizer"],
                     "measured_state_bytes_by_rank": by_rank,
                     "measured_state_bytes": state, "measured_bytes": measured,
                     "predicted_state_bytes": pred["state"], "predicted": pred,
                     "allocator_at_step_bytes": max(r["allocator_at_step"] or 0 for r in per_rank),
                     "allocator_peak_bytes": max(r["allocator_peak"] for r in per_rank),
                     "ranks": per_rank})
    ddp = next((r for r in rows if r["stage"] == 0), rows[0])
    header = (f"{'strategy':<8} {'weights':>9} {'grads':>9} {'optim':>9} {'state':>9} {'rank0/rank1':>13} "
              f"{'predicted':>9} {'meas/pred':>9} {'vs DDP':>7} {'buffers':>9} {'alloc@step':>10} {'alloc peak':>10}")
    print(f"\n{args.model} ({ddp['ranks'][0]['params'] / 1e6:.1f}M parameters), {WORLD} CPU ranks (gloo), fp32, "
          f"seq {args.seq_len}, micro {args.micro_batch}, global {args.global_batch}; MiB per rank (the fuller rank)")
    print(header)
    for r in rows:
        m = r["measured_bytes"]
        print(f"{r['strategy']:<8} {m['weights'] / MIB:>9.1f} {m['grads'] / MIB:>9.1f} {m['optimizer'] / MIB:>9.1f} "
              f"{r['measured_state_bytes'] / MIB:>9.1f} "
              f"{'/'.join(f'{b / MIB:.1f}' for b in r['measured_state_bytes_by_rank']):>13} "
              f"{r['predicted_state_bytes'] / MIB:>9.1f} "
              f"{r['measured_state_bytes'] / r['predicted_state_bytes']:>9.2f} "
              f"{r['measured_state_bytes'] / ddp['measured_state_bytes']:>7.2f} {m['buffers'] / MIB:>9.1f} "
              f"{r['allocator_at_step_bytes'] / MIB:>10.1f} {r['allocator_peak_bytes'] / MIB:>10.1f}")
    import torch

    out = {"bench": "zero_memory", "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "device": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                      "ranks": WORLD, "threads_per_rank": 1},
           "versions": {"python": platform.python_version(), "torch": torch.__version__,
                        "deepspeed": _version("deepspeed"), "lightning": _version("lightning")},
           "settings": {k: getattr(args, k) for k in ("model", "seq_len", "micro_batch", "global_batch", "steps")},
           "precision": "32-true",
           "measurement": "tensor accounting at on_before_optimizer_step of the last step (distinct storages reachable "
                          "from the model, the optimizer and DeepSpeed's ZeRO optimizer); allocator figures from "
                          "torch.profiler(profile_memory=True)",
           "rows": rows}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / ("zero_memory.json" if args.model == "small" else f"zero_memory_{args.model}.json")
    path.write_text(json.dumps(out, indent=1))
    print(f"wrote {path}")
    return 0


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    sys.exit(main())
