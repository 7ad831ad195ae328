"""``roberta-pl-data``: train a tokenizer, write shards, inspect shards.

Examples::

    roberta-pl-data tokenizer --out data/tokenizer --vocab-size 32000 corpus/*.jsonl.gz
    roberta-pl-data shards --tokenizer data/tokenizer --out data/shards --valid-fraction 0.01 corpus/
    sbatch --array=0-15 launch/slurm/prepare_data.sbatch --tokenizer data/tokenizer --out data/shards corpus/
    roberta-pl-data inspect data/shards

With no inputs, ``tokenizer`` and ``shards`` use the embedded default corpus (docstrings of the
Python stdlib and torch, built once into ``$ROBERTA_PL_CACHE``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from data_pipelines.corpus import DEFAULT_CORPUS, SUFFIXES
from data_pipelines.errors import DataError

log = logging.getLogger("data_pipelines")


class DefaultsHelpFormatter(argparse.HelpFormatter):
    """``--help`` with each option's default, once: appended only where the help does not already say it
    (``argparse.ArgumentDefaultsHelpFormatter`` printed "(default: 160) (default: None)"), and never for a
    default of None (unset: the help says what happens then), a flag's False or a required option."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text or action.required or action.default is None or action.default is argparse.SUPPRESS
                or action.nargs == 0 or not action.option_strings):  # nargs 0: a flag (store_true, ...)
            return text
        return f"{text} (default: %(default)s)"


def _add_input_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("inputs", nargs="*", default=argparse.SUPPRESS, help=f"files, directories or globs of {', '.join(SUFFIXES)} (default: the embedded corpus, {DEFAULT_CORPUS})")
    p.add_argument("--text-field", default="text", help="JSON key holding the text in .jsonl inputs")
    p.add_argument("--on-error", choices=("raise", "skip"), default="raise", help="stop at the first bad input, or skip it with a counted warning")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (exposed so tests and docs can render ``--help``)."""
    fmt = DefaultsHelpFormatter
    parser = argparse.ArgumentParser(prog="roberta-pl-data", description="Prepare data for roberta-pl: tokenizer, shards, inspection.", formatter_class=fmt)
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar, warnings only")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{tokenizer,shards,merge-manifests,inspect,demo-task}")

    p = sub.add_parser("tokenizer", help="train a SentencePiece BPE tokenizer with RoBERTa special ids", formatter_class=fmt,
                       description="Train a SentencePiece BPE tokenizer (byte fallback, <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4) and write HuggingFace files next to it.")
    _add_input_args(p)
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--vocab-size", type=int, default=32000, help="vocabulary size including specials and 256 byte pieces")
    p.add_argument("--input-sentence-size", type=int, default=2_000_000, help="lines sampled for training (bounds memory and time)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--model-max-length", type=int, default=512, help="model_max_length written for HuggingFace")
    p.add_argument("--no-whitespace-pieces", dest="whitespace_pieces", action="store_false",
                   help="one token per space, as tokenizers before whitespace pieces (default: runs of spaces such as "
                        "code indentation are learned as pieces of their own, one or two tokens a run)")

    p = sub.add_parser("shards", help="tokenize a corpus into WebDataset tar shards with a manifest", formatter_class=fmt,
                       description="Tokenize in parallel and write globally shuffled train/valid WebDataset shards (~1 MiB of "
                                   "token ids per sample, ~2 bytes a token) and manifest.json. As a Slurm job array, each "
                                   "task writes its share (see launch/slurm/prepare_data.sbatch). Rerun to resume.")
    _add_input_args(p)
    p.add_argument("--tokenizer", required=True, type=Path,
                   help="tokenizer directory: ours (`roberta-pl-data tokenizer`) or an HF RoBERTa-family model's "
                        "(tokenizer.json, vocab.json + merges.txt, or sentencepiece.bpe.model)")
    p.add_argument("--out", required=True, type=Path, help="output directory")
    p.add_argument("--num-shards", type=int, default=None,
                   help="train shards in all; unset: chosen from the input size (shards of at most 128 MiB, and up to 64 "
                        "shards of at least 128 KiB for smaller corpora), logged. Want at least GPUs x DataLoader workers")
    p.add_argument("--valid-fraction", type=float, default=0.0, help="fraction of documents for the valid split")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/valid split, the shuffle and the deal of files to tasks")
    p.add_argument("--workers", type=int, default=None, help="tokenizer processes (unset: the CPUs this process may use; 0 = in process)")
    p.add_argument("--num-tasks", type=int, default=None,
                   help="tasks sharing the work (unset: $SLURM_ARRAY_TASK_COUNT, else 1); every task must be given the same")
    p.add_argument("--task-index", type=int, default=None,
                   help="the task to run, 0-based (unset: in a job array, the task's place in it, or $SLURM_ARRAY_TASK_ID "
                        "itself when --num-tasks is given; else every task, one after the other); the last task to "
                        "finish writes manifest.json")

    p = sub.add_parser("merge-manifests", help="merge the tasks' records of a shard directory into manifest.json", formatter_class=fmt,
                       description="Write manifest.json from what every task of `roberta-pl-data shards --num-tasks K` wrote. "
                                   "The last task to finish does this itself; run it by hand if none could (e.g. a task "
                                   "was rerun alone on a filesystem that showed it the others' records late).")
    p.add_argument("out", type=Path, help="the shard directory")

    p = sub.add_parser("inspect", help="print counts, a length histogram and a decoded sample of shards", formatter_class=fmt,
                       description="Summarise a shard directory: counts per split, a document-length histogram and decoded samples.")
    p.add_argument("shards", type=Path, help="shard directory (with manifest.json)")
    p.add_argument("--tokenizer", type=Path, default=None, help="tokenizer directory (default: the one recorded in the manifest)")
    p.add_argument("--split", default="train", help="split to sample from")
    p.add_argument("--samples", type=int, default=2, help="documents to decode and print")
    p.add_argument("--max-shards", type=int, default=8, help="shards to read for the histogram")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    g = p.add_argument_group("epoch plan", "the training settings under which to count the train blocks each epoch leaves unused")
    g.add_argument("--seq-len", type=int, default=512, help="tokens per sequence, incl. <s> and </s>")
    g.add_argument("--micro-batch-size", type=int, default=16, help="sequences per batch on each rank")
    g.add_argument("--world-size", type=int, default=1, help="data-parallel ranks")
    g.add_argument("--num-workers", type=int, default=0, help="DataLoader workers per rank")
    g.add_argument("--batch-multiple", type=int, default=1, help="gradient accumulation (batches per rank per epoch are a multiple of it)")
    g.add_argument("--pack-mode", choices=("full_sentences", "doc", "packed_docs"), default="full_sentences",
                   help="FULL-SENTENCES, doc or packed_docs packing")
    g.add_argument("--seed", type=int, default=0, help="the run's seed (assigns shards to readers)")

    p = sub.add_parser("demo-task", help="write a small fine-tuning task built from standard-library docstrings",
                       formatter_class=fmt, description="Write train/valid files of a small labelled task made from "
                       "text on this machine, to try roberta-pl-finetune without downloading a dataset.")
    p.add_argument("out", type=Path, help="output directory")
    p.add_argument("--kind", choices=("sources", "topics", "tagging"), default="sources",
                   help="sources: which of 2 stdlib areas a docstring is from (CSV); topics: which of 5 (CSV); "
                        "tagging: code identifiers in prose (CoNLL, BIO)")
    p.add_argument("--train", type=int, default=None, help="training examples (default: 160, 250 topics)")
    p.add_argument("--valid", type=int, default=None, help="validation examples (default: 120 sources, 150 topics, 60 tagging)")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    return parser


def _inputs(args: argparse.Namespace) -> list[str]:
    return getattr(args, "inputs", None) or [DEFAULT_CORPUS]


def _histogram(lengths: np.ndarray, bins: int = 10) -> list[tuple[int, int, int]]:
    edges = np.unique(np.geomspace(1, max(2, int(lengths.max()) + 1), bins + 1).astype(int))
    counts, _ = np.histogram(lengths, bins=edges)
    return [(int(lo), int(hi), int(c)) for lo, hi, c in zip(edges[:-1], edges[1:], counts)]


def epoch_plan_summary(shard_dir: Path, *, seq_len: int = 512, micro_batch_size: int = 16, world_size: int = 1, num_workers: int = 0,
                       batch_multiple: int = 1, pack_mode: str = "full_sentences", seed: int = 0) -> dict:
    """How the train split's blocks are used each epoch under these training settings.

    Returns:
        ``{"settings", "batches_per_rank", "total_blocks", "unused_blocks", "total_tokens",
        "unused_tokens", "exact"}``, or ``{"settings", "error"}`` when the plan is impossible
        (too little data for the settings).
    """
    from data_pipelines.epochs import plan_epoch
    from data_pipelines.manifest import resolve_shards
    from data_pipelines.stream import StreamConfig

    settings = {"seq_len": seq_len, "micro_batch_size": micro_batch_size, "world_size": world_size, "num_workers": num_workers,
                "batch_multiple": batch_multiple, "pack_mode": pack_mode, "seed": seed}
    config = StreamConfig(shards=resolve_shards(shard_dir, split="train"), seq_len=seq_len, batch_size=micro_batch_size, pack_mode=pack_mode,
                          seed=seed, world_size=world_size, num_workers=num_workers, batch_multiple=batch_multiple)
    try:
        plan = plan_epoch(config)
    except DataError as exc:
        return {"settings": settings, "error": str(exc)}
    return {"settings": settings, "batches_per_rank": plan.batches_per_rank, "total_blocks": sum(plan.reader_blocks),
            "unused_blocks": plan.unused_blocks, "total_tokens": plan.total_tokens, "unused_tokens": plan.unused_tokens,
            "exact": plan.exact}


def inspect_shards(shard_dir: Path, tokenizer_dir: Path | None, split: str, samples: int, max_shards: int, plan: dict | None = None) -> dict:
    """Summarise a shard directory.

    Args:
        shard_dir: directory with ``manifest.json``.
        tokenizer_dir: tokenizer to decode with (default: the manifest's).
        split: split to read documents from.
        samples: documents to decode.
        max_shards: shards read for the length histogram.
        plan: training settings for :func:`epoch_plan_summary` (its keyword arguments; default: its defaults).

    Returns:
        ``{"splits": counts per split, "skipped", "histogram": [(lo, hi, count)], "samples": [text],
        "whitespace": the share of the tokens read that are whitespace only ("▁", "▁▁▁▁", newline, tab) and of
        bare "▁" pieces ("Ġ" for a byte-level BPE), "epoch_plan": the train split's unused blocks and tokens per epoch}``.
    """
    from data_pipelines.manifest import load_manifest
    from data_pipelines.shard_format import iter_shard
    from data_pipelines.errors import SkipReport
    from data_pipelines.tokenizer import load_tokenizer

    manifest = load_manifest(shard_dir)
    tok = load_tokenizer(tokenizer_dir or manifest["tokenizer_dir"])
    if split not in manifest["splits"]:
        raise DataError(f"{shard_dir}: no {split!r} split (has {sorted(manifest['splits'])})")
    lengths, decoded = [], []
    whitespace = tok.whitespace_table()
    bare = -1 if tok.space_id is None else tok.space_id  # the lone space piece: "▁", or byte-level BPE's "Ġ"
    counts = np.zeros(3, dtype=np.int64)  # tokens, whitespace-only tokens, bare "▁" tokens
    for shard in manifest["splits"][split]["shards"][:max_shards]:
        for ids in iter_shard(str(Path(manifest["root"]) / shard["name"]), expected_hash=tok.hash, vocab_size=tok.vocab_size,
                              on_error="raise", report=SkipReport()):
            lengths.append(len(ids))
            counts += (len(ids), int(whitespace[ids].sum()), int((ids == bare).sum()))
            if len(decoded) < samples:
                decoded.append(tok.decode(ids.tolist()))
    lengths_arr = np.asarray(lengths)
    return {
        "tokenizer_hash": manifest["tokenizer_hash"],
        "splits": {s: {k: v[k] for k in ("num_shards", "num_docs", "num_tokens")} for s, v in manifest["splits"].items()},
        "skipped": manifest["skipped"],
        "lengths": {"docs_read": len(lengths), "mean": float(lengths_arr.mean()), "median": float(np.median(lengths_arr)), "max": int(lengths_arr.max())},
        "histogram": _histogram(lengths_arr),
        "samples": decoded,
        "whitespace": {"tokens_read": int(counts[0]), "whitespace_share": float(counts[1] / max(counts[0], 1)),
                       "bare_space_share": float(counts[2] / max(counts[0], 1))},
        "epoch_plan": epoch_plan_summary(shard_dir, **(plan or {})) if "train" in manifest["splits"] else None,
    }


def _print_inspection(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    table = Table(title=f"shards (tokenizer {summary['tokenizer_hash']})")
    for col in ("split", "shards", "docs", "tokens"):
        table.add_column(col, justify="right")
    for split, c in summary["splits"].items():
        table.add_row(split, f"{c['num_shards']:,}", f"{c['num_docs']:,}", f"{c['num_tokens']:,}")
    console.print(table)
    if summary["skipped"]["total"]:
        console.print(f"[yellow]skipped inputs: {summary['skipped']['counts']}[/yellow]")
    lengths = summary["lengths"]
    console.print(f"document length over {lengths['docs_read']:,} docs: mean {lengths['mean']:.1f}, median {lengths['median']:.0f}, max {lengths['max']:,}")
    peak = max(c for _, _, c in summary["histogram"]) or 1
    for lo, hi, count in summary["histogram"]:
        console.print(f"  {lo:>7}–{hi - 1:<7} {count:>8,} {'█' * round(40 * count / peak)}")
    ws = summary["whitespace"]
    console.print(f"whitespace-only tokens: {ws['whitespace_share']:.1%} of {ws['tokens_read']:,} read "
                  f"(a bare \"\u2581\": {ws['bare_space_share']:.1%})", markup=False, highlight=False)
    if ws["bare_space_share"] > 0.1:  # a tokenizer trained without whitespace pieces, on text with runs of spaces
        console.print("  runs of spaces cost a token per space here: a tokenizer trained with whitespace pieces (the "
                      "default of `roberta-pl-data tokenizer`) makes each run one or two tokens", markup=False,
                      highlight=False, soft_wrap=True)
    plan = summary.get("epoch_plan")
    if plan is not None:
        given = ", ".join(f"{k} {v}" for k, v in plan["settings"].items())
        if "error" in plan:
            console.print(f"train epoch plan ({given}): {plan['error']}", markup=False, highlight=False, soft_wrap=True)
        else:
            at_least = "" if plan["exact"] else "at least "
            tokens = f", {plan['unused_tokens']:,} of {plan['total_tokens']:,} tokens" if plan["unused_tokens"] is not None else ""
            console.print(f"train epoch plan ({given}): {plan['batches_per_rank']:,} batches per rank; {at_least}"
                          f"{plan['unused_blocks']:,} of {plan['total_blocks']:,} blocks{tokens} left unused per epoch", markup=False, highlight=False, soft_wrap=True)
    for i, text in enumerate(summary["samples"]):
        console.rule(f"sample {i}")
        console.print(text[:1000], markup=False, highlight=False)


def _task_arguments(num_tasks: int | None, task_index: int | None) -> tuple[int, int | None]:
    """``--num-tasks`` / ``--task-index``, defaulting from a Slurm job array's variables.

    In an array of K tasks (``--array=0-15`` or ``1-16``) task I is the I-th of the array. With ``--num-tasks``
    given, the array task id *is* the task index (``--array=7 --num-tasks 16`` reruns task 7 alone).
    """
    env = os.environ
    in_array = "SLURM_ARRAY_TASK_ID" in env
    if task_index is None and in_array:
        if num_tasks is None:
            task_index = int(env["SLURM_ARRAY_TASK_ID"]) - int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        else:
            task_index = int(env["SLURM_ARRAY_TASK_ID"])
    if num_tasks is None:
        num_tasks = int(env.get("SLURM_ARRAY_TASK_COUNT", 1))
    if task_index is not None and not 0 <= task_index < num_tasks:
        if in_array:
            raise DataError(f"array task {env['SLURM_ARRAY_TASK_ID']} is not one of {num_tasks} tasks numbered from "
                            f"{env.get('SLURM_ARRAY_TASK_MIN', 0)}: submit a plain range, --array=0-{num_tasks - 1}")
        raise DataError(f"--task-index {task_index} is not one of --num-tasks {num_tasks} (0 to {num_tasks - 1})")
    return num_tasks, task_index


def _print_manifest(manifest: dict, out: Path) -> None:
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['num_shards']} shards, {info['num_docs']:,} docs, {info['num_tokens']:,} tokens, "
              f"{info['bytes_per_token']:.2f} bytes/token → {out}/{info['pattern']}")
    if manifest["skipped"]["total"]:
        print(f"skipped {manifest['skipped']['total']} bad inputs: {manifest['skipped']['counts']} (see manifest.json)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``roberta-pl-data``; returns the exit code (2 for user errors)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(message)s")
    try:
        if args.command == "tokenizer":
            from data_pipelines.tokenizer import META_FILE, train_tokenizer

            tok = train_tokenizer(_inputs(args), args.out, args.vocab_size, input_sentence_size=args.input_sentence_size,
                                  text_field=args.text_field, on_error=args.on_error, seed=args.seed, model_max_length=args.model_max_length,
                                  whitespace_pieces=args.whitespace_pieces,
                                  progress=not args.quiet)
            print(f"tokenizer written to {args.out} (vocab {tok.vocab_size}, hash {tok.hash})")
            meta = json.loads((Path(args.out) / META_FILE).read_text())
            limit = f"at most --input-sentence-size {args.input_sentence_size:,}" if args.input_sentence_size > 0 else "all"
            print(f"sampled {meta['lines_sampled']:,} of {meta['lines_read']:,} lines for training ({limit})")
        elif args.command == "shards":
            from data_pipelines.shards import write_shards

            num_tasks, task_index = _task_arguments(args.num_tasks, args.task_index)
            manifest = write_shards(_inputs(args), args.tokenizer, args.out, num_shards=args.num_shards,
                                    valid_fraction=args.valid_fraction, seed=args.seed, text_field=args.text_field,
                                    on_error=args.on_error, num_workers=args.workers, num_tasks=num_tasks,
                                    task_index=task_index, progress=not args.quiet)
            if "task" in manifest:  # this task is done, others are not yet
                written = ", ".join(f"{len(v)} {k}" for k, v in manifest["splits"].items())
                print(f"task {manifest['task']} of {num_tasks}: wrote its shards ({written}) to {args.out}; manifest.json is "
                      f"written when all {num_tasks} tasks are done (by the last one, or `roberta-pl-data merge-manifests {args.out}`)")
            else:
                _print_manifest(manifest, args.out)
        elif args.command == "merge-manifests":
            from data_pipelines.manifest import merge_manifests

            _print_manifest(merge_manifests(args.out), args.out)
        elif args.command == "demo-task":
            from data_pipelines.demo_tasks import tagging_task, topics_task, two_source_task

            build = {"sources": two_source_task, "topics": topics_task, "tagging": tagging_task}[args.kind]
            sizes = {k: v for k, v in (("n_train", args.train), ("n_valid", args.valid)) if v is not None}
            files = build(args.out, seed=args.seed, **sizes)
            task = ("task=token_classification" if args.kind == "tagging"
                    else "task=sequence_classification task.label_column=source")
            print(f"wrote {files['train']} and {files['valid']}. Fine-tune on them with:\n"
                  f"  roberta-pl-finetune pretrained=MODEL {task} task.train_file={files['train']} "
                  f"task.valid_file={files['valid']}")
        else:
            plan = {"seq_len": args.seq_len, "micro_batch_size": args.micro_batch_size, "world_size": args.world_size,
                    "num_workers": args.num_workers, "batch_multiple": args.batch_multiple, "pack_mode": args.pack_mode, "seed": args.seed}
            summary = inspect_shards(args.shards, args.tokenizer, args.split, args.samples, args.max_shards, plan)
            if args.json:
                print(json.dumps(summary, indent=2))
            else:
                _print_inspection(summary)
    except DataError as exc:
        print(f"roberta-pl-data {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # unwritable --out, a file where a directory should be, disk full
        print(f"roberta-pl-data {args.command}: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"roberta-pl-data {args.command}: interrupted (rerun the same command to resume)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
