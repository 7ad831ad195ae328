"""Suites: lists of fine-tuning tasks (``conf/suites/<name>.yaml`` or a user's YAML file), read and checked.

A suite is a YAML list; each entry is a task in the schema of ``conf/task/*.yaml`` (``preset:`` names the
``conf/task/`` file it starts from; the other task fields are set over it) plus what evaluation adds: ``name``,
``report`` (the metrics a run's score averages), ``extra_valid`` (more labelled files, scored by accuracy),
``start_from`` (an earlier task whose best model, of the same seed, this one starts from), ``finetune``
(fine-tuning overrides for this task) and ``build`` (a local task written from text on this machine).
``${data_dir}`` and ``${out_dir}`` in a suite are the evaluation's own.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from omegaconf import ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from roberta_pl.config import CONF_DIR
from roberta_pl.errors import ConfigError
from roberta_pl.finetune.config import TaskConf

SUITE_DIR = CONF_DIR / "suites"  # not conf/suite: a config group of that name would take the `suite=` key
TASK_FIELDS = {f.name for f in dataclasses.fields(TaskConf)}
EVAL_FIELDS = {"preset", "report", "extra_valid", "start_from", "finetune", "build"}
# Fine-tuning settings that roberta-pl-eval sets itself for each run: a `finetune:` override of one would make every
# seed the same run, or write outside out_dir. What to use instead:
EVAL_OWNED = {"seed": "seed= and seeds= of roberta-pl-eval", "init": "init= of roberta-pl-eval",
              "pretrained": "roberta-pl-eval's MODEL", "tokenizer": "tokenizer= of roberta-pl-eval",
              "run_dir": "out_dir= of roberta-pl-eval", "run_name": "out_dir= of roberta-pl-eval",
              "task": "a suite task (preset:, or task fields like task.max_seq_len=)",
              "overwrite": "nothing: a finished task-seed is kept, an unfinished one run again"}


def check_finetune_overrides(overrides, where: str) -> None:
    """Refuse a fine-tuning override of a setting roberta-pl-eval owns (:data:`EVAL_OWNED`), in one line."""
    for override in overrides:
        key = str(override).lstrip("+~").split("=", 1)[0].strip()
        if key in EVAL_OWNED:
            raise ConfigError(f"{where}: {override}: roberta-pl-eval sets {key} for each run; use "
                              f"{EVAL_OWNED[key]} instead")


def preset_fields(preset: str) -> dict:
    """A conf/task/ preset's own fields over those of the presets it lists in its defaults."""
    raw = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "task" / f"{preset}.yaml"))
    fields = {}
    for base in raw.pop("defaults", []):
        if isinstance(base, str) and base != "_self_":
            fields |= preset_fields(base)
    return fields | raw


def builders() -> dict:
    """The local tasks a suite can ``build:``, by name: writers of train/valid files from local text."""
    from data_pipelines.demo_tasks import tagging_task, topics_task, two_source_task

    return {"topics": topics_task, "sources": two_source_task, "tagging": tagging_task}


@dataclass
class SuiteTask:
    """One task of a suite."""

    name: str
    preset: str  # the conf/task/ file
    fields: dict  # task fields set over the preset
    report: list[str] = field(default_factory=list)  # empty: the task's own metric
    extra_valid: dict[str, str] = field(default_factory=dict)
    start_from: str | None = None
    finetune: list[str] = field(default_factory=list)
    build: str | None = None

    @property
    def metric(self) -> str:
        """The score's name: the metrics it averages, joined by ``/``."""
        return "/".join([*self.report, *self.extra_valid])


def suite_names() -> list[str]:
    return sorted(p.stem for p in SUITE_DIR.glob("*.yaml"))


def suite_path(suite: str) -> Path:
    """``conf/suites/<suite>.yaml`` for a suite's name, else the user's file."""
    if (SUITE_DIR / f"{suite}.yaml").is_file():
        return SUITE_DIR / f"{suite}.yaml"
    path = Path(suite)
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    raise ConfigError(f"suite={suite}: neither a suite ({', '.join(suite_names())}) nor a YAML file")


def load_suite(suite: str, data_dir: str | None, out_dir: Path) -> list[SuiteTask]:
    """The tasks of a suite, in order (a task's ``start_from`` comes before it), with ``${data_dir}`` resolved.

    Raises:
        ConfigError: one line naming the suite file, the task and the field.
    """
    path = suite_path(suite)
    try:
        raw = OmegaConf.load(path)
    except (OmegaConfBaseException, OSError, ValueError) as e:
        raise ConfigError(f"{path}: not a readable suite YAML ({' '.join(str(e).split())})") from None
    if not isinstance(raw, ListConfig) or not len(raw):
        raise ConfigError(f"{path}: a suite is a YAML list of tasks (each one like conf/task/*.yaml)")
    if data_dir is None and "${data_dir}" in path.read_text():
        raise ConfigError(f"suite={suite} reads its tasks from data_dir=DIR (for glue: the GLUE directory, standard "
                          f"layout: MNLI/, QQP/, ...); pass data_dir=")
    root = OmegaConf.create({"data_dir": str(data_dir), "out_dir": str(out_dir), "tasks": raw})
    try:
        entries = OmegaConf.to_container(root, resolve=True)["tasks"]
    except OmegaConfBaseException as e:
        raise ConfigError(f"{path}: {' '.join(str(e).split())}") from None
    tasks: list[SuiteTask] = []
    for i, entry in enumerate(entries):
        tasks.append(suite_task(entry, path, i, [t.name for t in tasks]))
    return tasks


def check_report(report, task: dict, where: str) -> None:
    """Refuse a ``report:`` metric the task's kind does not compute, before any training."""
    from roberta_pl.finetune.module import available_metrics

    metrics = available_metrics(str(task.get("kind", "sequence_classification")), bool(task.get("regression")))
    for name in report:
        if name not in metrics:
            raise ConfigError(f"{where}: report: {name} is not a metric of this task ({', '.join(metrics)})")


def suite_task(entry, path: Path, index: int, earlier: list[str]) -> SuiteTask:
    """One checked entry of a suite file; ``earlier``: the names of the tasks before it."""
    where = f"{path}, task {index + 1}"
    if not isinstance(entry, dict):
        raise ConfigError(f"{where}: a task is a mapping of task fields (like conf/task/*.yaml), not {entry!r}")
    unknown = sorted(set(entry) - TASK_FIELDS - EVAL_FIELDS)
    if unknown:
        raise ConfigError(f"{where}: unknown field {unknown[0]!r} (task fields: {', '.join(sorted(TASK_FIELDS))}; "
                          f"suite fields: {', '.join(sorted(EVAL_FIELDS))})")
    preset = entry.get("preset") or ("token_classification" if entry.get("kind") == "token_classification"
                                     else "sequence_classification")
    presets = sorted(p.stem for p in (CONF_DIR / "task").glob("*.yaml"))
    if preset not in presets:
        raise ConfigError(f"{where}: preset={preset} is not a conf/task/ preset ({', '.join(presets)})")
    fields = {k: v for k, v in entry.items() if k in TASK_FIELDS}
    name = str(fields.get("name") or preset)
    where = f"{path}, task {name}"
    if name in earlier:
        raise ConfigError(f"{where}: a second task named {name}; give one a `name:`")
    if entry.get("start_from") is not None and entry["start_from"] not in earlier:
        raise ConfigError(f"{where}: start_from={entry['start_from']} is not a task before it "
                          f"({', '.join(earlier) or 'none'})")
    if entry.get("build") is not None and entry["build"] not in builders():
        raise ConfigError(f"{where}: build={entry['build']} is not a local task ({', '.join(builders())})")
    if len(entry.get("extra_valid") or {}) > 1:
        raise ConfigError(f"{where}: extra_valid names {len(entry['extra_valid'])} files; a task scores one "
                          f"(give each other file a task of its own)")
    check_finetune_overrides(entry.get("finetune") or [], f"{where}, finetune")
    check_report(entry.get("report") or [], preset_fields(preset) | fields, where)
    return SuiteTask(name=name, preset=preset, fields=fields | {"name": name}, report=list(entry.get("report") or []),
                     extra_valid=dict(entry.get("extra_valid") or {}), start_from=entry.get("start_from"),
                     finetune=[str(o) for o in entry.get("finetune") or []], build=entry.get("build"))
