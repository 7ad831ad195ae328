"""The docs stay true: the site builds with warnings as errors, the generated reference matches the code, the README
stays the front door (at most 150 lines), and every `roberta-pl-*` command in README.md, docs/**/*.md and
launch/README.md runs.

What "runs" means, per command (a command is a line of a bash/sh/console or unlabelled fenced block that starts with
`roberta-pl-`, `\\` continuations joined, `#` comments dropped):

- `roberta-pl-train` / `roberta-pl-finetune` (Hydra): composed with the user's overrides plus `--cfg job`, which must
  exit 0. Composing reads no file, so placeholders such as /data/shards are fine. A `-m` sweep is composed once per
  swept value (Hydra refuses `--cfg` with `-m`).
- the argparse commands: their own parser, built by their own `main`, must accept the flags (parsing stops the
  command before it does anything: no file is read).
- blocks marked `<!-- run -->` or `<!-- run: PROG[ SUB]: extra args; ... -->` (an HTML comment the site does not
  show) run for real, in order, in one workspace shared by all files (README.md first, then the guides), with
  /data/, /shared/ and /tmp/ paths moved into it and the extra args appended (e.g. `trainer.max_steps=2`). The
  workspace holds a small corpus at data/corpus/ and a sentences.txt.
- launch/README.md's blocks marked `<!-- slurm-check: nodes=N -->` are submitted with sbatch, as written, to a real
  local 2-node Slurm cluster, with fewer steps and the session's small tokenizer and shards in place of /tmp/tok and
  /tmp/shards.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import filecmp
import io
import itertools
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md")), ROOT / "launch" / "README.md"]
# The order a reader follows: the README's quickstart makes the checkpoint the fine-tuning guide starts from.
RUN_ORDER = ["README.md", "docs/guides/own-data.md", "docs/guides/fine-tuning.md"]
HYDRA_APPS = ("roberta-pl-train", "roberta-pl-finetune", "roberta-pl-eval")
SHELL_LANGS = {"", "bash", "sh", "shell", "console"}
PLACEHOLDER_ROOTS = re.compile(r"(?<![\w.])/(data|shared|tmp)/")
ENV = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "COLUMNS": "100"}


# -- reading commands out of Markdown --------------------------------------------------------------------------

@dataclasses.dataclass
class Command:
    file: str  # relative to the repository root
    line: int  # of the command's first line in the file
    argv: list[str]
    marker: str | None  # the HTML comment before the block: "run", "run: ...", "slurm-check: nodes=1", or None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}: {shlex.join(self.argv)}"


@dataclasses.dataclass
class Block:
    file: str
    line: int
    lang: str
    lines: list[tuple[int, str]]  # (line number, text)
    marker: str | None


def fenced_blocks(path: Path) -> list[Block]:
    """The fenced code blocks of a Markdown file, each with the HTML comment on the last non-blank line before it."""
    rel = path.relative_to(ROOT).as_posix()
    blocks, current, fence, previous = [], None, "", ""
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        text = raw.strip()
        if current is None:
            if text.startswith("```"):
                fence = text[: len(text) - len(text.lstrip("`"))]
                marker = previous[4:-3].strip() if previous.startswith("<!--") and previous.endswith("-->") else None
                current = Block(rel, number, text[len(fence):].strip().split(" ")[0].lower(), [], marker)
            elif text:
                previous = text
        elif text.startswith(fence) and text.strip("`") == "":
            blocks.append(current)
            current, previous = None, ""
        else:
            current.lines.append((number, raw))
    return blocks


def commands_in(block: Block) -> list[Command]:
    """The `roberta-pl-*` commands of a shell block: continuations joined, comments dropped, shell-split."""
    if block.lang not in SHELL_LANGS:
        return []
    out, pending, start = [], "", 0
    for number, raw in block.lines:
        if not pending:
            start = number
        stripped = raw.rstrip()
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text, pending = pending + stripped, ""
        if not text.lstrip().startswith("roberta-pl-"):
            continue
        try:
            argv = shlex.split(text, comments=True)
        except ValueError as e:  # unbalanced quotes: reported by the checks as a command that cannot run
            argv = [text.split()[0], f"<{e}: {text.strip()}>"]
        out.append(Command(block.file, start, argv, block.marker))
    return out


def documented_commands() -> list[Command]:
    return [c for path in DOC_FILES for block in fenced_blocks(path) for c in commands_in(block)]


def console_scripts() -> dict[str, str]:
    import tomllib

    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def run_extras(marker: str | None, argv: list[str]) -> list[str] | None:
    """None when the command's block is not marked to run; else the extra args the marker gives this command."""
    if marker is None or not (marker == "run" or marker.startswith("run:")):
        return None
    extras: list[str] = []
    for part in marker[4:].split(";") if marker.startswith("run:") else []:
        target, _, args = part.partition(":")
        words = target.split()
        if words and argv[: len(words)] == words:
            extras += shlex.split(args)
    return extras


def sweep_variants(args: list[str]) -> list[list[str]]:
    """A `-m` command's overrides as plain runs: one per swept value (others at their first value)."""
    rest = [a for a in args if a not in ("-m", "--multirun")]
    if len(rest) == len(args):
        return [args]
    swept = {i: a.split("=", 1)[1].split(",") for i, a in enumerate(rest)
             if "=" in a and "," in a.split("=", 1)[1] and not re.search(r"[\[\]{}()'\"]", a)}
    variants = []
    for i, values in swept.items():
        for value in values:
            variant = [f"{a.split('=', 1)[0]}={value if j == i else swept[j][0]}" if j in swept else a
                       for j, a in enumerate(rest)]
            variants.append(variant)
    return variants or [rest]


# -- the checker process: run as `python tests/integration/test_docs.py check < commands.json` -------------------

class _Parsed(Exception):
    """Raised by the patched ArgumentParser.parse_args once the arguments parsed: the command stops there."""


def check_commands(commands: list[dict]) -> list[dict]:
    """Compose each Hydra command with `--cfg job`, parse each argparse command's flags; in this one process."""
    import importlib

    from hydra.core.global_hydra import GlobalHydra

    scripts = console_scripts()
    original = argparse.ArgumentParser.parse_args
    results = []
    for cmd in commands:
        prog, args = cmd["argv"][0], cmd["argv"][1:]
        module, func = scripts[prog].split(":")
        main = getattr(importlib.import_module(module), func)
        hydra = prog in HYDRA_APPS
        variants = sweep_variants(args) if hydra else [args]
        for variant in variants:
            if hydra and not {"--help", "-h", "--cfg", "-c"} & set(variant):
                variant = [*variant, "--cfg", "job"]
            out, code = io.StringIO(), 0

            def parse_then_stop(self, a=None, namespace=None):
                ns = original(self, a, namespace)
                raise _Parsed(ns)

            if not hydra:
                argparse.ArgumentParser.parse_args = parse_then_stop
            saved = sys.argv
            sys.argv = [prog, *variant]
            try:
                with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
                    main() if hydra else main(variant)
            except _Parsed:
                code = 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if not isinstance(e.code, (int, type(None))):
                    out.write(str(e.code))
            except Exception as e:  # noqa: BLE001  (reported with the command that raised it)
                code, _ = 1, out.write(f"{type(e).__name__}: {e}")
            finally:
                sys.argv = saved
                argparse.ArgumentParser.parse_args = original
                GlobalHydra.instance().clear()
            results.append({**cmd, "variant": variant, "code": code, "output": out.getvalue()[-1500:]})
    return results


@pytest.fixture(scope="module")
def checked_commands(tmp_path_factory) -> list[dict]:
    """Every documented command checked once, in one process (imports once); run in an empty directory."""
    commands = [dataclasses.asdict(c) for c in documented_commands()] + MISSPELT
    cwd = tmp_path_factory.mktemp("docs-compose")
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "check"], input=json.dumps(commands),
                          capture_output=True, text=True, cwd=cwd, env={**ENV, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


# Checked with the documented commands, to show the checker fails on a bad flag and a bad key.
MISSPELT = [{"file": "<misspelt>", "line": 1, "argv": ["roberta-pl-plan", "--nodez", "2"], "marker": None},
            {"file": "<misspelt>", "line": 2, "argv": ["roberta-pl-train", "optim.lrr=1e-3"], "marker": None}]


def _documented(results: list[dict]) -> list[dict]:
    return [r for r in results if r["file"] != "<misspelt>"]


def _failures(results: list[dict]) -> str:
    return "\n\n".join(f"{r['file']}:{r['line']}: {shlex.join(r['argv'])}\n  checked as: {shlex.join(r['variant'])}\n"
                       f"  exit {r['code']}: {r['output'].strip()[-800:]}" for r in results if r["code"] != 0)


# -- tests ---------------------------------------------------------------------------------------------------

def test_readme_is_the_front_door_at_most_150_lines():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move details into docs/"


def test_command_extraction_joins_continuations_and_drops_comments(tmp_path, monkeypatch):
    doc = tmp_path / "x.md"
    doc.write_text("text\n\n<!-- run: roberta-pl-data tokenizer: --vocab-size 8 -->\n```bash\n"
                   "roberta-pl-data tokenizer /data/c --out /data/t   # a comment\n"
                   "roberta-pl-train a=1 \\\n    'b=\"x y\"' c=2\nmake quickstart\n```\n\n```python\nroberta-pl-no\n```\n")
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    blocks = fenced_blocks(doc)
    found = [c for b in blocks for c in commands_in(b)]
    assert [c.argv for c in found] == [["roberta-pl-data", "tokenizer", "/data/c", "--out", "/data/t"],
                                       ["roberta-pl-train", "a=1", 'b="x y"', "c=2"]]
    assert [c.line for c in found] == [5, 6]
    assert run_extras(found[0].marker, found[0].argv) == ["--vocab-size", "8"]
    assert run_extras(found[0].marker, found[1].argv) == []
    assert sweep_variants(["-m", "optim.lr=1,2", "x=3"]) == [["optim.lr=1", "x=3"], ["optim.lr=2", "x=3"]]


def test_the_docs_show_the_commands_this_test_relies_on():
    commands = documented_commands()
    where = {(c.file, c.argv[0]) for c in commands}
    assert ("README.md", "roberta-pl-train") in where and ("docs/guides/own-data.md", "roberta-pl-data") in where
    readme_run = [c for c in commands if c.file == "README.md" and run_extras(c.marker, c.argv) is not None]
    assert ["roberta-pl-train", "experiment=quickstart"] in [c.argv for c in readme_run]
    assert {c.argv[0] for c in commands} <= set(console_scripts()), "a documented command that is not installed"
    assert [nodes for nodes, _ in slurm_checks()] == [1, 2]


@pytest.mark.slow
def test_documented_hydra_commands_compose_with_cfg_job(checked_commands):
    results = [r for r in _documented(checked_commands) if r["argv"][0] in HYDRA_APPS]
    assert len(results) >= 20, len(results)
    assert not _failures(results), _failures(results)


@pytest.mark.slow
def test_documented_argparse_commands_accept_their_flags(checked_commands):
    results = [r for r in _documented(checked_commands) if r["argv"][0] not in HYDRA_APPS]
    assert {r["argv"][0] for r in results} >= {"roberta-pl-data", "roberta-pl-export", "roberta-pl-fill-mask",
                                                "roberta-pl-embed", "roberta-pl-plan"}
    assert not _failures(results), _failures(results)


@pytest.mark.slow
def test_a_misspelt_flag_or_key_fails_the_check(checked_commands):
    """The checker can fail: a wrong argparse flag and a wrong Hydra key are both reported."""
    plan, train = [r for r in checked_commands if r["file"] == "<misspelt>"]
    assert plan["code"] == 2 and "--nodez" in plan["output"], plan
    assert train["code"] != 0 and "optim.lrr" in train["output"], train


@pytest.mark.slow
def test_site_builds_with_warnings_as_errors(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for page in ("index.html", "guides/quickstart/index.html", "reference/pretrain-config/index.html",
                 "reference/cli/index.html", "reliability/index.html", "architecture/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    # The run markers stay HTML comments in the pages (never escaped into visible text).
    assert "&lt;!-- run" not in (tmp_path / "site" / "guides" / "quickstart" / "index.html").read_text()


@pytest.mark.slow
def test_generated_reference_is_current(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "docs" / "gen_reference.py"), "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    committed = ROOT / "docs" / "reference"
    fresh = sorted(p.name for p in tmp_path.glob("*.md"))
    assert sorted(p.name for p in committed.glob("*.md")) == fresh, "docs/reference/ holds pages the generator does not write"
    shallow = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--is-shallow-repository"], capture_output=True,
                             text=True).stdout.strip() == "true"
    # The performance page stamps each figure with its commit, which a shallow clone cannot tell.
    stale = [name for name in fresh if not (shallow and name == "performance.md")
             and not filecmp.cmp(committed / name, tmp_path / name, shallow=False)]
    assert not stale, f"docs/reference/{', '.join(stale)} out of date with the code: run `make docs` and commit them"


# -- running marked blocks for real --------------------------------------------------------------------------

def marked_runs() -> dict[str, list[tuple[Command, list[str]]]]:
    out: dict[str, list[tuple[Command, list[str]]]] = {}
    for cmd in documented_commands():
        extras = run_extras(cmd.marker, cmd.argv)
        if extras is not None:
            out.setdefault(cmd.file, []).append((cmd, extras))
    order = {name: i for i, name in enumerate(RUN_ORDER)}
    return dict(sorted(out.items(), key=lambda kv: order.get(kv[0], len(order))))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, corpus_docs):
    """Where the marked blocks run, one after another: a small corpus at data/corpus/, a sentences.txt."""
    from data_fixtures import write_corpus_dir

    ws = tmp_path_factory.mktemp("docs-workspace")
    (ws / "data").mkdir()
    write_corpus_dir(ws / "data", corpus_docs, files=2)
    (ws / "sentences.txt").write_text("Return the list.\nOpen the file and read it.\n")
    return ws


def run_for_real(cmd: Command, extras: list[str], ws: Path) -> subprocess.CompletedProcess:
    module, func = console_scripts()[cmd.argv[0]].split(":")
    args = [PLACEHOLDER_ROOTS.sub(lambda m: f"{ws}/{m.group(1)}/", a) for a in [*cmd.argv[1:], *extras]]
    code = f"import sys; from {module} import {func} as main; sys.argv[0] = {cmd.argv[0]!r}; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=ws, capture_output=True, text=True,
                          env={**ENV, "PYTHONPATH": str(ROOT)}, timeout=900)  # this checkout's code


@pytest.mark.slow
@pytest.mark.parametrize("doc", list(marked_runs()))
def test_marked_blocks_run_for_real(doc, workspace):
    for cmd, extras in marked_runs()[doc]:
        proc = run_for_real(cmd, extras, workspace)
        assert proc.returncode == 0, f"{cmd.where} {shlex.join(extras)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    if doc == "README.md":  # the quickstart trained, exported and filled masks
        assert (workspace / "runs" / "quickstart" / "hf" / "model.safetensors").is_file()
    if doc == "docs/guides/own-data.md":
        assert json.loads((workspace / "data" / "shards" / "manifest.json").read_text())
        assert (workspace / "my_small_hf" / "config.json").is_file()


# -- launch/README.md's quick checks on a real local Slurm cluster -------------------------------------------------

def slurm_checks() -> list[tuple[int, Command]]:
    """(nodes, the sbatch command) of each `<!-- slurm-check: nodes=N -->` block of launch/README.md."""
    out = []
    for block in fenced_blocks(ROOT / "launch" / "README.md"):
        if not (block.marker or "").startswith("slurm-check"):
            continue
        nodes = int(re.search(r"nodes=(\d+)", block.marker).group(1))
        text = "\n".join(raw for _, raw in block.lines).replace("\\\n", " ")
        for line in text.splitlines():
            argv = shlex.split(line, comments=True)
            if argv[:1] == ["sbatch"]:
                out.append((nodes, Command(block.file, block.line, argv, block.marker)))
    return out


SLURM_SHORTER = ["trainer.max_time=null", "trainer.max_steps=2", "optim.warmup_steps=1", "trainer.val_every_n_steps=2",
                 "trainer.limit_val_batches=1", "trainer.enable_progress_bar=false"]


@pytest.mark.slow
def test_launch_readme_slurm_quick_checks_run_on_a_local_2_node_cluster(tmp_path_factory, tmp_path, shard_dir,
                                                                       tokenizer_dir):
    """Both quick checks, on one 2-node local cluster (the 1-node check runs on one of its nodes): the sbatch lines
    as written, with 2 steps instead of a budget or 30, no W&B, and the session's tokenizer and shards in place of
    /tmp/tok and /tmp/shards (building those is the own-data guide's test)."""
    from slurm_helpers import REPO_ROOT, job_log, start_cluster

    cluster = start_cluster(tmp_path_factory.mktemp("slurm-docs"), nodes=2)
    try:
        for nodes, cmd in slurm_checks():
            argv = [a.replace("/tmp/shards", str(shard_dir)).replace("/tmp/tok", str(tokenizer_dir)) for a in cmd.argv]
            script_at = next(i for i, a in enumerate(argv) if a.endswith(".sbatch"))
            job_name = next(a.split("=", 1)[1] for a in argv if a.startswith("--job-name="))
            job = cluster.submit(REPO_ROOT / argv[script_at], *argv[1:script_at], cwd=tmp_path,
                                 script_args=[*argv[script_at + 1:], *SLURM_SHORTER],
                                 env={"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "LOGGER": "none",
                                      "PYTHONPATH": str(ROOT)})
            log = job_log(tmp_path / "runs" / job_name, job_name, job)  # where launch/README.md says the log is
            try:
                info = cluster.wait_for_state(job, "COMPLETED", timeout=420)
            except AssertionError as err:
                raise AssertionError(f"{cmd.where}\n{err}\n{log.read_text()[-4000:] if log.exists() else 'no log'}") from None
            finally:
                cluster.cancel(job)
            text = log.read_text()
            assert f"{nodes} node(s)" in text and "Done: 2 steps" in text, (cmd.where, info, text[-3000:])
            if nodes == 2:
                assert "rendezvous 127.0.0.1:" in text, text[-3000:]
    finally:
        cluster.stop()


if __name__ == "__main__" and sys.argv[1:] == ["check"]:
    print(json.dumps(check_commands(json.loads(sys.stdin.read()))))
