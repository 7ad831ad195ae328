"""Data-pipeline throughput, side by side in one run.

(a) Masking, one thread: our vectorised :class:`~data_pipelines.masking.Masker` (token-level and
    whole-word) against ``transformers.DataCollatorForLanguageModeling(mlm_probability=0.15)`` on
    the same batches of 512-token FULL-SENTENCES blocks. Target: ours ≥ 5× the HF collator.
(b) Reading only, one process: the train shards read in full passes (i) by stock ``webdataset.WebDataset``
    without decoding (bytes/s: what a WebDataset user's loader moves), (ii) by stock webdataset decoding each
    sample's ``.npy`` arrays and splitting them into documents (tokens/s), and (iii) by our reader,
    :func:`~data_pipelines.shard_format.iter_shard` (webdataset's tar iteration plus every check: CRC, offsets,
    id range, sample count).
(c) End to end: WebDataset shards → read → pack → shuffle → batch → mask, through
    ``MLMDataModule``'s train loader, tokens/s per worker process (each worker is one core: torch
    runs single-threaded in workers). Target: ≥ 2M tokens/s per worker, enough for one worker to
    feed an H100 training roberta-base (~1M tokens/s at bf16).
(d) Bytes per token of the shards (file sizes over token ids) on the embedded corpus, and with
    ``--extra-corpus PATH`` on one more corpus (its own tokenizer of the same size). Target: ≤ 2.2.

Everything is built in a temp dir from the embedded default corpus (no downloads). Prints a table
and writes ``bench/results/data_throughput.json``. Timings are never asserted anywhere.

    python bench/data_throughput.py                # ~1-2 minutes on a laptop
    python bench/data_throughput.py --workers 1 2 4 --seconds 5 --extra-corpus /usr/share/vim/vim90/doc
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from data_pipelines.datamodule import DataSettings, MLMDataModule  # noqa: E402
from data_pipelines.masking import Masker, MaskingConfig, mask_generator  # noqa: E402
from data_pipelines.packing import pack_full_sentences  # noqa: E402
from data_pipelines.errors import SkipReport  # noqa: E402
from data_pipelines.manifest import load_manifest, resolve_shards  # noqa: E402
from data_pipelines.shard_format import iter_shard  # noqa: E402
from data_pipelines.shards import write_shards  # noqa: E402
from data_pipelines.tokenizer import load_tokenizer, train_tokenizer  # noqa: E402


def _rate(fn, tokens_per_call: int, seconds: float) -> float:
    """Median tokens/s over repeated timed windows of ``fn`` (after one warm-up call)."""
    fn()
    rates = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(rates) < 3:
        start, calls = time.perf_counter(), 0
        while time.perf_counter() - start < 0.25:
            fn()
            calls += 1
        rates.append(calls * tokens_per_call / (time.perf_counter() - start))
    return statistics.median(rates)


def bench_masking(tok_dir: Path, blocks: torch.Tensor, batch: int, seconds: float) -> dict:
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling

    torch.set_num_threads(1)
    tok = load_tokenizer(tok_dir)
    hf_tok = AutoTokenizer.from_pretrained(str(tok_dir))
    collator = DataCollatorForLanguageModeling(hf_tok, mlm=True, mlm_probability=0.15)
    batches = [blocks[i : i + batch] for i in range(0, len(blocks) - batch + 1, batch)]
    tokens = batch * blocks.shape[1]
    state = {"i": 0}

    def next_batch() -> torch.Tensor:
        state["i"] = (state["i"] + 1) % len(batches)
        return batches[state["i"]]

    def hf() -> None:
        # The collator's documented input: a list of examples with equal-length input_ids.
        collator([{"input_ids": row} for row in next_batch()])

    results = {"hf_collator": _rate(hf, tokens, seconds)}
    for name, cfg in (("ours_token", MaskingConfig()), ("ours_whole_word", MaskingConfig(strategy="whole_word")),
                      ("ours_span", MaskingConfig(strategy="span"))):
        masker = Masker(tok.vocab_size, tok.special_ids, tok.mask_id, cfg, word_start=tok.word_start_table())

        def ours(masker=masker) -> None:
            state["step"] = state.get("step", 0) + 1
            masker(next_batch(), mask_generator(0, state["step"], 0))  # incl. seeding a generator per batch

        results[name] = _rate(ours, tokens, seconds)
    results["speedup_token_vs_hf"] = results["ours_token"] / results["hf_collator"]
    results["speedup_whole_word_vs_hf"] = results["ours_whole_word"] / results["hf_collator"]
    return results


def bench_end_to_end(tok_dir: Path, shard_dir: Path, workers: int, seq_len: int, batch: int, seconds: float) -> dict:
    torch.set_num_threads(1)
    dm = MLMDataModule(shard_dir, tok_dir, masking=MaskingConfig(strategy="whole_word"),
                       settings=DataSettings(num_workers=workers, shuffle_window=1024)).connect(seq_len, batch)
    tokens = 0
    start = None
    deadline = None
    per_batch = seq_len * batch
    epochs = 0
    while True:
        for i, b in enumerate(dm.train_dataloader()):
            if start is None and i >= 2 * max(1, workers):  # skip worker start-up
                start = time.perf_counter()
                deadline = start + seconds
                continue
            if start is not None:
                tokens += per_batch
                if time.perf_counter() > deadline:
                    break
        else:
            epochs += 1
            if start is None or time.perf_counter() <= deadline:
                continue
        break
    elapsed = time.perf_counter() - start
    total = tokens / elapsed
    return {"workers": workers, "tokens_per_s": total, "tokens_per_s_per_worker": total / max(1, workers), "batches": tokens // per_batch}


def bench_reading(shard_dir: Path, seconds: float) -> dict:
    """Full passes over the train shards, read only (no packing, no masking), in this process."""
    import warnings

    import webdataset as wds

    manifest = load_manifest(shard_dir)
    shards = manifest["splits"]["train"]["shards"]
    urls = [str(shard_dir / s["name"]) for s in shards]
    tokens = sum(s["num_tokens"] for s in shards)
    size = sum(s["num_bytes"] for s in shards)
    docs = sum(s["num_docs"] for s in shards)

    def stock_raw() -> None:
        for sample in wds.WebDataset(urls, shardshuffle=False):
            len(sample["ids.npy"])

    def stock_documents() -> None:
        seen = 0
        for sample in wds.WebDataset(urls, shardshuffle=False).decode():
            seen += len(np.split(sample["ids.npy"], sample["offsets.npy"][1:-1])) if len(sample["offsets.npy"]) > 1 else 0
        assert seen == docs, (seen, docs)

    def ours() -> None:
        report = SkipReport()
        for url in urls:
            for _ in iter_shard(url, expected_hash=manifest["tokenizer_hash"], vocab_size=manifest["vocab_size"],
                                on_error="raise", report=report):
                pass

    results = {"shards": len(urls), "bytes": size, "tokens": tokens, "docs": docs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # webdataset's notes about its own defaults
        for name, fn in (("stock_webdataset_raw", stock_raw), ("stock_webdataset_documents", stock_documents),
                         ("ours_iter_shard", ours)):
            passes_per_s = _rate(fn, 1, seconds)
            results[name] = {"bytes_per_s": passes_per_s * size, "tokens_per_s": passes_per_s * tokens}
    return results


def shard_size(corpus: str, work: Path, vocab_size: int, tok_dir: Path | None = None) -> dict:
    """Bytes per token of the shards of ``corpus`` (the shard count chosen from its size, as by default)."""
    if tok_dir is None:
        tok_dir = work / "tokenizer"
        train_tokenizer(corpus, tok_dir, vocab_size=vocab_size, input_sentence_size=300_000)
    manifest = write_shards(corpus, tok_dir, work / "shards", progress=False)
    train = manifest["splits"]["train"]
    return {"corpus": corpus, "shards": train["num_shards"], "docs": train["num_docs"], "tokens": train["num_tokens"],
            "shard_bytes": train["num_bytes"], "bytes_per_token": train["num_bytes"] / train["num_tokens"],
            "tokens_per_doc": train["num_tokens"] / train["num_docs"]}


def build_data(work: Path, vocab_size: int) -> tuple[Path, Path]:
    tok_dir, shard_dir = work / "tokenizer", work / "shards"
    train_tokenizer("@default", tok_dir, vocab_size=vocab_size, input_sentence_size=300_000)
    write_shards("@default", tok_dir, shard_dir, progress=False)  # the shard count chosen from the corpus size
    return tok_dir, shard_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader workers to measure (0 = main process)")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch", type=int, default=16, help="micro-batch size")
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--seconds", type=float, default=4.0, help="measuring time per case")
    parser.add_argument("--extra-corpus", default=None, help="also report bytes per token on this corpus (files, dirs, globs)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "data_throughput.json")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        tok_dir, shard_dir = build_data(Path(tmp), args.vocab_size)
        build_s = time.perf_counter() - t0
        shards = resolve_shards(shard_dir)
        docs = [d for s in shards.shards[:8] for d in iter_shard(s.url, expected_hash=None, vocab_size=None, on_error="raise", report=SkipReport())]
        blocks = torch.from_numpy(np.stack(list(pack_full_sentences(docs, args.seq_len))).astype(np.int64))
        masking = bench_masking(tok_dir, blocks, args.batch, args.seconds)
        reading = bench_reading(shard_dir, args.seconds)
        e2e = [bench_end_to_end(tok_dir, shard_dir, w, args.seq_len, args.batch, args.seconds) for w in args.workers]
        sizes = [shard_size("@default", Path(tmp), args.vocab_size, tok_dir=tok_dir)]
        sizes[0]["corpus"] = "embedded default"
        if args.extra_corpus:
            sizes.append(shard_size(args.extra_corpus, Path(tmp) / "extra", args.vocab_size))

    result = {
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpu_count": os.cpu_count(), "processor": platform.processor(),
                    # The figures are only as quiet as the machine: record how busy it was.
                    "load_average_1m": os.getloadavg()[0]},
        "setup": {"seq_len": args.seq_len, "micro_batch": args.batch, "vocab_size": args.vocab_size, "corpus": "embedded default",
                  "corpus_tokens": sum(s.num_tokens for s in shards.shards), "build_seconds": round(build_s, 1)},
        "masking_tokens_per_s_one_thread": masking,
        "reading_one_process": reading,
        "end_to_end": e2e,
        "shard_size": sizes,
        "targets": {"masking_speedup_vs_hf": 5.0, "end_to_end_tokens_per_s_per_worker": 2e6, "bytes_per_token": 2.2},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"masking, one thread, {args.batch}×{args.seq_len} blocks")
    table.add_column("masker")
    table.add_column("tokens/s", justify="right")
    table.add_column("× HF", justify="right")
    for name in ("hf_collator", "ours_token", "ours_whole_word", "ours_span"):
        table.add_row(name, f"{masking[name] / 1e6:,.2f}M", f"{masking[name] / masking['hf_collator']:.1f}×")
    e2e_table = Table(title="shards → masked batches (whole-word), end to end")
    for col in ("workers", "tokens/s", "tokens/s per worker"):
        e2e_table.add_column(col, justify="right")
    for r in e2e:
        e2e_table.add_row(str(r["workers"]) + (" (main process)" if r["workers"] == 0 else ""), f"{r['tokens_per_s'] / 1e6:,.2f}M",
                          f"{r['tokens_per_s_per_worker'] / 1e6:,.2f}M")
    read_table = Table(title=f"reading only, one process ({reading['shards']} train shards, {reading['bytes'] / 1e6:,.1f} MB)")
    for col in ("reader", "MB/s", "tokens/s"):
        read_table.add_column(col, justify="right")
    for name in ("stock_webdataset_raw", "stock_webdataset_documents", "ours_iter_shard"):
        read_table.add_row(name, f"{reading[name]['bytes_per_s'] / 1e6:,.0f}", f"{reading[name]['tokens_per_s'] / 1e6:,.1f}M")
    size_table = Table(title="shard size")
    for col in ("corpus", "shards", "docs", "tokens", "tokens/doc", "bytes/token"):
        size_table.add_column(col, justify="right")
    for r in sizes:
        size_table.add_row(str(r["corpus"]), str(r["shards"]), f"{r['docs']:,}", f"{r['tokens']:,}", f"{r['tokens_per_doc']:.0f}",
                           f"{r['bytes_per_token']:.2f}")
    console = Console()
    console.print(table)
    console.print(read_table)
    console.print(e2e_table)
    console.print(size_table)
    console.print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
