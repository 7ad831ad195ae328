"""Quality per wall-clock minute: our budget recipe against the HuggingFace recipe and our previous default.

For each budget, three contenders train **at the same time** on this machine, each on ``--threads`` torch threads,
from the same tokenizer and training text, with the same model shape (``tiny``: 2 layers x 128, 8k vocabulary,
128-token blocks, 32 sequences a step):

* ``ours-budget``: ``roberta-pl-train experiment=budget_cpu trainer.max_time=<budget>`` (dropout off, 30% -> 15%
  mask-rate schedule, batch ramp, LR decayed to the step count fixed from the measured rate, clip 0.5);
* ``ours-default``: the quickstart's recipe before it moved onto budget_cpu (dropout 0.1, 15% masking, peak LR 1e-3),
  with the same ``trainer.max_time`` so that its LR schedule also ends at the budget;
* ``hf``: ``transformers.RobertaForMaskedLM`` trained as ``run_mlm.py`` would: blocks of concatenated
  documents (``group_texts``), ``DataCollatorForLanguageModeling(mlm_probability=0.15)``, AdamW with the
  ``TrainingArguments`` defaults (lr 5e-5, betas 0.9/0.999, eps 1e-8, no weight decay, linear decay with no warm-up,
  clip 1.0); its decay horizon is sized to the budget from the rate of its first 10 steps.

Afterwards each model is loaded with ``transformers.AutoModelForMaskedLM`` and scored on the same held-out blocks,
masked once at 15% (80/10/10, fixed seed): masked-token accuracy and loss. The text is not the one the tests or
the quickstart train on: documentation files of this machine's packages (``/usr/share/doc``: READMEs, change
logs, copyright notices), paragraphs de-duplicated, split by paragraph hash into train and held-out (1 in 20).

    python bench/quality.py                 # budgets 2, 5, 10, 20 minutes (about 40 minutes in all)
    python bench/quality.py --quick         # one 1-minute budget: a smoke check
    python bench/quality.py --budgets 5 10 --threads 1

Writes ``bench/results/quality.json`` and ``quality.png`` (held-out accuracy by budget); budgets of an earlier
``quality.json`` on the same corpus, setup and commit that this run does not redo are kept. Nothing asserts a figure.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
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
CONTENDERS = ("ours-budget", "ours-default", "hf")
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


# -- contenders -------------------------------------------------------------------------------------
# The quickstart's recipe before it moved onto budget_cpu (conf/experiment/quickstart.yaml until 2026-12-02), with a
# cap of steps the budget never reaches: dropout 0.1 (the model default), 15% masking, LR 1e-3, clip 1.0, no ramp.
PREVIOUS_DEFAULT = ["model=tiny", "batch=tiny", "trainer=cpu", "optim.lr=1e-3", "optim.warmup_steps=100",
                    "trainer.max_steps=1000000", "trainer.val_every_n_steps=250", "trainer.limit_val_batches=20",
                    "trainer.gradient_clip_val=1.0", "checkpoint.every_n_steps=500", "data.num_workers=0"]


def ours_command(recipe: str, seconds: float, work: Path, out: Path) -> list[str]:
    recipe_args = {"ours-budget": ["experiment=budget_cpu"], "ours-default": PREVIOUS_DEFAULT}[recipe]
    return [sys.executable, "-m", "roberta_pl.pretraining.app", *recipe_args, f"trainer.max_time={int(seconds)}s",
            f"data.train_shards={work / 'shards'}", f"data.valid_shards={work / 'shards'}",
            f"data.tokenizer={work / 'tokenizer'}", f"run_dir={out}", "fill_mask=[]", "logger=csv",
            "trainer.enable_progress_bar=false", "resume=never"]


def train_hf(seconds: float, work: Path, out: Path, lr: float, seed: int = 0) -> dict:
    """The HF recipe for ``seconds`` of training (clock started after data preparation and model build)."""
    import torch
    import transformers
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling

    torch.manual_seed(seed)
    tok = AutoTokenizer.from_pretrained(work / "tokenizer")
    blocks = torch.load(work / "hf_blocks.pt", weights_only=True)  # run_mlm.py's group_texts blocks (prepare())
    config = transformers.RobertaConfig(vocab_size=len(tok), hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                        intermediate_size=512, max_position_embeddings=SEQ_LEN + 2, type_vocab_size=1,
                                        pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                        eos_token_id=tok.eos_token_id, layer_norm_eps=1e-5)
    model = transformers.RobertaForMaskedLM(config).train()
    collator = DataCollatorForLanguageModeling(tok, mlm_probability=0.15)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    horizon = {"steps": 10**9}
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: max(0.0, 1 - s / horizon["steps"]))
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
            if step == 12:  # size the linear decay to the budget from the rate of steps 3-12
                per_step = (time.monotonic() - probe[0]) / (step - probe[1])
                horizon["steps"] = step + max(1, int((seconds - elapsed) / per_step))
            if step >= horizon["steps"] or elapsed >= seconds:
                model.save_pretrained(out / "hf")
                return {"steps": step, "train_seconds": elapsed, "tokens": step * GLOBAL_BATCH * SEQ_LEN}


def evaluate(hf_dir: Path, work: Path) -> dict:
    """Held-out masked-token accuracy and loss of an HF directory (the same blocks and masks for everyone)."""
    import torch
    import transformers

    data = torch.load(work / "heldout.pt", weights_only=True)
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


def run_budget(minutes: float, work: Path, threads: int, hf_lr: float) -> dict:
    """All three contenders at once for one budget; then each is scored on the held-out blocks."""
    seconds = minutes * 60
    base = work / f"runs-{minutes:g}min"
    shutil.rmtree(base, ignore_errors=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": str(ROOT), "ROBERTA_PL_CACHE": str(work / "cache")}
    procs = {}
    for name in CONTENDERS:
        out = base / name
        out.mkdir(parents=True)
        cmd = (ours_command(name, seconds, work, out) if name != "hf" else
               [sys.executable, __file__, "--_hf", str(seconds), "--work", str(work), "--_out", str(out),
                "--hf-lr", str(hf_lr)])
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
        info = {"wall_seconds": ended[name] - t0}
        if name == "hf":
            info |= json.loads((out / "train.json").read_text())
        else:
            summary = json.loads((out / "summary.json").read_text())
            info |= {"steps": summary["global_step"], "val_accuracy": summary["metrics"].get("val/accuracy"),
                     "val_loss": summary["metrics"].get("val/loss"),
                     "budget_line": next((line.strip() for line in (out / "log.txt").read_text().splitlines()
                                          if line.startswith("Time budget")), None)}
        results[name] = info
    for name in CONTENDERS:
        results[name] |= evaluate(base / name / "hf", work)
    return results


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
    corpus, shape, threads, HF LR, library versions and commit. So ``--budgets 20`` adds a point to the 2/5/10 table."""
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    same = ("corpus", "seq_len", "global_batch", "hf_lr", "code")
    machine = ("cpus", "threads_each", "torch", "transformers")
    if any(old.get(k) != report[k] for k in same) or any(old["machine"].get(k) != report["machine"][k] for k in machine):
        print(f"{path}: another corpus, shape, setup or commit; its budgets are replaced, not merged", flush=True)
        return []
    return [entry for entry in old["budgets"] if entry["minutes"] not in budgets]


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    budgets = [r["minutes"] for r in report["budgets"]]
    for name in CONTENDERS:
        ax.plot(budgets, [r["results"][name]["heldout_accuracy"] for r in report["budgets"]], marker="o", label=name)
    ax.set_xlabel("wall-clock budget (minutes, 3 runs at once)")
    ax.set_ylabel("held-out masked-token accuracy")
    ax.set_title(f"tiny RoBERTa, {report['machine']['threads_each']} thread(s) each, {report['machine']['cpus']} CPUs")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--budgets", type=float, nargs="+", default=[2, 5, 10, 20], help="minutes")
    p.add_argument("--quick", action="store_true", help="one 1-minute budget (a smoke check)")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 3), help="torch threads per contender")
    p.add_argument("--source", type=Path, default=Path("/usr/share/doc"), help="text to train and evaluate on")
    p.add_argument("--max-bytes", type=int, default=24_000_000, help="corpus size (unique paragraphs); "
                   "--quick: 4 MB unless given")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "roberta-pl-quality")
    p.add_argument("--out-dir", type=Path, default=RESULTS)
    p.add_argument("--hf-lr", type=float, default=5e-5, help="the HF recipe's peak LR (TrainingArguments' default)")
    p.add_argument("--_hf", type=float, help=argparse.SUPPRESS)  # internal: run the HF contender for N seconds
    p.add_argument("--_out", type=Path, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.quick and "--max-bytes" not in (argv if argv is not None else sys.argv):
        a.max_bytes = 4_000_000
    if a._hf is not None:
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
        info = train_hf(a._hf, a.work, a._out, a.hf_lr)
        (a._out / "train.json").write_text(json.dumps(info))
        return
    budgets = [1.0] if a.quick else a.budgets
    a.work = a.work / f"corpus-{a.max_bytes}"
    print(f"Preparing the corpus from {a.source} in {a.work} (cached) ...", flush=True)
    corpus = prepare(a.work, a.source, a.max_bytes)
    import torch
    import transformers

    report = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads_each": a.threads,
                          "torch": torch.__version__, "transformers": transformers.__version__},
              "code": code_version(),
              "corpus": corpus, "seq_len": SEQ_LEN, "global_batch": GLOBAL_BATCH, "hf_lr": a.hf_lr, "budgets": []}
    suffix = "_quick" if a.quick else ""
    out_json = a.out_dir / f"quality{suffix}.json"
    kept = kept_budgets(out_json, report, budgets)
    print(f"{'budget':>7} {'contender':<13} {'steps':>6} {'held-out acc':>12} {'held-out loss':>13}")
    for minutes in budgets:
        started, load_before = time.strftime("%Y-%m-%dT%H:%M:%S%z"), os.getloadavg()
        results = run_budget(minutes, a.work, a.threads, a.hf_lr)
        report["budgets"].append({"minutes": minutes, "started": started, "load_before": load_before,
                                  "load_after": os.getloadavg(), "results": results})
        for name, r in results.items():
            print(f"{minutes:>5g} m {name:<13} {r['steps']:>6} {r['heldout_accuracy']:>12.3f} {r['heldout_loss']:>13.3f}",
                  flush=True)
        ours, hf, old = (results[n]["heldout_accuracy"] for n in ("ours-budget", "hf", "ours-default"))
        print(f"        ours-budget / hf = {ours / max(hf, 1e-9):.2f}x, ours-budget / ours-default = {ours / max(old, 1e-9):.2f}x")
    report["budgets"] = sorted(report["budgets"] + kept, key=lambda r: r["minutes"])
    a.out_dir.mkdir(parents=True, exist_ok=True)
    out_json.write_text(json.dumps(report, indent=2) + "\n")
    plot(report, a.out_dir / f"quality{suffix}.png")
    print(f"wrote {out_json} and quality{suffix}.png ({len(kept)} budget(s) kept from the earlier file)")


if __name__ == "__main__":
    main()
