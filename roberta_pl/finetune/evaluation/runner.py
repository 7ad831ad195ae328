"""Run a suite: every task for every seed, one fine-tuning after another, each finished task-seed recorded in
``<out_dir>/tasks/<task>/seed-<seed>/result.json`` (written atomically, so a killed run leaves none and is run
again, and a finished one is never run twice)."""

from __future__ import annotations

import contextlib
import json
import os
import statistics
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from roberta_pl.errors import ConfigError
from roberta_pl.finetune.evaluation.suites import SuiteTask, builders

PROG = "roberta-pl-eval"


def seed_list(cfg: DictConfig) -> list[int]:
    """The seeds a run covers: ``seed + s`` for s in 0..seeds-1 (only ``seed_index`` when it is set)."""
    if cfg.seeds < 1:
        raise ConfigError(f"seeds={cfg.seeds}: run each task at least once")
    if cfg.seed_index is not None and not 0 <= cfg.seed_index < cfg.seeds:
        raise ConfigError(f"seed_index={cfg.seed_index}: choose one of 0..{cfg.seeds - 1} (seeds={cfg.seeds})")
    indices = [cfg.seed_index] if cfg.seed_index is not None else range(cfg.seeds)
    return [cfg.seed + s for s in indices]


def run_dir(out_dir: Path, task: str, seed: int) -> Path:
    return out_dir / "tasks" / task / f"seed-{seed}"


def read_result(out_dir: Path, task: str, seed: int) -> dict | None:
    """A task-seed's recorded result, or None if it has not finished (no file, or one that does not parse)."""
    try:
        result = json.loads((run_dir(out_dir, task, seed) / "result.json").read_text())
    except (OSError, ValueError):
        return None
    return result if isinstance(result, dict) and "score" in result else None


def write_atomic(path: Path, text: str) -> None:
    """Write a file whole or not at all: a temporary file in the same directory, flushed, then renamed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)


@contextlib.contextmanager
def finetune_compose():
    """Compose fine-tuning configs: inside the ``roberta-pl-eval`` Hydra app (which already holds ``conf/``), or
    from Python."""
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from roberta_pl.config import CONF_DIR
    from roberta_pl.finetune.config import register_configs

    register_configs()
    if GlobalHydra.instance().is_initialized():
        yield
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            yield


def finetune_config(cfg: DictConfig, task: SuiteTask, seed: int, out_dir: Path, start: str,
                    export: bool) -> tuple[DictConfig, list[str]]:
    """The fine-tuning config of one task-seed, and the overrides it was composed from (``export``: write the HF
    export, which the tasks starting from this one load)."""
    from hydra import compose

    overrides = [f"task={task.preset}", f"init={cfg.init}", f"seed={seed}", "overwrite=true", *cfg.finetune,
                 *task.finetune, *(["export_hf=true"] if export else [])]  # a task others start from: its HF export
    with finetune_compose():
        ft = compose(config_name="finetune", overrides=overrides)
    fields = dict(task.fields)
    if task.build is not None:
        fields |= build_local_task(task, out_dir / "data" / task.name)
    if task.extra_valid:
        fields["test_file"] = next(iter(task.extra_valid.values()))
    ft.task = OmegaConf.merge(ft.task, fields)
    # Set after composing: paths need no quoting for Hydra's override grammar.
    ft.pretrained, ft.run_dir = start, str(run_dir(out_dir, task.name, seed))
    if cfg.tokenizer is not None and start == cfg.pretrained:
        ft.tokenizer = cfg.tokenizer
    for split in ("train_file", "valid_file", "test_file"):
        value = ft.task.get(split)
        if value is not None and not Path(value).is_file():
            raise ConfigError(f"suite={cfg.suite}, task {task.name}: task.{split}={value}: no such file"
                              + (f" (data_dir={cfg.data_dir}: the GLUE directory, standard layout)" if cfg.data_dir else ""))
    return ft, overrides


def build_local_task(task: SuiteTask, target: Path) -> dict[str, str]:
    """Write a ``build:`` task's files once (into a temporary directory renamed into place, so parallel jobs never
    read half a file); returns its ``train_file`` and ``valid_file``."""
    import shutil

    if not target.is_dir():
        tmp = target.with_name(f".{target.name}.{os.getpid()}")
        builders()[task.build](tmp)
        try:
            tmp.rename(target)
        except OSError:  # another job got there first: the same files
            shutil.rmtree(tmp, ignore_errors=True)
    files = {split: next(target.glob(f"{split}.*"), None) for split in ("train", "valid")}
    return {f"{split}_file": str(path) for split, path in files.items()}


def score_run(task: SuiteTask, ft: DictConfig, summary: dict) -> dict[str, float]:
    """The metrics a task reports for one run: validation metrics from the run's summary, and the accuracy of each
    ``extra_valid`` file from its predictions."""
    metrics = summary["metrics"]
    report = task.report or [str(ft.task.metric)]
    missing = [m for m in report if f"val/{m}" not in metrics]
    if missing:
        raise ConfigError(f"suite task {task.name}: report: {missing[0]} is not a metric of this task "
                          f"({', '.join(sorted(k.removeprefix('val/') for k in metrics))})")
    values = {m: float(metrics[f"val/{m}"]) for m in report}
    for name in task.extra_valid:
        rows = [json.loads(line) for line in Path(summary["predictions"]["test"]).read_text().splitlines()]
        values[name] = statistics.fmean(r["prediction"] == r["label"] for r in rows if "label" in r)
    return values


def run_task_seed(cfg: DictConfig, task: SuiteTask, seed: int, out_dir: Path, parents: set[str]) -> dict:
    """Fine-tune one task with one seed (from its ``start_from`` task's model of the same seed, if any) and record
    its result."""
    from roberta_pl.finetune.job import run

    start = cfg.pretrained
    if task.start_from is not None:
        parent = read_result(out_dir, task.start_from, seed)
        if parent is None:
            raise ConfigError(f"task {task.name} starts from {task.start_from}'s model of seed {seed}, which has not "
                              f"finished; run {task.start_from} first (tasks=[{task.start_from}])")
        start = parent["hf_dir"]
    ft, overrides = finetune_config(cfg, task, seed, out_dir, start, export=task.name in parents)
    summary = run(ft, Path(ft.run_dir), overrides)
    components = score_run(task, ft, summary)
    result = {"task": task.name, "seed": seed, "metric": task.metric, "score": statistics.fmean(components.values()),
              "components": components, "started_from": start, "hf_dir": summary.get("hf_dir"),
              "global_step": summary["global_step"]}
    write_atomic(run_dir(out_dir, task.name, seed) / "result.json", json.dumps(result, indent=2) + "\n")
    return result


def run_suite(cfg: DictConfig, tasks: list[SuiteTask], out_dir: Path) -> dict[str, dict[int, dict]]:
    """Every selected task-seed, in suite order (a ``start_from`` task first), skipping finished ones. Prints a
    line per task-seed. Returns the results on record for every task and seed of the suite."""
    selected = list(cfg.tasks) or [t.name for t in tasks]
    unknown = [name for name in selected if name not in {t.name for t in tasks}]
    if unknown:
        raise ConfigError(f"tasks={unknown[0]}: no such task in suite={cfg.suite} ({', '.join(t.name for t in tasks)})")
    seeds = seed_list(cfg)
    parents = {t.start_from for t in tasks if t.start_from}
    todo = [(t, s) for t in tasks if t.name in selected for s in seeds]
    for i, (task, seed) in enumerate(todo, 1):
        result = read_result(out_dir, task.name, seed)
        done = "done earlier" if result is not None else None
        if result is None:
            result = run_task_seed(cfg, task, seed, out_dir, parents)
        print(f"{PROG}: [{i}/{len(todo)}] {task.name} seed {seed}: {task.metric} {result['score']:.4f}"
              + (f" ({done})" if done else ""), flush=True)
    all_seeds = [cfg.seed + s for s in range(cfg.seeds)]
    return {t.name: {s: r for s in all_seeds if (r := read_result(out_dir, t.name, s)) is not None} for t in tasks}
