"""Quality per wall-clock minute: our budget recipe against the HuggingFace recipe at its tuned learning rate.

For each budget, the contenders train **at the same time** on this machine, each on ``--threads`` torch threads,
from the same tokenizer and training text, with 128-token blocks and 32 sequences a step:

* ``ours-budget``: ``roberta-pl-train experiment=budget_cpu trainer.max_time=<budget>`` (``tiny``: 2 layers x 128,
  8k vocabulary; dropout off, 30% -> 15% mask-rate schedule, batch ramp, LR decayed to the step count fixed from
  the measured rate, clip 0.5);
* ``modernbert-tiny``: the same command with ``model=modernbert_tiny`` (our ModernBERT-class preset: RoPE, GeGLU,
  local/global attention), present whenever ``roberta_pl.model.PRESETS`` has that preset;
* ``hf``: ``transformers.RobertaForMaskedLM`` (the ``tiny`` shape) trained as ``run_mlm.py`` would: blocks of
  concatenated documents (``group_texts``), ``DataCollatorForLanguageModeling(mlm_probability=0.15)``, AdamW with
  the ``TrainingArguments`` defaults (betas 0.9/0.999, eps 1e-8, no weight decay, clip 1.0) and a linear schedule
  with ``--warmup_ratio`` 0.05 (RoBERTa's pretraining warmed up for 24k of 500k steps), its horizon sized to the
  budget from the rate of its first steps. Its peak LR is **tuned** as a ``run_mlm.py`` user tunes it: a sweep over
  ``--hf-lrs`` (1e-4, 3e-4, 1e-3, 2e-3) at the shortest budget, the four runs side by side like the contenders,
  each scored by its loss on 256 blocks held back from HF's training text (never the held-out test blocks); the
  lowest loss wins and is used at every budget;
* ``hf-default-lr``: the same HF recipe at ``TrainingArguments``' default LR 5e-5, labelled "HF default LR (not
  tuned)": it shows what an untuned baseline looks like and stays out of the headline ratio (``--no-hf-default-row``).

Afterwards each model is loaded with ``transformers.AutoModelForMaskedLM`` and scored on the same held-out blocks,
masked once at 15% (80/10/10, fixed seed): masked-token accuracy and loss. The text is not the one the tests or
the quickstart train on: documentation files of this machine's packages (``/usr/share/doc``: READMEs, change
logs, copyright notices), paragraphs de-duplicated, split by paragraph hash into train and held-out (1 in 20).

    python bench/quality.py                 # sweep at 2 min, then budgets 2, 5, 10, 20 minutes (~45 minutes)
    python bench/quality.py --quick         # a 0.5-minute sweep and one 1-minute budget: a smoke check
    python bench/quality.py --budgets 5 10 --threads 1 --hf-lr 1e-3   # a given HF LR: no sweep

Writes ``bench/results/quality.json`` and ``quality.png`` (held-out accuracy by budget); budgets of an earlier
``quality.json`` on the same corpus, setup, HF LR and commit that this run does not redo are kept. Nothing asserts
a figure.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SEQ_LEN, GLOBAL_BATCH, VOCAB = 128, 32, 8192
HF_LRS = (1e-4, 3e-4, 1e-3, 2e-3)  # the sweep; TrainingArguments' default 5e-5 is the labelled, untuned row
HF_DEFAULT_LR, HF_WARMUP_RATIO, SWEEP_VALID_BLOCKS = 5e-5, 0.05, 256
LABELS = {"ours-budget": "ours (budget_cpu)", "modernbert-tiny": "ours, modernbert_tiny", "hf": "HF, tuned LR",
          "hf-default-lr": "HF default LR (not tuned)", "ours-default": "ours, previous default"}
_TEXT_FILES = re.compile(r"(readme|changelog|news|copyright|changes|authors|history|todo|faq)[^/]*(\.txt|\.md|\.rst)?(\.gz)?$|"
                         r"\.(txt|md|rst)(\.gz)?$", re.I)


# -- the corpus -------------------------------------------------------------------------------------
def _paragraphs(root: Path):
    for path in sorted(p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and _TEXT_FILES.search(p.name)):
        try:
            raw = path.read_bytes()
            text = (gzip.decompress(raw) if path.suffix == ".gz" else raw).decode("utf-8")
        except (OSError, UnicodeDecodeError, EOFError, gzip.BadGzipFile):
            continue
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            letters = sum(c.isalpha() for c in para)
            if len(para) >= 80 and letters > 0.6 * len(para):  # prose, not tables of hashes or file lists
                yield para


def build_corpus(work: Path, source: Path, max_bytes: int) -> dict:
    """``train.txt`` and ``heldout.txt`` (documents separated by blank lines): unique paragraphs of ``source``,
    grouped into ~2 kB documents, 1 in 20 paragraphs (by hash) held out."""
    seen: set[bytes] = set()
    split = {"train": [], "heldout": []}
    size = 0
    for para in _paragraphs(source):
        digest = hashlib.blake2b(para.encode(), digest_size=8).digest()
        if digest in seen:
            continue
        seen.add(digest)
        split["heldout" if digest[0] % 20 == 0 else "train"].append(para)
        size += len(para)
        if size >= max_bytes:
            break
    counts = {}
    for name, paras in split.items():
        docs, doc = [], []
        for para in paras:
            doc.append(para)
            if sum(map(len, doc)) > 2000:
                docs.append("\n".join(doc))
                doc = []
        docs += ["\n".join(doc)] if doc else []
        (work / f"{name}.txt").write_text("\n\n".join(docs) + "\n")
        counts[name] = {"documents": len(docs), "bytes": (work / f"{name}.txt").stat().st_size}
    sha = hashlib.sha256((work / "train.txt").read_bytes() + (work / "heldout.txt").read_bytes()).hexdigest()
    return {"source": str(source), "sha256": sha, **counts}


def prepare(work: Path, source: Path, max_bytes: int) -> dict:
    """Corpus, tokenizer (trained on the train split), our shards, and the held-out evaluation blocks (cached)."""
    import torch

    from data_pipelines.masking import Masker, MaskingConfig, mask_generator
    from data_pipelines.packing import pack_full_sentences
    from data_pipelines.shards import write_shards
    from data_pipelines.tokenizer import load_tokenizer, train_tokenizer

    meta_path = work / "corpus.json"
    if meta_path.exists():
        return json.loads(meta_path.read_text())
    work.mkdir(parents=True, exist_ok=True)
    meta = build_corpus(work, source, max_bytes)
    train_tokenizer(work / "train.txt", work / "tokenizer", vocab_size=VOCAB, input_sentence_size=300_000)
    write_shards(work / "train.txt", work / "tokenizer", work / "shards", valid_fraction=0.01, progress=False)
    tok = load_tokenizer(work / "tokenizer")
    docs = [tok.encode(d) for d in (work / "heldout.txt").read_text().split("\n\n") if d.strip()]
    import numpy as np

    blocks = torch.from_numpy(np.stack(list(pack_full_sentences((np.asarray(d) for d in docs), SEQ_LEN,
                                                                bos=tok.bos_id, eos=tok.eos_id))).astype(np.int64))
    masker = Masker(tok.vocab_size, tok.special_ids, tok.mask_id, MaskingConfig(0.15))
    masked, labels = masker(blocks, mask_generator(0, 0, 0, stream=7))
    torch.save({"input_ids": masked, "labels": labels}, work / "heldout.pt")
    # The HF contender's blocks, as run_mlm.py makes them (tokenize each document, concatenate, cut), made here so
    # that its clock starts with the others'.
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    ids: list[int] = []
    for doc in (work / "train.txt").read_text().split("\n\n"):
        if doc.strip():
            ids += hf_tok(doc)["input_ids"]
    torch.save(torch.tensor(ids[: len(ids) // SEQ_LEN * SEQ_LEN]).view(-1, SEQ_LEN), work / "hf_blocks.pt")
    meta["heldout_blocks"], meta["heldout_masked_tokens"] = len(blocks), int((labels != -100).sum())
    meta_path.write_text(json.dumps(meta, indent=2))
    return meta


def sweep_valid(work: Path) -> Path:
    """The HF sweep's validation: the last ``SWEEP_VALID_BLOCKS`` of HF's training blocks (which HF then never trains
    on), masked once at 15% like the held-out blocks. The held-out test blocks play no part in choosing the LR."""
    path = work / "sweep_valid.pt"
    if not path.exists():
        import torch

        from data_pipelines.masking import Masker, MaskingConfig, mask_generator
        from data_pipelines.tokenizer import load_tokenizer

        tok = load_tokenizer(work / "tokenizer")
        blocks = torch.load(work / "hf_blocks.pt", weights_only=True)[-SWEEP_VALID_BLOCKS:]
        masker = Masker(tok.vocab_size, tok.special_ids, tok.mask_id, MaskingConfig(0.15))
        masked, labels = masker(blocks, mask_generator(0, 0, 0, stream=8))
        torch.save({"input_ids": masked, "labels": labels}, path)
    return path


# -- contenders -------------------------------------------------------------------------------------
# The quickstart's recipe before it moved onto budget_cpu (conf/experiment/quickstart.yaml until 2026-12-02), with a
# cap of steps the budget never reaches: dropout 0.1 (the model default), 15% masking, LR 1e-3, clip 1.0, no ramp.
PREVIOUS_DEFAULT = ["model=tiny", "batch=tiny", "trainer=cpu", "optim.lr=1e-3", "optim.warmup_steps=100",
                    "trainer.max_steps=1000000", "trainer.val_every_n_steps=250", "trainer.limit_val_batches=20",
                    "trainer.gradient_clip_val=1.0", "checkpoint.every_n_steps=500", "data.num_workers=0"]
OURS = {"ours-budget": ["experiment=budget_cpu"], "modernbert-tiny": ["experiment=budget_cpu", "model=modernbert_tiny"],
        "ours-default": PREVIOUS_DEFAULT}


def has_modernbert() -> bool:
    """Whether this checkout has the ``modernbert_tiny`` preset (the contender appears with it)."""
    sys.path.insert(0, str(ROOT))
    from roberta_pl.model import PRESETS

    return "modernbert_tiny" in PRESETS


def ours_command(recipe: str, seconds: float, work: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "roberta_pl.pretraining.app", *OURS[recipe], f"trainer.max_time={int(seconds)}s",
            f"data.train_shards={work / 'shards'}", f"data.valid_shards={work / 'shards'}",
            f"data.tokenizer={work / 'tokenizer'}", f"run_dir={out}", "fill_mask=[]", "logger=csv",
            "trainer.enable_progress_bar=false", "resume=never"]


def train_hf(seconds: float, work: Path, out: Path, lr: float, warmup_ratio: float, seed: int = 0) -> dict:
    """The HF recipe for ``seconds`` of training (clock started after data preparation and model build)."""
    import torch
    import transformers
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    # run_mlm.py's group_texts blocks (prepare()), less the sweep's validation blocks at the end.
    blocks = torch.load(work / "hf_blocks.pt", weights_only=True)[:-SWEEP_VALID_BLOCKS]
    config = transformers.RobertaConfig(vocab_size=len(tok), hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=512, max_position_embeddings=SEQ_LEN + 2, type_vocab_size=1,
                                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, layer_norm_eps=1e-5)
    model = transformers.RobertaForMaskedLM(config).train()
    collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    # get_linear_schedule_with_warmup's shape, its horizon set once the step rate is known: until then (the
    # 12-step probe) the warm-up is unbounded, so the LR stays near 0, as it would at the start of a warm-up.
    horizon = {"steps": 10**9, "warmup": 10**9}

    def lr_factor(s: int) -> float:
        w, n = horizon["warmup"], horizon["steps"]
        return s / w if s < w else max(0.0, (n - s) / max(1, n - w))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    generator = torch.Generator().manual_seed(seed)
    start, step, probe = time.monotonic(), 0, None
    while True:
        for batch_rows in torch.randperm(len(blocks), generator=generator).split(GLOBAL_BATCH):
            if len(batch_rows) < GLOBAL_BATCH:
                continue
            batch = collator([{"input_ids": row} for row in blocks[batch_rows]])
            loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.monotonic() - start
            if step == 2:
                probe = (time.monotonic(), step)
            if step == 12:  # size the schedule to the budget from the rate of steps 3-12
                per_step = (time.monotonic() - probe[0]) / (step - probe[1])
                horizon["steps"] = step + max(1, int((seconds - elapsed) / per_step))
                horizon["warmup"] = max(step, math.ceil(warmup_ratio * horizon["steps"]))
            if step >= horizon["steps"] or elapsed >= seconds:
                model.save_pretrained(out / "hf")
                return {"steps": step, "train_seconds": elapsed, "tokens": step * GLOBAL_BATCH * SEQ_LEN, "lr": lr,
                        "warmup_steps": horizon["warmup"] if step >= 12 else None}


def evaluate(hf_dir: Path, work: Path, blocks: str = "heldout.pt") -> dict:
    """Held-out masked-token accuracy and loss of an HF directory (the same blocks and masks for everyone)."""
    import torch
    import transformers

    data = torch.load(work / blocks, weights_only=True)
    model = transformers.AutoModelForMaskedLM.from_pretrained(hf_dir).eval()
    correct = total = 0
    loss_sum = 0.0
    with torch.no_grad():
        for ids, labels in zip(data["input_ids"].split(64), data["labels"].split(64)):
            logits = model(input_ids=ids).logits
            keep = labels != -100
            picked, targets = logits[keep], labels[keep]
            loss_sum += float(torch.nn.functional.cross_entropy(picked.float(), targets, reduction="sum"))
            correct += int((picked.argmax(-1) == targets).sum())
            total += int(keep.sum())
    return {"heldout_accuracy": correct / total, "heldout_loss": loss_sum / total, "heldout_masked_tokens": total}


def side_by_side(contenders: dict[str, float | None], minutes: float, base: Path, work: Path, threads: int,
                 blocks: str = "heldout.pt") -> dict:
    """All ``contenders`` at once for one budget, then each scored on ``blocks``. A contender is ours (value None)
    or the HF recipe at a peak LR (the value)."""
    seconds = minutes * 60
    shutil.rmtree(base, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(ROOT), "ROBERTA_PL_CACHE": str(work / "cache")}
    procs = {}
    for name, lr in contenders.items():
        out = base / name
        out.mkdir(parents=True)
        cmd = (ours_command(name, seconds, work, out) if lr is None else
               [sys.executable, __file__, "--_hf", str(seconds), "--work", str(work), "--_out", str(out),
                "--hf-lr", str(lr)])
        log = open(out / "log.txt", "w")
        procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), log, time.monotonic())
    ended: dict[str, float] = {}
    while len(ended) < len(procs):  # each contender's own end time (start-up, final validation and export included)
        for name, (proc, _, _) in procs.items():
            if name not in ended and proc.poll() is not None:
                ended[name] = time.monotonic()
        time.sleep(0.2)
    results = {}
    for name, (proc, log, t0) in procs.items():
        log.close()
        out = base / name
        if proc.returncode != 0:
            tail = (out / "log.txt").read_text().strip().splitlines()[-1:]
            raise SystemExit(f"bench/quality.py: {name} failed (exit {proc.returncode}): {tail}; see {out / 'log.txt'}")
        info = {"label": LABELS.get(name, name), "wall_seconds": ended[name] - t0}
        if contenders[name] is not None:
            info |= json.loads((out / "train.json").read_text())
        else:
            summary = json.loads((out / "summary.json").read_text())
            info |= {"steps": summary["global_step"], "val_accuracy": summary["metrics"].get("val/accuracy"),
                     "val_loss": summary["metrics"].get("val/loss"),
                     "budget_line": next((line.strip() for line in (out / "log.txt").read_text().splitlines()
                                          if line.startswith("Time budget")), None)}
        results[name] = info | evaluate(out / "hf", work, blocks)
    return results


def sweep_hf(lrs: list[float], minutes: float, work: Path, threads: int) -> dict:
    """The HF recipe at each LR side by side for ``minutes``; the lowest loss on the sweep's validation wins."""
    sweep_valid(work)
    runs = side_by_side({f"hf-lr{lr:g}": lr for lr in lrs}, minutes, work / "sweep", work, threads, "sweep_valid.pt")
    for lr, r in zip(lrs, runs.values()):
        print(f"  sweep {minutes:g} m  HF lr {lr:<7g} {r['steps']:>6} steps  valid loss {r['heldout_loss']:.3f}  "
              f"acc {r['heldout_accuracy']:.3f}", flush=True)
    best = min(zip(lrs, runs.values()), key=lambda x: x[1]["heldout_loss"])[0]
    return {"minutes": minutes, "lrs": lrs, "warmup_ratio": HF_WARMUP_RATIO, "best_lr": best,
            "selected_by": f"lowest masked-token loss on the last {SWEEP_VALID_BLOCKS} of HF's training blocks "
                           "(held back from its training), masked once at 15%",
            "runs": {f"{lr:g}": {k: v for k, v in r.items() if k != "label"} for lr, r in zip(lrs, runs.values())}}


def code_version() -> str:
    """This checkout's commit (``+dirty`` with uncommitted changes): points measured by other code are not merged."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def kept_budgets(path: Path, report: dict, budgets: list[float]) -> list[dict]:
    """The budgets of an earlier ``quality.json`` that this run does not redo, when they are comparable: the same
    corpus, shape, threads, HF LR, contenders, library versions and commit. So ``--budgets 20 --hf-lr X`` adds a point."""
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    same = ("corpus", "seq_len", "global_batch", "hf_lr", "hf_warmup_ratio", "contenders", "code")
    machine = ("cpus", "threads_each", "torch", "transformers")
    if any(old.get(k) != report[k] for k in same) or any(old["machine"].get(k) != report["machine"][k] for k in machine):
        print(f"{path}: another corpus, setup, HF LR or commit; its budgets are replaced, not merged", flush=True)
        return []
    return [entry for entry in old["budgets"] if entry["minutes"] not in budgets]


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    budgets = [r["minutes"] for r in report["budgets"]]
    for name in report["contenders"]:
        label = LABELS.get(name, name) + (f" ({report['hf_lr']:g})" if name == "hf" else "")
        ax.plot(budgets, [r["results"][name]["heldout_accuracy"] for r in report["budgets"]], marker="o", label=label,
                linestyle=":" if name == "hf-default-lr" else "-")
    ax.set_xlabel(f"wall-clock budget (minutes, {len(report['contenders'])} runs at once)")
    ax.set_ylabel("held-out masked-token accuracy")
    ax.set_title(f"{report['machine']['threads_each']} thread(s) each, {report['machine']['cpus']} CPUs, "
                 f"commit {report['code']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def print_budget(minutes: float, results: dict) -> None:
    for name, r in results.items():
        print(f"{minutes:>5g} m {r['label']:<27} {r['steps']:>6} {r['heldout_accuracy']:>12.3f} {r['heldout_loss']:>13.3f}",
              flush=True)
    hf = results["hf"]
    for name in (n for n in ("ours-budget", "modernbert-tiny") if n in results):
        r = results[name]
        ratio = f"{r['heldout_accuracy'] / hf['heldout_accuracy']:.2f}x" if hf["heldout_accuracy"] else "- (HF at 0)"
        print(f"        {name} / HF tuned: accuracy {ratio}, loss {r['heldout_loss']:.3f} vs {hf['heldout_loss']:.3f}",
              flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--budgets", type=float, nargs="+", default=[2, 5, 10, 20], help="minutes")
    p.add_argument("--quick", action="store_true", help="a 0.5-minute sweep and one 1-minute budget (a smoke check)")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 3), help="torch threads per contender")
    p.add_argument("--source", type=Path, default=Path("/usr/share/doc"), help="text to train and evaluate on")
    p.add_argument("--max-bytes", type=int, default=24_000_000, help="corpus size (unique paragraphs); "
                   "--quick: 4 MB unless given")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "roberta-pl-quality")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--hf-lrs", type=float, nargs="+", default=list(HF_LRS), help="the HF recipe's LR sweep")
    p.add_argument("--sweep-minutes", type=float, help="the sweep's budget (default: the shortest budget)")
    p.add_argument("--hf-lr", type=float, help="the HF recipe's peak LR, given: no sweep")
    p.add_argument("--hf-default-row", action=argparse.BooleanOptionalAction, default=True,
                   help=f"also run HF at TrainingArguments' default LR {HF_DEFAULT_LR:g} (labelled, not in the ratio)")
    p.add_argument("--previous-default", action="store_true", help="also run our quickstart recipe before budget_cpu")
    p.add_argument("--_hf", type=float, help=argparse.SUPPRESS)  # internal: run the HF contender for N seconds
    p.add_argument("--_out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick and "--max-bytes" not in (argv if argv is not None else sys.argv):
        a.max_bytes = 4_000_000
    if a._hf is not None:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        info = train_hf(a._hf, a.work, a._out, a.hf_lr, HF_WARMUP_RATIO)
        (a._out / "train.json").write_text(json.dumps(info))
        return
    budgets = [1.0] if a.quick else a.budgets
    sweep_minutes = a.sweep_minutes or (0.5 if a.quick else min(budgets))
    a.work = a.work / f"corpus-{a.max_bytes}"
    print(f"Preparing the corpus from {a.source} in {a.work} (cached) ...", flush=True)
    corpus = prepare(a.work, a.source, a.max_bytes)
    import torch
    import transformers

    sweep = None
    if a.hf_lr is None:
        print(f"HF LR sweep: {', '.join(f'{lr:g}' for lr in a.hf_lrs)} side by side for {sweep_minutes:g} min", flush=True)
        sweep = sweep_hf(a.hf_lrs, sweep_minutes, a.work, a.threads)
        a.hf_lr = sweep["best_lr"]
        print(f"  best HF LR: {a.hf_lr:g}", flush=True)
    contenders: dict[str, float | None] = {"ours-budget": None}
    contenders |= {"modernbert-tiny": None} if has_modernbert() else {}
    contenders |= {"ours-default": None} if a.previous_default else {}
    contenders |= {"hf": a.hf_lr} | ({"hf-default-lr": HF_DEFAULT_LR} if a.hf_default_row else {})
    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads_each": a.threads,
                          "torch": torch.__version__, "transformers": transformers.__version__},
              "code": code_version(), "corpus": corpus, "seq_len": SEQ_LEN, "global_batch": GLOBAL_BATCH,
              "contenders": list(contenders), "hf_lr": a.hf_lr, "hf_warmup_ratio": HF_WARMUP_RATIO,
              "hf_sweep": sweep, "headline": "ours-budget / hf (tuned LR); hf-default-lr is not in it", "budgets": []}
    suffix = "_quick" if a.quick else ""
    out_json = a.out_dir / f"quality{suffix}.json"
    kept = kept_budgets(out_json, report, budgets)
    if kept and sweep is None:  # --hf-lr with the LR an earlier file's sweep chose: its sweep stays on record
        report["hf_sweep"] = json.loads(out_json.read_text()).get("hf_sweep")
    print(f"{'budget':>7} {'contender':<27} {'steps':>6} {'held-out acc':>12} {'held-out loss':>13}")
    for minutes in budgets:
        started, load_before = time.strftime("%Y-%m-%dT%H:%M:%S%z"), os.getloadavg()
        results = side_by_side(contenders, minutes, a.work / f"runs-{minutes:g}min", a.work, a.threads)
        report["budgets"].append({"minutes": minutes, "started": started, "load_before": load_before,
                                  "load_after": os.getloadavg(), "results": results})
        print_budget(minutes, results)
    report["budgets"] = sorted(report["budgets"] + kept, key=lambda r: r["minutes"])
    a.out_dir.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, a.out_dir / f"quality{suffix}.png")
    print(f"wrote {out_json} and quality{suffix}.png ({len(kept)} budget(s) kept from the earlier file)")


if __name__ == "__main__":
    main()
