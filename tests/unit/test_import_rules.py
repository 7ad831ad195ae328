"""The house rules of the package's imports, checked on the source (so anyone can run them, in a second):

- the model imports neither Lightning nor the data side, but for the batch contract (``data_pipelines.contract``:
  the label that is not predicted), a leaf that imports only the standard library;
- the data side imports nothing from ``roberta_pl`` (the flow runs one way);
- nothing imports an entry point (``roberta_pl.pretraining.app``, ``roberta_pl.finetune.app``) or a ``cli`` module:
  entry points import the run harness and the rooms, never each other;
- the shared core (``roberta_pl/*.py``, ``roberta_pl/callbacks/``) imports neither job: ``roberta_pl.pretraining`` and
  ``roberta_pl.finetune`` build on the core, and never on each other.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENTRY_POINTS = ("roberta_pl.pretraining.app", "roberta_pl.finetune.app", "roberta_pl.cli")
JOBS = ("roberta_pl.pretraining", "roberta_pl.finetune")


def imports_of(path: Path) -> set[str]:
    """Every module a file imports, anywhere in it (function-level imports included)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def module_name(path: Path, root: Path = ROOT) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")


def package_files(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py"))


MODEL_MAY_IMPORT = "data_pipelines.contract"  # the batch contract: one definition of IGNORE_INDEX for both sides


def test_model_imports_neither_lightning_nor_data():
    bad = {m for m in imports_of(ROOT / "roberta_pl" / "model.py")
           if m.split(".")[0] in ("lightning", "pytorch_lightning", "data_pipelines", "webdataset")
           and m != MODEL_MAY_IMPORT and not m.startswith(MODEL_MAY_IMPORT + ".")}
    assert not bad, bad


def test_the_contract_the_model_imports_is_a_standard_library_leaf():
    bad = {m for m in imports_of(ROOT / (MODEL_MAY_IMPORT.replace(".", "/") + ".py"))
           if m.split(".")[0] not in sys.stdlib_module_names and m.split(".")[0] != "__future__"}
    assert not bad, sorted(bad)
    # Importing it runs data_pipelines/__init__.py first: without site-packages (-S) it must still import, and load
    # nothing but the standard library and the package itself.
    code = (f"import sys; import {MODEL_MAY_IMPORT}; "
            "print(sorted({m.split('.')[0] for m in sys.modules} - set(sys.stdlib_module_names) - {'__main__'}))")
    out = subprocess.run([sys.executable, "-S", "-E", "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["['data_pipelines']"], out.stdout


def test_data_side_imports_nothing_from_roberta_pl():
    bad = {f"{module_name(p)} -> {m}" for p in package_files("data_pipelines") for m in imports_of(p)
           if m.split(".")[0] == "roberta_pl"}
    assert not bad, sorted(bad)


def test_nothing_imports_an_entry_point_or_a_cli_module():
    bad = set()
    for p in package_files("roberta_pl", "data_pipelines"):
        own = module_name(p)
        for m in imports_of(p):
            target = next((e for e in ENTRY_POINTS if m == e or m.startswith(e + ".")), None)
            if target and not own.startswith(target):
                bad.add(f"{own} -> {m}")
    assert not bad, sorted(bad)


def job_of(module: str) -> str | None:
    return next((j for j in JOBS if module == j or module.startswith(j + ".")), None)


def layering_violations(files: list[Path], root: Path = ROOT) -> set[str]:
    """Imports that run upward (core -> a job) or sideways (one job -> the other)."""
    bad = set()
    for p in files:
        own = module_name(p, root)
        if own.startswith("roberta_pl.cli"):
            continue  # the command-line tools sit on top of everything
        for m in imports_of(p):
            target = job_of(m)
            if target and job_of(own) != target:
                bad.add(f"{own} -> {m}")
    return bad


def test_the_core_imports_no_job_and_the_jobs_not_each_other():
    assert not layering_violations(package_files("roberta_pl")), sorted(layering_violations(package_files("roberta_pl")))


def test_the_rules_see_a_violation(tmp_path):
    # The checker itself: a file that breaks each rule is caught.
    f = tmp_path / "x.py"
    f.write_text("import lightning\nfrom roberta_pl.cli.export import main\n\ndef g():\n    from roberta_pl.pretraining.app import run\n")
    assert {"lightning", "roberta_pl.cli.export", "roberta_pl.pretraining.app", "roberta_pl.pretraining.app.run"} <= imports_of(f)
    # An upward import from the core and a sideways one between the jobs are both caught; the jobs' own are not.
    core, job = tmp_path / "roberta_pl" / "checks.py", tmp_path / "roberta_pl" / "finetune" / "module.py"
    job.parent.mkdir(parents=True)
    core.write_text("from roberta_pl.finetune.module import available_metrics\n")
    job.write_text("from roberta_pl.pretraining.module import MaskedLMModule\nfrom roberta_pl.finetune.config import X\n")
    found = layering_violations([core, job], tmp_path)
    assert {"roberta_pl.checks -> roberta_pl.finetune.module",
            "roberta_pl.finetune.module -> roberta_pl.pretraining.module"} <= found
    assert not any("finetune.config" in v for v in found)
