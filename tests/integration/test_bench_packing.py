"""The packing-modes bench runs end to end on CPU and writes a complete, sane JSON (no timing asserts)."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_packing_bench_compares_the_three_modes_on_both_corpora(tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "packing_throughput.py"), "--seq-lens", "32", "--tokens-per-step", "128",
           "--steps", "1", "--rounds", "2", "--warmup", "1", "--long-files", "5", "--out-dir", str(tmp_path)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    record = json.loads((tmp_path / "packing_throughput.json").read_text())
    assert set(record["corpora"]) == {"default", "stdlib_files"}
    # The long-document corpus has longer documents than the docstrings.
    assert record["corpora"]["stdlib_files"]["mean_tokens"] > 3 * record["corpora"]["default"]["mean_tokens"]
    rows = {(r["corpus"], r["mode"]): r for r in record["rows"]}
    assert set(rows) == {(c, m) for c in ("default", "stdlib_files") for m in ("full_sentences", "doc", "packed_docs")}
    for (corpus, mode), r in rows.items():
        assert r["tokens_per_s"] > 0 and math.isfinite(r["tokens_per_s"]) and len(r["round_step_ms"]) == 2
        # Only doc mode pads: its real tokens are a fraction of its tokens; the other two are all real.
        assert (r["real_fraction"] < 1) == (mode == "doc"), (corpus, mode)
        assert r["real_tokens_per_s"] == pytest.approx(r["tokens_per_s"] * r["real_fraction"])
    assert rows["default", "packed_docs"]["documents_per_row"] > 1  # 32-token rows hold several docstrings
