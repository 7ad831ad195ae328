"""The house rules of the package's imports, checked on the source (so anyone can run them, in a second):

- the model imports neither Lightning nor the data side;
- the data side imports nothing from ``roberta_pl`` (the flow runs one way);
- nothing imports an entry point (``roberta_pl.train``, ``roberta_pl.finetune.app``) or a ``cli`` module:
  entry points import the run harness and the rooms, never each other.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENTRY_POINTS = ("roberta_pl.train", "roberta_pl.finetune.app", "roberta_pl.cli")


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


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")


def package_files(*packages: str) -> list[Path]:
    return sorted(p for pkg in packages for p in (ROOT / pkg).rglob("*.py"))


def test_model_imports_neither_lightning_nor_data():
    bad = {m for m in imports_of(ROOT / "roberta_pl" / "model.py")
           if m.split(".")[0] in ("lightning", "pytorch_lightning", "data_pipelines", "webdataset")}
    assert not bad, bad


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


def test_the_rules_see_a_violation(tmp_path):
    # The checker itself: a file that breaks each rule is caught.
    f = tmp_path / "x.py"
    f.write_text("import lightning\nfrom roberta_pl.cli.export import main\n\ndef g():\n    from roberta_pl.train import run\n")
    assert {"lightning", "roberta_pl.cli.export", "roberta_pl.train", "roberta_pl.train.run"} <= imports_of(f)
