"""The records of a shard directory: the job's plan, each task's record, and the ``manifest.json`` merged from
them; read back, checked, and used to resolve a shard spec into the shards of a split with their counts.

Layout of an output directory::

    manifest.json              shards per split with doc/token/byte counts, tokenizer hash, skipped inputs
    train-000000.tar ...       WebDataset shards, many documents per sample (data_pipelines.shard_format)
    valid-000000.tar ...
    .plan.json                 the settings and layout of the run; a rerun with other settings is refused
    .tasks/task-00000-of-00001.json   what each task wrote; the last task to finish merges them into manifest.json

A task of the writer (:mod:`data_pipelines.shard_tasks`) records what it wrote in ``.tasks/``; the last task to
finish merges the records into ``manifest.json`` (:func:`merge_manifests`; ``roberta-pl-data merge-manifests`` does
it by hand). Every shard the manifest names is a plain file name inside its directory (:func:`check_shard_names`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from data_pipelines import shard_format
from data_pipelines.errors import DataError, SkipReport
from data_pipelines.shard_format import FORMAT_VERSION, REWRITE_HINT, format1_message

log = logging.getLogger("data_pipelines")

MANIFEST = "manifest.json"
PLAN = ".plan.json"
TASKS_DIR = ".tasks"
PARTIAL_SUFFIX = ".partial"
SPLITS = ("train", "valid")


def shard_name(split: str, index: int) -> str:
    """File name of shard ``index`` of ``split``, e.g. ``train-000003.tar``."""
    return f"{split}-{index:06d}.tar"


def check_shard_names(record: dict, where: str | os.PathLike) -> None:
    """Refuse a manifest (or task record) whose shard names would reach outside its directory.

    The writer names every shard :func:`shard_name` (``train-000003.tar``), a plain file name read as
    ``<directory>/<name>``; an absolute path, ``..`` or a path separator would make a manifest from
    elsewhere read (or, for a record, vouch for) any file on the machine.

    Args:
        record: a manifest or task record: ``{"splits": {split: {"shards": [...]}}}`` (manifest) or
            ``{"splits": {split: [...]}}`` (record), each shard ``{"name", ...}``.
        where: the file it was read from, for the message.

    Raises:
        DataError: one line naming the file and the entry.
    """
    splits = record.get("splits")
    if not isinstance(splits, dict):
        raise DataError(f"{where}: corrupt manifest (no 'splits' object)")
    for split, value in splits.items():
        entries = value.get("shards") if isinstance(value, dict) else value
        if not isinstance(entries, list):
            raise DataError(f"{where}: corrupt manifest (splits.{split} has no list of shards)")
        for i, entry in enumerate(entries):
            name = entry.get("name") if isinstance(entry, dict) else None
            if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name
                    or os.path.isabs(name)):
                raise DataError(f"{where}: shard entry splits.{split}[{i}] has name {name!r}, not a plain file name "
                                f"inside the shard directory (the writer names shards like {shard_name(split, i)}); "
                                f"refusing a path that leaves the directory: rewrite the shards with "
                                f"`roberta-pl-data shards`")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``path`` so that it only ever holds the whole text (a temporary file, then a rename)."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}{PARTIAL_SUFFIX}")
    tmp.write_text(text)
    os.replace(tmp, path)


def task_record_name(task: int, num_tasks: int) -> str:
    """File name (under ``.tasks/``) of what task ``task`` of ``num_tasks`` wrote."""
    return f"task-{task:05d}-of-{num_tasks:05d}.json"


def plan_digest(plan: dict) -> str:
    """A short hash of a job's plan, which each task record carries: a record of another plan is not this job's."""
    return hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]


def check_plan(out: Path, plan: dict) -> None:
    """Write the job's plan into ``out``, or refuse a directory that holds shards written with other settings."""
    plan_path = out / PLAN
    if plan_path.exists():
        previous = json.loads(plan_path.read_text())
        if previous != plan:
            if previous.get("format") == 1:
                raise DataError(f"{out}: holds shards of format 1; write the new shards into a new directory")
            changed = sorted(k for k in set(plan) | set(previous) if previous.get(k) != plan.get(k))
            raise DataError(f"{out}: holds shards written with other settings ({', '.join(changed)}); use a new directory")
    else:
        atomic_write_text(plan_path, json.dumps(plan, indent=2) + "\n")


def task_done(out: Path, record_path: Path, digest: str) -> dict | None:
    """The task's record when it finished under this plan and all its shards are still there, else None."""
    if not record_path.exists():
        return None
    record = json.loads(record_path.read_text())
    if record.get("plan") != digest:
        return None
    for entries in record["splits"].values():
        for s in entries:
            p = out / s["name"]
            if not p.exists() or p.stat().st_size != s["num_bytes"]:
                return None
    return record


def _task_records(out: Path) -> tuple[dict, list[dict]]:
    """The plan and every task's record of a shard directory; a DataError naming the unfinished tasks."""
    plan_path = out / PLAN
    if not plan_path.exists():
        raise DataError(f"{out}: no {PLAN}; not a directory written by `roberta-pl-data shards`")
    plan = json.loads(plan_path.read_text())
    if plan.get("format") != FORMAT_VERSION:
        raise DataError(format1_message(str(out)))
    digest = plan_digest(plan)
    K = plan["num_tasks"]
    records, missing = [], []
    for t in range(K):
        path = out / TASKS_DIR / task_record_name(t, K)
        record = json.loads(path.read_text()) if path.exists() else None
        if record is None or record.get("plan") != digest:
            missing.append(t)
        else:
            check_shard_names(record, path)  # its names go into the manifest
        records.append(record)
    if missing:
        shown = ", ".join(map(str, missing[:10])) + (" ..." if len(missing) > 10 else "")
        raise DataError(f"{out}: {len(missing)} of {K} tasks have not finished (task {shown}); run them "
                        f"(`roberta-pl-data shards ... --num-tasks {K} --task-index I`), then merge again")
    return plan, records


def merge_manifests(out_dir: str | os.PathLike) -> dict:
    """Combine the tasks' records of a shard directory into ``manifest.json``.

    Args:
        out_dir: the shard directory (with ``.plan.json`` and ``.tasks/``).

    Returns:
        The manifest dict (also written to ``out_dir/manifest.json``).

    Raises:
        DataError: a task has not finished, or a shard it wrote is missing or has another size.
    """
    out = Path(out_dir)
    plan, records = _task_records(out)
    K = plan["num_tasks"]
    report = SkipReport()
    for r in [plan["input_skips"], *(rec["skipped"] for rec in records)]:
        report.counts.update(r["counts"])
        for reason, examples in r["examples"].items():
            kept = report.examples.setdefault(reason, [])
            kept.extend(examples[: 5 - len(kept)])
    manifest_splits = {}
    for split in SPLITS:
        shards = [s for rec in records for s in rec["splits"].get(split, [])]
        if not shards:
            continue
        for s in shards:
            p = out / s["name"]
            if not p.exists() or p.stat().st_size != s["num_bytes"]:
                raise DataError(f"{p}: missing or changed since its task wrote it; rerun that task")
        docs = sum(s["num_docs"] for s in shards)
        if docs == 0:
            continue  # e.g. a valid fraction too small for a tiny corpus: no such split (its empty shards stay)
        tokens = sum(s["num_tokens"] for s in shards)
        size = sum(s["num_bytes"] for s in shards)
        manifest_splits[split] = {
            "pattern": f"{split}-{{{0:06d}..{len(shards) - 1:06d}}}.tar",
            "num_shards": len(shards),
            "num_docs": docs,
            "num_tokens": tokens,
            "num_bytes": size,
            "bytes_per_token": round(size / max(1, tokens), 4),
            "shards": shards,
        }
    if "train" not in manifest_splits:
        raise DataError(f"no documents found in the inputs of {out}; nothing to shard")
    manifest = {
        "format": FORMAT_VERSION,
        "tokenizer_hash": plan["tokenizer_hash"],
        "tokenizer_dir": records[0]["tokenizer_dir"],
        "vocab_size": records[0]["vocab_size"],
        "dtype": records[0]["dtype"],
        "num_tasks": K,
        "valid_fraction": plan["valid_fraction"],
        "seed": plan["seed"],
        "sample_bytes": shard_format.SAMPLE_BYTES,
        "splits": manifest_splits,
        "skipped": report.to_dict(),
    }
    atomic_write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    if report.total:
        log.warning("skipped %d bad inputs: %s (listed in %s)", report.total, dict(report.counts), out / MANIFEST)
    log.info("wrote %s: %s", out / MANIFEST, ", ".join(
        f"{s} {v['num_shards']} shards, {v['num_docs']:,} docs, {v['num_tokens']:,} tokens, {v['bytes_per_token']:.2f} bytes/token"
        for s, v in manifest_splits.items()))
    return manifest


def load_manifest(path: str | os.PathLike) -> dict:
    """Read a ``manifest.json`` (or the one inside a shard directory).

    Args:
        path: the manifest file or its directory.

    Returns:
        The manifest dict, with ``"root"`` set to its directory.
    """
    p = Path(path)
    if p.is_dir():
        p = p / MANIFEST
    try:
        manifest = json.loads(p.read_text())
    except FileNotFoundError:
        if (p.parent / PLAN).exists():  # tasks started here but not all have finished (or nobody merged)
            try:
                _task_records(p.parent)
            except DataError as exc:
                raise DataError(f"{p}: no manifest yet: {str(exc).split(': ', 1)[1]}") from None
            raise DataError(f"{p}: no manifest yet, but every task has finished: run `roberta-pl-data merge-manifests "
                            f"{p.parent}`") from None
        raise DataError(f"{p}: no manifest; write shards with `roberta-pl-data shards`") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{p}: corrupt manifest ({exc})") from None
    if not isinstance(manifest, dict):
        raise DataError(f"{p}: corrupt manifest (a JSON {type(manifest).__name__}, not an object)")
    if manifest.get("format") != FORMAT_VERSION:
        raise DataError(format1_message(str(p.parent)) if manifest.get("format") == 1 else
                        f"{p}: manifest of an unknown shard format {manifest.get('format')!r}; {REWRITE_HINT}")
    check_shard_names(manifest, p)
    manifest["root"] = str(p.parent)
    return manifest


@dataclass(frozen=True)
class ShardInfo:
    """One shard: where it is, and its counts when a manifest gave them."""

    url: str
    num_docs: int | None = None
    num_tokens: int | None = None


@dataclass(frozen=True)
class ShardSet:
    """The shards of one split, with the tokenizer hash their manifest records (if any)."""

    shards: tuple[ShardInfo, ...]
    tokenizer_hash: str | None = None

    @property
    def has_counts(self) -> bool:
        """Whether every shard has doc and token counts (needed for exact epoch planning)."""
        return all(s.num_docs is not None and s.num_tokens is not None for s in self.shards)


def resolve_shards(spec: str | os.PathLike | Sequence[str], split: str = "train", manifest: str | os.PathLike | None = None) -> ShardSet:
    """Turn a shard spec into a :class:`ShardSet`.

    Args:
        spec: a shard directory or ``manifest.json`` (its ``split`` shards are used); a brace
            pattern like ``/data/train-{000000..000099}.tar``; a ``pipe:`` command such as
            ``"pipe:aws s3 cp s3://bucket/train-{000000..000099}.tar -"``; or a list of these.
        split: which split of a manifest to use.
        manifest: a manifest to take counts and the tokenizer hash from, for shards given as
            patterns or ``pipe:`` URLs (matched by file name).

    Returns:
        The resolved shards in spec order.
    """
    from webdataset.shardlists import expand_urls  # here: webdataset imports torch, which the writer never needs

    specs = [spec] if isinstance(spec, (str, os.PathLike)) else list(spec)
    if not specs:
        raise DataError("empty shard spec")
    infos: list[ShardInfo] = []
    tokenizer_hash = None
    for item in specs:
        text = os.fspath(item)
        path = Path(text)
        if not text.startswith("pipe:") and (path.is_dir() or path.name == MANIFEST):
            found = load_manifest(path)
            if split not in found["splits"]:
                raise DataError(f"{path}: manifest has no {split!r} split (has {sorted(found['splits'])})")
            root = Path(found["root"])
            tokenizer_hash = found["tokenizer_hash"]
            infos.extend(ShardInfo(str(root / s["name"]), s["num_docs"], s["num_tokens"]) for s in found["splits"][split]["shards"])
            continue
        for url in expand_urls(text):  # webdataset's: braces, '::' lists, $WDS_ variables
            infos.append(ShardInfo(url))
    if manifest is not None:
        found = load_manifest(manifest)
        tokenizer_hash = found["tokenizer_hash"]
        counts = {s["name"]: s for sp in found["splits"].values() for s in sp["shards"]}
        infos = [
            ShardInfo(i.url, counts[n]["num_docs"], counts[n]["num_tokens"]) if (n := _basename(i.url)) in counts else i
            for i in infos
        ]
    return ShardSet(tuple(infos), tokenizer_hash)


def _basename(url: str) -> str:
    # For "pipe:cmd ... s3://b/train-000001.tar -" take the last token that looks like a tar.
    tars = re.findall(r"[^\s/]+\.tar\b", url)
    return tars[-1] if tars else os.path.basename(url)
