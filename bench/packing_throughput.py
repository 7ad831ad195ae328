"""Packing modes side by side: tokens/s and REAL (non-padding) tokens/s of a training step on each mode's blocks.

Three modes of ``data.packing`` (data_pipelines/packing.py), on the same documents, interleaved in one run:

* ``full_sentences`` — FULL-SENTENCES: concatenated and cut, no padding; attention crosses documents.
* ``doc`` — one document (piece) per row, right-padded; the padding costs FLOPs and carries no loss.
* ``packed_docs`` — documents packed with their boundaries: no padding, attention within each document
  (roberta_pl/attention.py: SDPA with a block-diagonal mask on CPU, FlashAttention varlen on CUDA).

CPU (default): the ``tiny`` model (2 x 128, vocab 8192; max_seq_len raised to 512), fp32, AdamW steps, at seq 128
and 512 with the same tokens per step, on two corpora: the embedded default corpus (short documents: docstrings)
and a long-document one, this Python's standard-library source files, one file a document (both tokenized with the
default dataset's 8192-piece tokenizer, built and cached on first use).

``--gpu``: FlashAttention varlen (``packed_docs``) against padded rows (``doc``, SDPA with a key mask), roberta ``base``
and, when the preset exists, ``modernbert_base``, bf16 autocast, at 1,024 and 8,192 tokens a row (16,384 tokens a
step). Documents there are random ids with the lengths of the standard-library files (a length in tokens is the
file's characters / 4): the step's cost depends on the lengths, not on the ids, and no tokenizer has to be trained.

Prints a table and writes ``bench/results/packing_throughput.json`` (``packing_throughput_gpu.json`` for ``--gpu``).
Timings are never asserted anywhere.

    python bench/packing_throughput.py              # CPU, a few minutes on 2 cores
    python bench/packing_throughput.py --gpu        # one command for a GPU machine (flash_attn installed)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

from data_pipelines.masking import Masker, MaskingConfig, mask_generator  # noqa: E402
from data_pipelines.packing import document_ids, pack  # noqa: E402
from roberta_pl.model import RobertaConfig, RobertaForMaskedLM  # noqa: E402

MODES = ("full_sentences", "doc", "packed_docs")


def stdlib_files(limit: int, seed: int = 0) -> list[Path]:
    """A seeded sample of ``limit`` of the standard library's ``.py`` files, tests left out (a long-document corpus
    found on every machine: a few thousand tokens a file)."""
    files = sorted(p for p in Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")
                   if not {"test", "tests", "idle_test"} & set(p.parts) and p.stat().st_size > 0)
    return [files[i] for i in np.random.default_rng(seed).permutation(len(files))[:limit]]


def corpora(long_files: int) -> tuple[dict[str, list[np.ndarray]], object]:
    """The two corpora, tokenized and shuffled (seeded): ``default`` (the embedded corpus) and ``stdlib_files`` (long
    documents); and the tokenizer."""
    from data_pipelines.corpus import cache_dir, default_corpus, iter_documents
    from roberta_pl.pretraining.data import _default_dataset

    tok = _default_dataset(cache_dir(), 8192).tokenizer
    short = tok.encode_corpus(list(iter_documents(default_corpus())))
    long = tok.encode_corpus([p.read_text(errors="replace") for p in stdlib_files(long_files)])
    rng = np.random.default_rng(0)

    def shuffled(docs):
        docs = [np.asarray(d, dtype=np.int64) for d in docs if len(d)]
        return [docs[i] for i in rng.permutation(len(docs))]

    return {"default": shuffled(short), "stdlib_files": shuffled(long)}, tok


def batches(docs: list[np.ndarray], mode: str, seq_len: int, rows: int, count: int, tok, seed: int = 0) -> list[dict]:
    """``count`` masked micro-batches of ``rows`` x ``seq_len`` in ``mode``, cycling over the documents."""
    def cycle():
        while True:
            yield from docs

    packed = pack(cycle(), seq_len, mode, bos=tok.bos_id, eos=tok.eos_id, pad=tok.pad_id)
    masker = Masker(tok.vocab_size, tok.special_ids, tok.mask_id, MaskingConfig(0.15))
    out = []
    for step in range(count):
        rows_ = np.stack([next(packed) for _ in range(rows)])
        ids = torch.from_numpy(rows_.astype(np.int64))
        masked, labels = masker(ids, mask_generator(seed, step, 0))
        batch = {"input_ids": masked, "labels": labels}
        if mode == "doc":
            batch["attention_mask"] = (ids != tok.pad_id).long()
        if mode == "packed_docs":
            batch["document_ids"] = torch.from_numpy(document_ids(rows_, tok.bos_id))
        out.append(batch)
    return out


def real_tokens(batch: dict, pad_id: int) -> int:
    mask = batch.get("attention_mask")
    return batch["input_ids"].numel() if mask is None else int(mask.sum())


def timed_steps(contenders: dict[str, tuple], rounds: int, steps: int, warmup: int, device: torch.device,
                autocast: torch.dtype | None) -> dict[str, list[float]]:
    """Seconds per step of each contender ``(model, optimizer, batches)``, in interleaved rounds (order rotates)."""
    def step(model, optimizer, batch):
        with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
            loss = model(batch["input_ids"], batch.get("attention_mask"), batch["labels"],
                         document_ids=batch.get("document_ids")).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for model, optimizer, data in contenders.values():
        for i in range(warmup):
            step(model, optimizer, data[i % len(data)])
    times: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            model, optimizer, data = contenders[name]
            sync()
            start = time.perf_counter()
            for i in range(steps):
                step(model, optimizer, data[(r * steps + i) % len(data)])
            sync()
            times[name].append((time.perf_counter() - start) / steps)
    return times


def build(preset: str, seq_len: int, vocab: int, device: torch.device, **overrides) -> tuple:
    torch.manual_seed(0)
    config = RobertaConfig.from_name(preset, vocab_size=vocab, max_seq_len=max(seq_len, 512), **overrides)
    try:
        from roberta_pl.models import (
            masked_lm,  # both architectures, where the ModernBERT work has landed
        )
        model = masked_lm(config)
    except ImportError:
        model = RobertaForMaskedLM(config)
    model = model.to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01,
                                  fused=device.type == "cuda")
    return model, optimizer


def row(corpus: str, preset: str, seq_len: int, rows: int, mode: str, data: list[dict], seconds: list[float],
        pad_id: int, baseline: tuple[list[dict], list[float]]) -> dict:
    """One contender's figures; ``real_vs_baseline_median_round`` is the median over rounds of its real tokens/s over
    the baseline's (the first mode) in the same round, the figure to trust on a shared machine (a burst of load hits
    every contender of a round alike)."""
    tokens = rows * seq_len
    real = statistics.mean(real_tokens(b, pad_id) for b in data)
    base_real = statistics.mean(real_tokens(b, pad_id) for b in baseline[0])
    median = statistics.median(seconds)
    ratio = statistics.median((real / s) / (base_real / b) for s, b in zip(seconds, baseline[1]))
    docs_per_row = ([float(((b["document_ids"][:, 1:] != b["document_ids"][:, :-1]).sum(1) + 1).float().mean())
                     for b in data] if mode == "packed_docs" else None)
    return {"corpus": corpus, "model": preset, "seq_len": seq_len, "rows": rows, "mode": mode,
            "step_ms": 1e3 * median, "tokens_per_s": tokens / median, "real_tokens_per_s": real / median,
            "real_fraction": real / tokens, "real_vs_baseline_median_round": ratio, "documents_per_row": statistics.mean(docs_per_row) if docs_per_row else None,
            "round_step_ms": [1e3 * s for s in seconds]}


def run_cpu(args) -> dict:
    torch.set_num_threads(args.threads or torch.get_num_threads())
    docs_by_corpus, tok = corpora(args.long_files)
    device = torch.device("cpu")
    lengths = {name: {"documents": len(d), "mean_tokens": float(np.mean([len(x) for x in d])),
                      "median_tokens": float(np.median([len(x) for x in d]))} for name, d in docs_by_corpus.items()}
    results = []
    for corpus, docs in docs_by_corpus.items():
        for seq_len in args.seq_lens:
            rows = max(1, args.tokens_per_step // seq_len)
            contenders, data = {}, {}
            for mode in MODES:
                data[mode] = batches(docs, mode, seq_len, rows, args.warmup + args.steps * args.rounds, tok)
                contenders[mode] = (*build("tiny", seq_len, tok.vocab_size, device), data[mode])
            times = timed_steps(contenders, args.rounds, args.steps, args.warmup, device, None)
            for mode in MODES:
                results.append(row(corpus, "tiny", seq_len, rows, mode, data[mode], times[mode], tok.pad_id,
                                   (data[MODES[0]], times[MODES[0]])))
                print(_line(results[-1], results))
    ops = {str(t): attention_op(t, max(1, args.tokens_per_step // t), docs_by_corpus["default"], tok, args.op_repeats)
           for t in args.seq_lens} if args.op_repeats else None
    return {"corpora": lengths, "rows": results, "attention_op": ops}


def attention_op(seq_len: int, rows: int, docs: list[np.ndarray], tok, repeats: int) -> dict:
    """The attention op alone on packed_docs rows (tiny's 2 heads of 64), CPU fp32: SDPA with the block-diagonal
    boolean mask (what roberta_pl.attention runs on CPU) against ``flex_attention`` with a document block mask, eager
    and compiled, forward only: flex_attention has no backward on CPU (torch 2.13 raises NotImplementedError), so it
    cannot train there whatever its forward costs. SDPA's forward + backward is recorded too, and each one's largest
    difference from SDPA's output."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    from roberta_pl.attention import attend, attention_bias

    batch = batches(docs, "packed_docs", seq_len, rows, 1, tok)[0]
    doc = batch["document_ids"]
    torch.manual_seed(0)
    q, k, v = (torch.randn(rows, 2, seq_len, 64) for _ in range(3))
    mask = attention_bias(doc, None, None, seq_len)
    block = create_block_mask(lambda b, h, i, j: doc[b, i] == doc[b, j], rows, None, seq_len, seq_len, device="cpu")
    compiled = torch.compile(flex_attention)
    reference = attend(q, k, v, layout=mask)
    grads = [t.detach().requires_grad_() for t in (q, k, v)]
    ops = {"sdpa_bool_mask": lambda: attend(q, k, v, layout=mask),
           "flex_attention_eager": lambda: flex_attention(q, k, v, block_mask=block),
           "flex_attention_compiled": lambda: compiled(q, k, v, block_mask=block),
           "sdpa_bool_mask_fwd_bwd": lambda: attend(*grads, layout=mask).sum().backward()}
    out = {}
    for name, op in ops.items():
        op()  # warm-up (the compile)
        start = time.perf_counter()
        for _ in range(repeats):
            op()
        seconds = (time.perf_counter() - start) / repeats
        diff = None if name.endswith("bwd") else float((op() - reference).abs().max())
        out[name] = {"ms": 1e3 * seconds, "max_abs_diff_vs_sdpa": diff}
        print(f"attention op, seq {seq_len} x {rows} rows, {name}: {1e3 * seconds:.2f} ms"
              + ("" if diff is None else f" (max |diff| vs SDPA {diff:.1e})"))
    return out


def synthetic_documents(count: int, vocab: int, seed: int = 0) -> list[np.ndarray]:
    """Random ids with the standard library's file lengths (characters / 4 tokens), cycled ``count`` documents."""
    lengths = [max(1, p.stat().st_size // 4) for p in stdlib_files(1000)]
    rng = np.random.default_rng(seed)
    return [rng.integers(5, vocab, size=lengths[i % len(lengths)]) for i in rng.permutation(count)]


class _SyntheticTokenizer:
    bos_id, pad_id, eos_id, mask_id = 0, 1, 2, 4
    special_ids = (0, 1, 2, 3, 4)

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size


def run_gpu(args) -> dict:
    device = torch.device("cuda")
    try:
        import flash_attn  # noqa: F401
        flash = True
    except ImportError:
        flash = False
        print("flash_attn is not installed: packed_docs runs SDPA with a block-diagonal mask (pip install flash-attn)")
    presets = ["base"] + (["modernbert_base"] if "modernbert_base" in _presets() else [])
    tok = _SyntheticTokenizer(50265)
    docs = synthetic_documents(4000, tok.vocab_size)
    results = []
    for preset in presets:
        for seq_len in (1024, 8192):
            rows = max(1, 16384 // seq_len)
            contenders, data = {}, {}
            for mode in ("doc", "packed_docs"):
                data[mode] = batches(docs, mode, seq_len, rows, args.warmup + args.steps * args.rounds, tok)
                data[mode] = [{k: v.to(device) for k, v in b.items()} for b in data[mode]]
                contenders[mode] = (*build(preset, seq_len, tok.vocab_size, device, dropout=0.0, attention_dropout=0.0),
                                    data[mode])
            times = timed_steps(contenders, args.rounds, args.steps, args.warmup, device, torch.bfloat16)
            for mode in ("doc", "packed_docs"):
                results.append(row("stdlib_lengths", preset, seq_len, rows, mode, data[mode], times[mode], tok.pad_id,
                                   (data["doc"], times["doc"])))
                print(_line(results[-1], results))
            del contenders, data
            torch.cuda.empty_cache()
    return {"flash_attn": flash, "gpu": torch.cuda.get_device_name(), "rows": results}


def _presets() -> list[str]:
    from roberta_pl.model import PRESETS
    return list(PRESETS)


def _line(r: dict, rows: list[dict]) -> str:
    base = next((x for x in rows if x["corpus"] == r["corpus"] and x["model"] == r["model"]
                 and x["seq_len"] == r["seq_len"] and x["mode"] in ("full_sentences", "doc")), r)
    return (f"{r['corpus']:>15} {r['model']:>16} seq {r['seq_len']:>5} {r['mode']:>15}: {r['tokens_per_s']:>10,.0f} tok/s  "
            f"{r['real_tokens_per_s']:>10,.0f} real tok/s ({r['real_fraction']:.0%} real; "
            f"x{r['real_vs_baseline_median_round']:.2f} real vs {base['mode']}, median round)")


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", action="store_true", help="flash varlen vs padded, base models, 1,024 and 8,192 tokens")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[128, 512])
    parser.add_argument("--tokens-per-step", type=int, default=4096, help="CPU: rows x seq_len per step")
    parser.add_argument("--long-files", type=int, default=300, help="CPU: standard-library files in the long corpus")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per contender per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--op-repeats", type=int, default=10, help="CPU: attention-op timings (0: skip them)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args(argv)
    load = os.getloadavg()
    result = run_gpu(args) if args.gpu else run_cpu(args)
    result.update(device="cuda" if args.gpu else f"cpu ({torch.get_num_threads()} threads)", torch=torch.__version__,
                  python=platform.python_version(), load_before=load, load_after=os.getloadavg(),
                  settings={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
    args.out_dir.mkdir(parents=True, exist_ok=True)
    out = args.out_dir / ("packing_throughput_gpu.json" if args.gpu else "packing_throughput.json")
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
