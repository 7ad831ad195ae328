"""``roberta-pl-data``: the three subcommands end to end, help text, and one-line user errors."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from data_fixtures import corpus_file, shard_dir, tokenizer_dir  # noqa: F401

from data_pipelines.cli import main


def test_tokenizer_shards_inspect_end_to_end(tmp_path, corpus_file, capsys):
    tok_dir, shard_dir = tmp_path / "tok", tmp_path / "shards"
    assert main(["-q", "tokenizer", "--out", str(tok_dir), "--vocab-size", "500", "--input-sentence-size", "20000", str(corpus_file)]) == 0
    out = capsys.readouterr().out
    assert "vocab 500" in out
    meta = json.loads((tok_dir / "tokenizer_meta.json").read_text())
    assert 0 < meta["lines_sampled"] == meta["lines_read"] <= 20_000  # a small corpus: every line is sampled
    assert f"sampled {meta['lines_read']:,} of {meta['lines_read']:,} lines for training (at most --input-sentence-size 20,000)" in out
    assert main(["-q", "shards", "--tokenizer", str(tok_dir), "--out", str(shard_dir), "--num-shards", "3",
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
    assert "--num-shards" in shards_help and "--num-tasks" in shards_help and "--valid-fraction" in shards_help
    bad = subprocess.run([sys.executable, "-m", "data_pipelines.cli", "shards"], cwd=root, capture_output=True, text=True)
    assert bad.returncode == 2 and "required" in bad.stderr


def test_inspect_reports_unused_blocks_per_epoch(shard_dir, capsys):
    from data_pipelines.epochs import plan_epoch
    from data_pipelines.manifest import resolve_shards
    from data_pipelines.stream import StreamConfig

    settings = ["--seq-len", "64", "--micro-batch-size", "4", "--world-size", "2", "--num-workers", "3", "--batch-multiple", "2"]
    assert main(["inspect", str(shard_dir), "--json", "--samples", "0", *settings]) == 0
    plan = json.loads(capsys.readouterr().out)["epoch_plan"]
    expected = plan_epoch(StreamConfig(shards=resolve_shards(shard_dir), seq_len=64, batch_size=4, world_size=2, num_workers=3, batch_multiple=2))
    assert plan["unused_blocks"] == expected.unused_blocks < 2 * 4 * 2
    assert plan["unused_tokens"] == expected.unused_tokens and plan["exact"]
    assert main(["inspect", str(shard_dir), "--samples", "0", *settings]) == 0
    out = capsys.readouterr().out
    assert f"{plan['unused_blocks']:,} of {plan['total_blocks']:,} blocks" in out and "left unused per epoch" in out


def test_shards_as_a_job_array_task_then_merge(tmp_path, corpus_file, tokenizer_dir, capsys, monkeypatch):
    # Inside a Slurm job array the task comes from the environment (here array 3-4: task index 1 of 2, then 0).
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    docs = corpus_file.read_text().split("\n\n")
    for i in range(2):
        (corpus / f"part-{i}.txt").write_text("\n\n".join(docs[i::2]))
    args = ["-q", "shards", "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "s"), "--num-shards", "4",
            "--workers", "0", str(corpus)]
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "3")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "4")
    assert main(args) == 0
    assert "task 1 of 2: wrote its shards (2 train)" in capsys.readouterr().out
    assert main(["merge-manifests", str(tmp_path / "s")]) == 2
    assert "1 of 2 tasks have not finished (task 0)" in capsys.readouterr().err
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert main(args) == 0
    assert "train: 4 shards" in capsys.readouterr().out  # the last task merged
    assert main(["merge-manifests", str(tmp_path / "s")]) == 0
    assert "bytes/token" in capsys.readouterr().out
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "7")
    assert main(args) == 2
    assert "--array=0-1" in capsys.readouterr().err


def test_inspect_reports_the_whitespace_share_and_whitespace_pieces_lower_it(tmp_path, capsys):
    """Python source shipped with the interpreter (indented code nobody here wrote) through the CLI: the
    tokenizer's whitespace pieces (the default) against --no-whitespace-pieces, read back by inspect."""
    import importlib

    corpus = tmp_path / "code.txt"
    corpus.write_text("\n\n".join(Path(importlib.import_module(m).__file__).read_text()
                                  for m in ("argparse", "dataclasses", "enum", "textwrap", "shlex")))
    shares = {}
    for name, flag in (("pieces", []), ("none", ["--no-whitespace-pieces"])):
        tok, shards = tmp_path / f"tok-{name}", tmp_path / f"shards-{name}"
        assert main(["-q", "tokenizer", "--out", str(tok), "--vocab-size", "1000", *flag, str(corpus)]) == 0
        assert main(["-q", "shards", "--tokenizer", str(tok), "--out", str(shards), "--workers", "0", str(corpus)]) == 0
        capsys.readouterr()
        assert main(["inspect", str(shards), "--json", "--samples", "0"]) == 0
        shares[name] = json.loads(capsys.readouterr().out)["whitespace"]
        assert main(["inspect", str(shards), "--samples", "0"]) == 0
        shown = capsys.readouterr().out
        assert f"whitespace-only tokens: {shares[name]['whitespace_share']:.1%}" in shown
        assert ("a token per space here" in shown) == (shares[name]["bare_space_share"] > 0.1)
    print(shares)
    assert shares["none"]["bare_space_share"] > 0.2  # one "▁" per space of indentation
    assert shares["pieces"]["whitespace_share"] < shares["none"]["whitespace_share"] / 2
    assert shares["pieces"]["tokens_read"] < shares["none"]["tokens_read"] * 0.85


def help_texts() -> dict[str, str]:
    """``--help`` of every argparse console script and subcommand, as a user sees it."""
    from roberta_pl.cli import embed, export, fill_mask, plan

    texts = {}
    from data_pipelines.cli import build_parser

    (commands,) = [a.choices for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)]
    for name, entry, argv in [("roberta-pl-data", main, []), *[(f"roberta-pl-data {c}", main, [c]) for c in commands],
                              ("roberta-pl-export", export.main, []), ("roberta-pl-fill-mask", fill_mask.main, []),
                              ("roberta-pl-embed", embed.main, []), ("roberta-pl-plan", plan.main, [])]:
        with pytest.raises(SystemExit) as done, contextlib.redirect_stdout(io.StringIO()) as out:
            entry([*argv, "--help"])
        assert done.value.code == 0, name
        texts[name] = out.getvalue()
    return texts  # roberta-pl-train and roberta-pl-finetune print Hydra help templates, with no "(default" lines


def test_help_states_each_default_once_and_never_none():
    """argparse's ArgumentDefaultsHelpFormatter printed "(default: 160) (default: None)" where the help said
    the default itself, and "(default: None)" where unset means something (all cores, the model's length)."""
    texts = help_texts()
    assert {"roberta-pl-data tokenizer", "roberta-pl-data inspect", "roberta-pl-data demo-task"} <= set(texts)
    for name, text in texts.items():
        flat = " ".join(text.split())  # help lines wrap; an option's text is checked as one line
        assert "(default: None)" not in flat, name
        assert not re.search(r"\(default[^()]*\)[^()]{0,3}\(default", flat), (name, flat)
        for option in re.split(r"\s(?=--?[a-z])", flat):  # one option's help: its default once at most
            assert option.count("(default") <= 1, (name, option)
    assert "(default: 160, 250 topics)" in texts["roberta-pl-data demo-task"] and "(default: 0)" in texts["roberta-pl-data tokenizer"]


def test_demo_task_topics_writes_a_five_way_task(tmp_path, capsys):
    import csv

    assert main(["demo-task", str(tmp_path / "topics"), "--kind", "topics", "--train", "60", "--valid", "40"]) == 0
    train = list(csv.DictReader((tmp_path / "topics" / "train.csv").open()))
    assert len(train) == 60 and len({row["source"] for row in train}) == 5
    assert "task=sequence_classification task.label_column=source" in capsys.readouterr().out
