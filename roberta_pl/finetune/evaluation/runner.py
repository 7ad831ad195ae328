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
from roberta_pl.finetune.evaluation.fingerprint import (
    check_fingerprint,
    record_out_dir,
    task_fingerprint,
)
from roberta_pl.finetune.evaluation.suites import SuiteTask, builders

PROG = "roberta-pl-eval"
TRAINED_FILE = "finetuned.json"  # in a task-seed's directory: the fingerprint of the fine-tuning that finished there


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


def read_result(out_dir: Path, task: str, seed: int, fingerprint: dict) -> dict | None:
    """A task-seed's recorded result, or None if it has not finished (no file, or one that does not parse).

    Raises:
        ConfigError: the result was computed from something else than ``fingerprint`` (another model, init,
            fine-tuning overrides or task).
    """
    path = run_dir(out_dir, task, seed) / "result.json"
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(result, dict) or "score" not in result:
        return None
    recorded = result.get("fingerprint")
    if recorded != fingerprint and without_report(recorded) == without_report(fingerprint):
        return None  # only `report:` changed: scored again from the finished fine-tuning (run_task_seed)
    check_fingerprint(recorded, fingerprint, path, out_dir)
    return result


def without_report(fingerprint) -> dict | None:
    """A task-seed's fingerprint less the metrics reported from the run: what its fine-tuning depends on."""
    if not isinstance(fingerprint, dict) or not isinstance(fingerprint.get("task"), dict):
        return None
    return {**fingerprint, "task": {k: v for k, v in fingerprint["task"].items() if k != "report"}}


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

    # A task that starts from another's model loads it whatever init= says: with init=random that model is the
    # earlier task fine-tuned from scratch, the same chain as the pretrained run's (the fair baseline).
    init = "pretrained" if task.start_from is not None else cfg.init
    overrides = [f"task={task.preset}", f"init={init}", f"seed={seed}", "overwrite=true", *cfg.finetune,
                 *task.finetune, *(["export_hf=true"] if export else [])]  # a task others start from: its HF export
    with finetune_compose():
        ft = compose(config_name="finetune", overrides=overrides)
    fields = dict(task.fields)
    if task.build is not None:
        fields |= build_local_task(task, out_dir / "data" / task.name)
    if task.extra_valid:  # one file at most (suite_task): fine-tuning predicts one test file
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
    for name in task.extra_valid:  # one at most: the run's test file
        rows = [json.loads(line) for line in Path(summary["predictions"]["test"]).read_text().splitlines()]
        values[name] = statistics.fmean(r["prediction"] == r["label"] for r in rows if "label" in r)
    return values


def finished_finetuning(where: Path, trained: dict) -> dict | None:
    """The summary of a fine-tuning that finished in ``where`` with the same fingerprint (``trained``) but was not
    scored (a bad ``report:`` name, a killed evaluation), so that a rerun scores it instead of training again."""
    try:
        recorded = json.loads((where / TRAINED_FILE).read_text())
        summary = json.loads((where / "summary.json").read_text())
    except (OSError, ValueError):
        return None
    return summary if recorded == trained and isinstance(summary, dict) and "metrics" in summary else None


def run_task_seed(cfg: DictConfig, task: SuiteTask, seed: int, out_dir: Path, parents: set[str],
                  fingerprints: dict[str, dict]) -> dict:
    """Fine-tune one task with one seed (from its ``start_from`` task's model of the same seed, if any) and record
    its result (``fingerprints``: each task's, by name)."""
    from roberta_pl.finetune.job import run

    start = cfg.pretrained
    if task.start_from is not None:
        parent = read_result(out_dir, task.start_from, seed, fingerprints[task.start_from])
        if parent is None:
            raise ConfigError(f"task {task.name} starts from {task.start_from}'s model of seed {seed}, which has not "
                              f"finished; run {task.start_from} first (tasks=[{task.start_from}])")
        start = parent["hf_dir"]
    ft, overrides = finetune_config(cfg, task, seed, out_dir, start, export=task.name in parents)
    where = Path(ft.run_dir)
    fingerprint = fingerprints[task.name]
    # What the training depends on: all but the metrics reported from it.
    trained = {**without_report(fingerprint), "start": start}
    summary = finished_finetuning(where, trained)
    if summary is None:
        (where / TRAINED_FILE).unlink(missing_ok=True)  # a run killed from here on must not pass as finished
        summary = run(ft, where, overrides)
        write_atomic(where / TRAINED_FILE, json.dumps(trained, indent=2) + "\n")
    else:
        print(f"{PROG}: {task.name} seed {seed}: scoring the finished fine-tuning in {where}", flush=True)
    components = score_run(task, ft, summary)
    hf_dir = summary.get("hf_dir")
    result = {"task": task.name, "seed": seed, "metric": task.metric, "score": statistics.fmean(components.values()),
              "components": components, "started_from": start, "hf_dir": hf_dir and str(Path(hf_dir).resolve()),
              "global_step": summary["global_step"], "fingerprint": fingerprint}
    write_atomic(where / "result.json", json.dumps(result, indent=2) + "\n")
    return result


def run_suite(cfg: DictConfig, tasks: list[SuiteTask], out_dir: Path, fingerprint: dict) -> dict[str, dict[int, dict]]:
    """Every selected task-seed, in suite order (a ``start_from`` task first), skipping finished ones (whose result
    must have this evaluation's ``fingerprint``). Prints a line per task-seed. Returns the results on record for
    every task and seed of the suite."""
    selected = list(cfg.tasks) or [t.name for t in tasks]
    unknown = [name for name in selected if name not in {t.name for t in tasks}]
    if unknown:
        raise ConfigError(f"tasks={unknown[0]}: no such task in suite={cfg.suite} ({', '.join(t.name for t in tasks)})")
    seeds = seed_list(cfg)
    parents = {t.start_from for t in tasks if t.start_from}
    fingerprints = {t.name: {**fingerprint, "task": task_fingerprint(t)} for t in tasks}
    todo = [(t, s) for t in tasks if t.name in selected for s in seeds]
    for task, seed in todo:  # refuse a mixed out_dir before any training
        read_result(out_dir, task.name, seed, fingerprints[task.name])
    record_out_dir(out_dir, fingerprint)
    for i, (task, seed) in enumerate(todo, 1):
        result = read_result(out_dir, task.name, seed, fingerprints[task.name])
        done = "done earlier" if result is not None else None
        if result is None:
            result = run_task_seed(cfg, task, seed, out_dir, parents, fingerprints)
        print(f"{PROG}: [{i}/{len(todo)}] {task.name} seed {seed}: {task.metric} {result['score']:.4f}"
              + (f" ({done})" if done else ""), flush=True)
    all_seeds = [cfg.seed + s for s in range(cfg.seeds)]
    return {t.name: {s: r for s in all_seeds if (r := read_result(out_dir, t.name, s, fingerprints[t.name])) is not None}
            for t in tasks}
