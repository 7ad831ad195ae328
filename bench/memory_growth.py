"""Does a training run's memory stay flat? RSS of a real ``roberta-pl-train`` process (and of its DataLoader workers)
sampled by optimizer step over a few thousand steps.

Usage (from the repository root; each case is one training subprocess, a few minutes on 2 cores):

    python bench/memory_growth.py                               # tiny model, embedded corpus, 3,000 steps, csv and none
    python bench/memory_growth.py --steps 1200 --loggers none   # one logger
    python bench/memory_growth.py --malloc-default              # also a run with glibc's own thresholds
    python bench/memory_growth.py --tracemalloc 200,2000        # print the Python allocations that grew between steps

Each case runs ``python -m roberta_pl.pretraining.app`` on the embedded default corpus (built once under ``data.cache_dir``)
with the tiny model at micro-batch 16 (global batch 16: one micro-batch a step), validation and checkpoints on their
usual schedule, and :class:`RssProbe` added through ``trainer.callbacks``: every ``--every`` optimizer steps it
reads VmRSS of the trainer process and of each of its child processes (DataLoader workers) from ``/proc``. With
``--tracemalloc A,B`` the probe also starts ``tracemalloc`` before step A and prints the top growth by traceback
between steps A and B (``tracemalloc`` slows the run; its RSS figures are not the ones to compare).

Summary per case: RSS after the warm-up (``--warmup`` steps, default 500: the shuffle buffer, the allocator's pools
and the optimizer state are in place by then), at the end, growth in % and MiB per 1,000 steps, for the trainer, the
workers and both. Results: a table on stdout and ``bench/results/memory_growth.json``.
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
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
MIB = 2**20


# ---------------------------------------------------------------------------------- the probe (in the trainer)

def _vm_rss(pid: int) -> int | None:
    """VmRSS of ``pid`` in bytes (None once it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _footprint(pid: int) -> dict[str, int] | None:
    """``{"rss", "pss", "uss"}`` of ``pid`` in bytes from ``/proc/<pid>/smaps_rollup`` (None once it has exited).

    RSS counts every page the process maps, including the copy-on-write pages a forked DataLoader worker still
    shares with the trainer, so summing the RSS of a trainer and its workers counts those pages twice or more;
    PSS divides each shared page among its sharers (their sum is the tree's real footprint), USS is the private part.
    """
    fields = {"Rss:": "rss", "Pss:": "pss", "Private_Clean:": "uss", "Private_Dirty:": "uss"}
    out = {"rss": 0, "pss": 0, "uss": 0}
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                key = line.split(None, 1)[0]
                if key in fields:
                    out[fields[key]] += int(line.split()[1]) * 1024
    except OSError:
        return None
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")[:120].strip()
    except OSError:
        return ""


def _children(pid: int) -> list[int]:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as fh:
            return [int(c) for c in fh.read().split()]
    except OSError:
        return []


try:
    import lightning.pytorch as _pl

    _Callback = _pl.Callback
except ImportError:  # the driver side needs no Lightning
    _Callback = object


class RssProbe(_Callback):
    """Appends ``{"step", "time", "rss", "workers"}`` (bytes; workers by pid) to ``path`` as JSON lines every
    ``every`` optimizer steps; with ``trace`` ``[A, B]``, prints the Python allocations that grew from step A to B."""

    def __init__(self, path: str, every: int = 50, trace: list[int] | None = None, top: int = 15,
                 trim_every: int = 0) -> None:
        self.path, self.every, self.trace, self.top = Path(path), int(every), list(trace or []), int(top)
        self.trim_every = int(trim_every)  # > 0: glibc malloc_trim(0) every N steps (the fix under test)
        self._seen = -1
        self._snapshot = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._seen:
            return
        self._seen = step
        if self.trim_every and step % self.trim_every == 0:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        if step % self.every == 0:
            import resource

            pid = os.getpid()
            record = {"step": step, "time": time.time(), "rss": _vm_rss(pid), "self": _footprint(pid),
                      "minflt": resource.getrusage(resource.RUSAGE_SELF).ru_minflt,
                      "workers": {c: _footprint(c) for c in _children(pid)},
                      "commands": {c: _cmdline(c) for c in _children(pid)}}
            with self.path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
        if self.trace:
            self._trace(step)

    def _trace(self, step: int) -> None:
        import gc
        import tracemalloc

        first, last = self.trace
        if step == first - 10:
            tracemalloc.start(12)
        elif step == first:
            gc.collect()
            self._snapshot = tracemalloc.take_snapshot()
        elif step == last and self._snapshot is not None:
            gc.collect()
            now = tracemalloc.take_snapshot()
            filters = [tracemalloc.Filter(False, tracemalloc.__file__)]
            diff = now.filter_traces(filters).compare_to(self._snapshot.filter_traces(filters), "traceback")
            grown = sum(d.size_diff for d in diff)
            print(f"[tracemalloc] steps {first}->{last}: traced Python allocations {grown / MIB:+.2f} MiB "
                  f"(now {sum(s.size for s in now.statistics('filename')) / MIB:.1f} MiB)", flush=True)
            for d in diff[: self.top]:
                print(f"[tracemalloc] {d.size_diff / 1024:+9.1f} KiB {d.count_diff:+7d} blocks", flush=True)
                for frame in d.traceback.format()[-8:]:
                    print(f"[tracemalloc]     {frame}", flush=True)
            tracemalloc.stop()
            self._snapshot = None


# ------------------------------------------------------------------------------------------------ the driver

def run_case(name: str, logger: str, steps: int, every: int, workers: int | None, malloc_default: bool,
             trace: list[int] | None, extra: list[str], work: Path, trim_every: int = 0) -> dict:
    """One training subprocess; returns its series and summary."""
    run_dir = work / name
    samples = work / f"{name}.jsonl"
    probe = "{_target_:memory_growth.RssProbe,path:'%s',every:%d,trim_every:%d%s}" % (
        samples, every, trim_every, f",trace:[{trace[0]},{trace[1]}]" if trace else "")
    overrides = [
        f"run_dir={run_dir}", "resume=never", f"logger={logger}", "model=tiny", "batch.global_batch_size=16",
        "batch.micro_batch_size=16", "batch.seq_len=128", f"trainer.max_steps={steps}", "trainer.enable_progress_bar=true",
        "export_hf=false", "fill_mask=[]", f"trainer.callbacks=[{probe}]",
        *([f"data.num_workers={workers}"] if workers is not None else []), *extra,
    ]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO / "bench"), os.environ.get("PYTHONPATH")])))
    env.setdefault("OMP_NUM_THREADS", "1")
    if malloc_default:
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)  # glibc's own default; keep_freed_memory stands aside
    cmd = [sys.executable, "-m", "roberta_pl.pretraining.app", *overrides]
    print(f"[{name}] {' '.join(cmd[3:])}", flush=True)
    start = time.time()
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.time() - start
    for line in done.stdout.splitlines():
        if line.startswith("[tracemalloc]"):
            print(f"[{name}] {line}", flush=True)
    if done.returncode != 0:
        raise SystemExit(f"[{name}] training failed ({done.returncode}):\n{done.stderr[-4000:]}")
    series = [json.loads(line) for line in samples.read_text().splitlines()]

    def total(workers: dict, key: str) -> float:
        return round(sum((w or {}).get(key, 0) for w in workers.values()) / MIB, 1)

    return {"name": name, "logger": logger, "num_workers": workers, "malloc_default": malloc_default, "trim_every": trim_every,
            "tracemalloc": trace, "overrides": overrides, "seconds": round(seconds, 1),
            "series": [{"step": s["step"], "rss_mib": round(s["rss"] / MIB, 1),
                        "pss_mib": round(s["self"]["pss"] / MIB, 1), "uss_mib": round(s["self"]["uss"] / MIB, 1),
                        "workers_rss_mib": total(s["workers"], "rss"), "workers_pss_mib": total(s["workers"], "pss"),
                        "workers_uss_mib": total(s["workers"], "uss"), "minor_faults": s.get("minflt"), "time": round(s["time"] - series[0]["time"], 1),
                        "worker_pids": sorted(int(c) for c in s["workers"]),
                        "worker_pss_mib": {c: round((w or {}).get("pss", 0) / MIB, 1) for c, w in s["workers"].items()},
                        "worker_commands": sorted(set(s.get("commands", {}).values()))}
                       for s in series]}


def summarize(case: dict, warmup: int) -> dict:
    """RSS after the warm-up and at the end, growth % and MiB per 1,000 steps: the trainer's RSS, and the PSS of the
    trainer, of its workers and of both (PSS: a page shared by a forked worker and the trainer is counted once)."""
    series = case["series"]
    after = next((s for s in series if s["step"] >= warmup), series[0])
    end = series[-1]
    steps = max(end["step"] - after["step"], 1)
    out = {"warmup_step": after["step"], "end_step": end["step"]}
    for key, get in (("trainer", lambda s: s["rss_mib"]), ("trainer_pss", lambda s: s["pss_mib"]),
                     ("workers_pss", lambda s: s["workers_pss_mib"]),
                     ("total_pss", lambda s: s["pss_mib"] + s["workers_pss_mib"])):
        a, b = get(after), get(end)
        out[key] = {"after_warmup_mib": round(a, 1), "end_mib": round(b, 1), "peak_mib": round(max(map(get, series)), 1),
                    "growth_pct": round(100 * (b - a) / a, 2) if a else None,
                    "mib_per_1000_steps": round((b - a) * 1000 / steps, 2)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--every", type=int, default=50, help="sample every N optimizer steps")
    p.add_argument("--warmup", type=int, default=500, help="growth is measured from the first sample at or after this step")
    p.add_argument("--loggers", default="csv,none", help="comma-separated logger kinds, one run each")
    p.add_argument("--workers", type=int, default=None, help="data.num_workers (default: the config's choice)")
    p.add_argument("--malloc-default", action="store_true", help="also run the first logger with glibc's own thresholds")
    p.add_argument("--trim-every", type=int, default=0,
                   help="also run the first logger with glibc's malloc_trim(0) every N steps (the probe calls it)")
    p.add_argument("--tracemalloc", default=None, help="A,B: print Python allocation growth between steps A and B")
    p.add_argument("--only-extra", action="store_true", help="skip the plain runs of the loggers")
    p.add_argument("--label", default="", help="a name for this set of runs in the JSON (e.g. before/after)")
    p.add_argument("--out", default=str(RESULTS / "memory_growth.json"))
    p.add_argument("--override", action="append", default=[], help="an extra Hydra override for every run")
    args = p.parse_args()
    trace = [int(x) for x in args.tracemalloc.split(",")] if args.tracemalloc else None

    cases = []
    with tempfile.TemporaryDirectory(prefix="memory_growth_") as tmp:
        work = Path(tmp)
        plan = [(f"{lg}", lg, False) for lg in args.loggers.split(",")]
        plan = [(name, logger, False, 0) for name, logger, _ in plan]
        if args.malloc_default:
            plan.append((f"{plan[0][1]}-malloc-default", plan[0][1], True, 0))
        if args.trim_every:
            plan.append((f"{plan[0][1]}-trim-every-{args.trim_every}", plan[0][1], False, args.trim_every))
        if args.only_extra:
            plan = plan[1:]
        for name, logger, malloc_default, trim_every in plan:
            case = run_case(name, logger, args.steps, args.every, args.workers, malloc_default, trace, args.override, work,
                            trim_every)
            case["summary"] = summarize(case, args.warmup)
            cases.append(case)

    print(f"\n{'case':<26}{'measure':<13}{'after warm-up':>15}{'end':>11}{'growth':>9}{'MiB/1k steps':>14}")
    for c in cases:
        for key in ("trainer", "trainer_pss", "workers_pss", "total_pss"):
            s = c["summary"][key]
            growth = f"{s['growth_pct']:+.1f}%" if s["growth_pct"] is not None else "-"
            print(f"{c['name']:<26}{key:<13}{s['after_warmup_mib']:>11.1f} MiB{s['end_mib']:>7.1f} MiB{growth:>9}"
                  f"{s['mib_per_1000_steps']:>+14.1f}")

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    record = {"label": args.label, "date": datetime.date.today().isoformat(), "commit": commit,
              "dirty": bool(subprocess.run(["git", "status", "--porcelain", "--", "roberta_pl", "data_pipelines"],
                                           cwd=REPO, capture_output=True, text=True).stdout.strip()),
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
              "settings": {"steps": args.steps, "every": args.every, "warmup": args.warmup, "workers": args.workers},
              "cases": cases}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(out.read_text()).get("runs", []) if out.exists() else []
    runs = [r for r in runs if not args.label or r.get("label") != args.label] + [record]
    out.write_text(json.dumps({"runs": runs}, indent=1) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
