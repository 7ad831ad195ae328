"""The install is reproducible: constraints.txt pins the tested set, and pyproject's floors are that set."""

from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[2]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_every_declared_dependency_is_pinned_at_its_floor():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = [*project["dependencies"], *[d for extra in project["optional-dependencies"].values() for d in extra]]
    pins = _pins()
    assert not any(name.startswith(("torch", "nvidia-")) and name != "torchmetrics" for name in pins), \
        "torch comes from TORCH_SPEC (or the user's own CUDA build), never from the constraints"
    for spec in declared:
        name, _, floor = spec.partition(">=")
        if name == "torch" or name.startswith("roberta-pl"):
            continue  # a range on purpose (GPU users keep their build); the project's own extra
        assert pins.get(name.lower()) == floor, f"{name}: floor {floor} but constraints.txt pins {pins.get(name.lower())}"


def test_make_install_uses_the_constraints_and_lock_rewrites_them():
    makefile = (ROOT / "Makefile").read_text()
    assert "CONSTRAINTS ?= constraints.txt" in makefile and "-c $(CONSTRAINTS)" in makefile
    assert "\nlock:" in makefile and "> constraints.txt.new" in makefile
