"""What an evaluation's results were computed from, so that an ``out_dir`` never mixes two of them.

``<out_dir>/eval.json`` records the first run's fingerprint (the MODEL's resolved path and its files' sizes and
times, ``init``, ``tokenizer`` and ``finetune=[...]``); each task-seed's ``result.json`` records it too, with the
suite task it ran (its fields resolved: ``${data_dir}`` and all). A rerun whose fingerprint differs is refused in one
line instead of reporting another model's scores as its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

from omegaconf import DictConfig

from roberta_pl.errors import ConfigError
from roberta_pl.finetune.evaluation.suites import SuiteTask

EVAL_FILE = "eval.json"


def model_stamp(model: Path, skip: Path) -> str:
    """A hash of the MODEL's files' relative paths, sizes and modification times (not their bytes: a large model
    would take minutes to hash); files under ``skip`` (an out_dir inside the model's directory) are left out."""
    entries = []
    if model.is_file():
        st = model.stat()
        entries.append(("", st.st_size, st.st_mtime_ns))
    else:
        for root, dirs, files in os.walk(model):
            dirs[:] = sorted(d for d in dirs if (Path(root) / d).resolve() != skip)
            for name in sorted(files):
                st = (Path(root) / name).stat()
                entries.append((str((Path(root) / name).relative_to(model)), st.st_size, st.st_mtime_ns))
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()[:16]


def eval_fingerprint(cfg: DictConfig, out_dir: Path) -> dict:
    """The evaluation-wide fingerprint of ``cfg`` (what every task-seed of its out_dir shares)."""
    model = Path(cfg.pretrained).resolve()
    return {"model": str(model), "model_files": model_stamp(model, out_dir.resolve()), "init": str(cfg.init),
            "tokenizer": None if cfg.tokenizer is None else str(Path(cfg.tokenizer).resolve()),
            "finetune": [str(o) for o in cfg.finetune]}


def task_fingerprint(task: SuiteTask) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(task)))  # JSON's types, as result.json reads back


def what_differs(recorded: dict, current: dict) -> str:
    """The first field in which a recorded fingerprint differs from the current one, in words."""
    if recorded.get("model") != current["model"]:
        return f"holds results of MODEL={recorded.get('model')}"
    if recorded.get("model_files") != current["model_files"]:
        return f"holds results of MODEL={current['model']} as it was before its files changed"
    for key in ("init", "tokenizer", "finetune"):
        if recorded.get(key) != current[key]:
            value = recorded.get(key)
            shown = f"[{','.join(value)}]" if isinstance(value, list) else value
            return f"holds results run with {key}={shown}"
    if "task" in current and recorded.get("task") != current["task"]:
        old, new = recorded.get("task") or {}, current["task"]
        field = next((k for k in new if old.get(k) != new[k]), "name")
        return f"holds a run of task {new['name']} with another {field} ({old.get(field)!r}, not {new[field]!r})"
    return "holds other results"


def check_fingerprint(recorded, current: dict, where: Path, out_dir: Path) -> None:
    """Refuse, in one line, a recorded fingerprint (from ``where``) that is not ``current``."""
    if recorded == current:
        return
    if not isinstance(recorded, dict):
        raise ConfigError(f"out_dir={out_dir}: {where} records no fingerprint (an older roberta-pl-eval's results); "
                          f"use another out_dir")
    raise ConfigError(f"out_dir={out_dir} {what_differs(recorded, current)} ({where}); use another out_dir")


def check_out_dir(out_dir: Path, fingerprint: dict) -> None:
    """Refuse an out_dir whose ``eval.json`` records another fingerprint (none yet: nothing to refuse)."""
    path = out_dir / EVAL_FILE
    try:
        recorded = json.loads(path.read_text())
    except FileNotFoundError:
        return
    except (OSError, ValueError):
        raise ConfigError(f"out_dir={out_dir}: {path} is not readable JSON; use another out_dir") from None
    check_fingerprint(recorded, fingerprint, path, out_dir)


def record_out_dir(out_dir: Path, fingerprint: dict) -> None:
    """Write ``<out_dir>/eval.json`` on the first run (once its results, if any, were checked against it)."""
    from roberta_pl.finetune.evaluation.runner import write_atomic

    if not (out_dir / EVAL_FILE).exists():
        write_atomic(out_dir / EVAL_FILE, json.dumps(fingerprint, indent=2) + "\n")
