"""The shape of the house, checked on the source: entry points stay thin (the run skeleton is written once, in
roberta_pl/harness.py), and no source file grows into a room that holds unrelated things."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENTRY_POINTS = [ROOT / "roberta_pl" / "pretraining" / "app.py", ROOT / "roberta_pl" / "finetune" / "app.py"]


def test_entry_points_are_at_most_80_lines_and_run_through_the_one_skeleton():
    for path in ENTRY_POINTS:
        lines = path.read_text().splitlines()
        assert len(lines) <= 80, f"{path.relative_to(ROOT)}: {len(lines)} lines"
        tree = ast.parse(path.read_text())
        calls = {n.func.attr for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)}
        assert "fit" not in calls, f"{path.relative_to(ROOT)} calls fit itself instead of the harness's run()"
        assert any(isinstance(n, ast.Call) and getattr(n.func, "id", None) == "RunSpec" for n in ast.walk(tree))


def test_no_source_file_is_over_about_450_lines():
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text().splitlines())
             for pkg in ("roberta_pl", "data_pipelines") for p in (ROOT / pkg).rglob("*.py")}
    assert not {p: n for p, n in sizes.items() if n > 480}, sorted(sizes.items(), key=lambda kv: -kv[1])[:5]
