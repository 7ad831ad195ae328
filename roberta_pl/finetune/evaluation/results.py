"""A suite's results: ``results.json`` (per task the metric, the per-seed scores, their mean and std; the suite's
average), ``results.md`` (the same as a table) and ``results.png`` (a bar per task, a dot per seed)."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from roberta_pl.finetune.evaluation.runner import write_atomic
from roberta_pl.finetune.evaluation.suites import SuiteTask


def aggregate(tasks: list[SuiteTask], results: dict[str, dict[int, dict]], seeds: list[int], meta: dict) -> dict:
    """Per task: ``metric``, ``seeds`` ({seed: score}), ``mean``, ``std`` (sample standard deviation, 0 for one
    seed) and ``components`` (each reported metric per seed); ``average``: the mean of the task means. Task-seeds
    not finished yet are listed under ``missing``, and a task with none is left out of the average."""
    out = {**meta, "seeds": seeds, "tasks": {}, "missing": []}
    for task in tasks:
        done = results.get(task.name, {})
        out["missing"] += [f"{task.name}/seed-{s}" for s in seeds if s not in done]
        if not done:
            continue
        scores = [done[s]["score"] for s in seeds if s in done]
        out["tasks"][task.name] = {
            "metric": task.metric,
            "seeds": {str(s): done[s]["score"] for s in seeds if s in done},
            "mean": statistics.fmean(scores),
            "std": statistics.stdev(scores) if len(scores) > 1 else 0.0,
            "components": {m: {str(s): done[s]["components"][m] for s in seeds if s in done}
                           for m in done[next(iter(done))]["components"]},
        }
    means = [t["mean"] for t in out["tasks"].values()]
    out["average"] = statistics.fmean(means) if means else None
    return out


def markdown(summary: dict) -> str:
    """The results as a markdown table: a row per task (mean ± std, then each seed's score), then the average."""
    seeds = summary["seeds"]
    lines = [f"Suite `{summary['suite']}`, model `{summary['model']}` ({summary['init']} init), seeds "
             f"{', '.join(map(str, seeds))}.", "",
             "| task | metric | mean | std | " + " | ".join(f"seed {s}" for s in seeds) + " |",
             "|---|---|---:|---:|" + "---:|" * len(seeds)]
    for name, t in summary["tasks"].items():
        cells = [f"{t['seeds'][str(s)]:.4f}" if str(s) in t["seeds"] else "–" for s in seeds]
        lines.append(f"| {name} | {t['metric']} | {t['mean']:.4f} | {t['std']:.4f} | " + " | ".join(cells) + " |")
    if summary["average"] is not None:
        lines.append(f"| **average** | | **{summary['average']:.4f}** | |" + " |" * len(seeds))
    if summary["missing"]:
        lines += ["", f"Not finished yet: {', '.join(summary['missing'])}."]
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> Path | None:
    """A bar per task (its mean, with the std as an error bar) and a dot per seed; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    names = list(summary["tasks"])
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * max(len(names), 1), 3.6))
    for i, name in enumerate(names):
        t = summary["tasks"][name]
        ax.bar(i, t["mean"], yerr=t["std"], color="#4c72b0", alpha=0.8, capsize=4)
        scores = list(t["seeds"].values())
        ax.scatter([i] * len(scores), scores, color="black", s=12, zorder=3)
    ax.set_xticks(range(len(names)), [f"{n}\n{summary['tasks'][n]['metric']}" for n in names], fontsize=8)
    ax.set_ylabel("score")
    average = "" if summary["average"] is None else f", average {summary['average']:.3f}"
    ax.set_title(f"{summary['suite']} ({summary['init']} init{average})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(out_dir: Path, summary: dict) -> list[Path]:
    """``results.json``, ``results.md`` and ``results.png`` (when matplotlib is installed), each written whole."""
    write_atomic(out_dir / "results.json", json.dumps(summary, indent=2) + "\n")
    write_atomic(out_dir / "results.md", markdown(summary))
    png = plot(summary, out_dir / ".results.png.tmp.png")
    written = [out_dir / "results.json", out_dir / "results.md"]
    if png is not None:
        png.replace(out_dir / "results.png")
        written.append(out_dir / "results.png")
    return written
