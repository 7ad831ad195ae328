"""``roberta-pl-data``: the three subcommands end to end, help text, and one-line user errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from data_fixtures import corpus_file, shard_dir, tokenizer_dir  # noqa: F401
from data_pipelines.cli import main


def test_tokenizer_shards_inspect_end_to_end(tmp_path, corpus_file, capsys):
    tok_dir, shard_dir = tmp_path / "tok", tmp_path / "shards"
    assert main(["-q", "tokenizer", "--out", str(tok_dir), "--vocab-size", "500", "--input-sentence-size", "20000", str(corpus_file)]) == 0
    assert "vocab 500" in capsys.readouterr().out
    assert main(["-q", "shards", "--tokenizer", str(tok_dir), "--out", str(shard_dir), "--docs-per-shard", "300",
                 "--valid-fraction", "0.1", "--workers", "0", str(corpus_file)]) == 0
    out = capsys.readouterr().out
    assert "train: " in out and "valid: " in out and "train-{000000.." in out
    assert main(["inspect", str(shard_dir), "--json", "--samples", "1"]) == 0
    summary = json.loads(capsys.readouterr().out)
    manifest = json.loads((shard_dir / "manifest.json").read_text())
    assert summary["splits"]["train"]["num_docs"] == manifest["splits"]["train"]["num_docs"]
    assert sum(c for _, _, c in summary["histogram"]) == summary["lengths"]["docs_read"] > 0
    # The decoded sample is real text from the corpus.
    assert summary["samples"][0][:40] in corpus_file.read_text()
    assert main(["inspect", str(shard_dir)]) == 0  # the rich table renders
    assert "document length" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["tokenizer", "--out", "{tmp}/t", "{tmp}/missing.txt"], "missing.txt: missing file"),
        (["shards", "--tokenizer", "{tmp}", "--out", "{tmp}/s", "{tmp}/x.txt"], "not a tokenizer directory"),
        (["inspect", "{tmp}"], "no manifest"),
        (["tokenizer", "--out", "{tmp}/c.txt/sub", "{tmp}/c.txt"], "c.txt/sub: Not a directory"),
    ],
)
def test_user_errors_are_one_line_with_exit_code_2(tmp_path, capsys, argv, message):
    (tmp_path / "c.txt").write_text("a corpus file, so c.txt/sub cannot be a directory\n")
    code = main([a.format(tmp=tmp_path) for a in argv])
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_help_lists_subcommands_with_defaults():
    root = Path(__file__).resolve().parents[2]
    out = subprocess.run([sys.executable, "-m", "data_pipelines.cli", "--help"], cwd=root, capture_output=True, text=True, check=True).stdout
    for sub in ("tokenizer", "shards", "inspect"):
        assert sub in out
    shards_help = subprocess.run([sys.executable, "-m", "data_pipelines.cli", "shards", "--help"], cwd=root,
                                 capture_output=True, text=True, check=True).stdout
    assert "(default: 10000)" in shards_help and "--valid-fraction" in shards_help
    bad = subprocess.run([sys.executable, "-m", "data_pipelines.cli", "shards"], cwd=root, capture_output=True, text=True)
    assert bad.returncode == 2 and "required" in bad.stderr


def test_inspect_reports_unused_blocks_per_epoch(shard_dir, capsys):
    from data_pipelines.stream import StreamConfig, plan_epoch, resolve_shards

    settings = ["--seq-len", "64", "--micro-batch-size", "4", "--world-size", "2", "--num-workers", "3", "--batch-multiple", "2"]
    assert main(["inspect", str(shard_dir), "--json", "--samples", "0", *settings]) == 0
    plan = json.loads(capsys.readouterr().out)["epoch_plan"]
    expected = plan_epoch(StreamConfig(shards=resolve_shards(shard_dir), seq_len=64, batch_size=4, world_size=2, num_workers=3, batch_multiple=2))
    assert plan["unused_blocks"] == expected.unused_blocks < 2 * 4 * 2
    assert plan["unused_tokens"] == expected.unused_tokens and plan["exact"]
    assert main(["inspect", str(shard_dir), "--samples", "0", *settings]) == 0
    out = capsys.readouterr().out
    assert f"{plan['unused_blocks']:,} of {plan['total_blocks']:,} blocks" in out and "left unused per epoch" in out
