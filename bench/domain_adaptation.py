"""Domain adaptation: continue pretraining the model you have on your own text, against the same shape from scratch.

1. **The general model** (the one you already have): ``tiny`` pretrained on the embedded default corpus (docstrings
   of the Python standard library and torch) with ``roberta-pl-train experiment=budget_cpu
   trainer.max_time=<--general-minutes>`` and exported to ``<run>/hf`` with its tokenizer; or ``--general DIR``, any
   HF RoBERTa-family directory with its tokenizer.
2. **The domain**: prose it never saw, the documentation of this machine's packages (``/usr/share/doc``: READMEs,
   change logs, copyright notices), built by ``bench/quality.py``'s :func:`build_corpus` (paragraphs de-duplicated,
   1 in 20 held out by paragraph hash; "paragraphs" over 20,000 characters dropped), and sharded with the general model's own tokenizer:
   ``roberta-pl-data shards train.txt --tokenizer <general> --valid-fraction 0.02``.
3. **Two contenders, trained at the same time** for the same wall-clock budget on an equal share of the threads:
   ``continued`` (``roberta-pl-train experiment=budget_cpu pretrained=<general>``, warmup-stable-decay, 15% masking
   throughout) and ``scratch`` (the same shape from random weights, ``experiment=budget_cpu
   data.tokenizer=<general>``). Each one's peak LR is chosen first, as a user would: a short run per value (a step
   count), the two contenders' runs in pairs, the lowest final validation loss on the domain's valid split winning (the held-out split is never
   looked at for the choice).
4. **One score**: the general model before continuing, and both final models, loaded with
   ``transformers.AutoModelForMaskedLM`` and scored by ``quality.py``'s :func:`evaluate` on the same held-out blocks
   (the general tokenizer's, packed as training packs, masked once at 15%, 80/10/10, fixed seed): masked-token
   accuracy and loss.

    python bench/domain_adaptation.py                    # 12-20 minutes on 2 cores, as loaded
    python bench/domain_adaptation.py --quick            # 1-minute budgets: a smoke check (~3 minutes)
    python bench/domain_adaptation.py --general runs/mine/hf --minutes 10 --continued-lrs 2e-4 5e-4 1e-3

Writes ``bench/results/domain_adaptation.json`` (``_quick`` with ``--quick``). Nothing asserts a figure.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

# bench/ is this script's sys.path[0]
from quality import SEQ_LEN, build_corpus, code_version, evaluate

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
CONTENDERS = ("continued", "scratch")
# What turns the budget recipe into a continued-pretraining one: hold the peak LR and decay only at the end (wsd,
# as ModernBERT and MiniCPM continue) and BERT's constant 15% masking (the 30% -> 15% schedule is for a model learning
# from nothing; Gururangan et al. (2020) continue at 15%). The peak LR is swept. The warm-up stays budget_cpu's 200
# steps: the budget planner measures the step rate inside it (for min(warm-up / 2, 100) steps or 5% of the budget),
# and with a 50-step warm-up the continued run measured for 3 s while its rival was still starting, took the machine
# for its own, and fixed 1,605 steps against the rival's 909 (it overran a 5-minute budget by 1m40s).
CONTINUED = ["experiment=budget_cpu", "optim.decay=wsd", "data.mask_prob_start=null"]
SCRATCH = ["experiment=budget_cpu"]  # conf/experiment/budget_cpu.yaml as it is; the peak LR is swept
# A "paragraph" this long is a whole file with no blank line in it (a 1.45 MB Unicode glyph table was 70% of the
# held-out text of a 12 MB corpus), not prose: left out of both splits.
MAX_PARAGRAPH = 20_000
SHAPE_KEYS = ("hidden_size", "num_layers", "num_heads", "intermediate_size", "max_seq_len", "pre_layernorm")


# -- the general model and the domain ---------------------------------------------------------------
def train_general(minutes: float, work: Path, threads: int) -> tuple[Path, dict]:
    """``tiny`` on the embedded default corpus for ``minutes`` (the budget_cpu recipe); reused when already there."""
    run = work / f"general-{minutes:g}min"
    if not (run / "summary.json").exists():
        shutil.rmtree(run, ignore_errors=True)
        run.mkdir(parents=True)
        cmd = train_command(["experiment=budget_cpu"], run, seconds=minutes * 60)
        print(f"Training the general model: {minutes:g} min of `{' '.join(cmd[3:])}` ...", flush=True)
        info = run_together({"general": (cmd, run)}, threads)["general"]
    else:
        print(f"Reusing the general model in {run} (remove it to train another)", flush=True)
        info = run_info(run)
    return run / "hf", info


def drop_long_paragraphs(corpus: Path) -> dict:
    """Rewrite ``train.txt`` and ``heldout.txt`` (documents of ``\n``-joined paragraphs, blank-line separated)
    without the paragraphs longer than :data:`MAX_PARAGRAPH`; what was dropped, per split."""
    dropped = {}
    for name in ("train", "heldout"):
        path = corpus / f"{name}.txt"
        docs, n, size = [], 0, 0
        for doc in path.read_text().split("\n\n"):
            paras = [p for p in doc.split("\n") if p.strip()]
            kept = [p for p in paras if len(p) <= MAX_PARAGRAPH]
            n, size = n + len(paras) - len(kept), size + sum(len(p) for p in paras if len(p) > MAX_PARAGRAPH)
            docs += ["\n".join(kept)] if kept else []
        path.write_text("\n\n".join(docs) + "\n")
        dropped[name] = {"paragraphs": n, "chars": size, "documents": len(docs), "bytes": path.stat().st_size}
    return dropped


def prepare_domain(work: Path, source: Path, max_bytes: int, tokenizer_dir: Path, heldout_blocks: int) -> tuple[Path, dict]:
    """The domain corpus (cached per size), its shards written with ``tokenizer_dir`` and up to ``heldout_blocks``
    held-out blocks masked once (``heldout.pt``, what :func:`quality.evaluate` reads), cached per tokenizer hash."""
    import numpy as np
    import torch

    from data_pipelines.masking import Masker, MaskingConfig, mask_generator
    from data_pipelines.packing import pack_full_sentences
    from data_pipelines.tokenizer import load_tokenizer

    corpus = work / f"domain-{max_bytes}"
    if "after_dropping_paragraphs_over" not in (json.loads((corpus / "corpus.json").read_text())
                                                if (corpus / "corpus.json").exists() else {}):
        corpus.mkdir(parents=True, exist_ok=True)
        meta = build_corpus(corpus, source, max_bytes)
        meta["after_dropping_paragraphs_over"] = {"chars": MAX_PARAGRAPH, **drop_long_paragraphs(corpus)}
        (corpus / "corpus.json").write_text(json.dumps(meta, indent=2))
    tok = load_tokenizer(tokenizer_dir)
    data = corpus / f"tokenizer-{tok.hash[:16]}-heldout{heldout_blocks}"
    if not (data / "meta.json").exists():
        shutil.rmtree(data, ignore_errors=True)
        data.mkdir()
        # roberta-pl-data shards, from this checkout
        subprocess.run([sys.executable, "-m", "data_pipelines.cli", "shards", str(corpus / "train.txt"), "--tokenizer",
                        str(tokenizer_dir), "--out", str(data / "shards"), "--valid-fraction", "0.02"], check=True,
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        # The held-out split as training sees text (the same tokenizer, packer and masker), masked once.
        docs = tok.encode_corpus([d for d in (corpus / "heldout.txt").read_text().split("\n\n") if d.strip()])
        blocks = torch.from_numpy(np.stack(list(pack_full_sentences((np.asarray(d) for d in docs), SEQ_LEN,
                                                                    bos=tok.bos_id, eos=tok.eos_id))).astype(np.int64))
        masker = Masker(tok.vocab_size, tok.special_ids, tok.mask_id, MaskingConfig(0.15))
        if len(blocks) > heldout_blocks:  # evenly spaced, so every part of the source (files in path order) is in
            blocks = blocks[torch.linspace(0, len(blocks) - 1, heldout_blocks).long()]
        masked, labels = masker(blocks, mask_generator(0, 0, 0, stream=7))
        torch.save({"input_ids": masked, "labels": labels}, data / "heldout.pt")
        manifest = json.loads((data / "shards" / "manifest.json").read_text())
        meta = {"tokenizer": str(tokenizer_dir), "tokenizer_hash": tok.hash, "heldout_blocks": len(blocks),
                "heldout_masked_tokens": int((labels != -100).sum()),
                "shards": {split: {k: manifest["splits"][split][k] for k in ("num_docs", "num_tokens")}
                           for split in ("train", "valid")}}
        (data / "meta.json").write_text(json.dumps(meta, indent=2))
    return data, json.loads((corpus / "corpus.json").read_text()) | json.loads((data / "meta.json").read_text())


# -- training runs ----------------------------------------------------------------------------------
def train_command(recipe: list[str], out: Path, seconds: float | None = None, steps: int | None = None) -> list[str]:
    """roberta-pl-train with ``recipe`` for a wall-clock budget (``seconds``) or a step count."""
    length = ([f"trainer.max_time={int(seconds)}s"] if seconds is not None else  # a budget validates at its end itself
              [f"trainer.max_steps={steps}", "trainer.max_time=null", f"trainer.val_every_n_steps={steps}"])
    return [sys.executable, "-m", "roberta_pl.pretraining.app", *recipe, *length, f"run_dir={out}", "fill_mask=[]", "logger=csv", "trainer.enable_progress_bar=false", "resume=never"]


def contender_recipe(name: str, lr: float, general: Path, shards: Path, shape: list[str]) -> list[str]:
    data = ["data=shards", f"data.train_shards={shards}", f"data.valid_shards={shards}"]
    if name == "continued":
        return [*CONTINUED, f"pretrained={general}", *data, f"optim.lr={lr:g}"]
    return [*SCRATCH, *shape, *data, f"data.tokenizer={general}", f"optim.lr={lr:g}"]


def same_shape(general: Path) -> list[str]:
    """``model.*`` overrides that build the general model's architecture from random weights."""
    from roberta_pl.hf import read_hf_config

    config = read_hf_config(general)
    return [f"model.{k}={getattr(config, k)}" for k in SHAPE_KEYS]


def run_info(run: Path) -> dict:
    """Steps, tokens seen (the run's own batch plan, ramp included) and final validation figures of a finished run."""
    from omegaconf import OmegaConf

    from roberta_pl.batch_plan import plan_schedule

    summary = json.loads((run / "summary.json").read_text())
    batch = OmegaConf.load(run / ".hydra" / "config.yaml").batch
    plan = plan_schedule(batch.global_batch_size, batch.micro_batch_size, 1, batch.seq_len, batch.ramp)
    steps = summary["global_step"]
    log = (run / "log.txt").read_text().splitlines() if (run / "log.txt").exists() else []
    return {"steps": steps, "tokens": plan.micro_batches_before(steps) * plan.micro_batch_size * plan.seq_len,
            "val_loss": summary["metrics"].get("val/loss"), "val_accuracy": summary["metrics"].get("val/accuracy"),
            "budget_line": next((line.strip() for line in log if line.startswith("Time budget")), None)}


def run_together(jobs: dict[str, tuple[list[str], Path]], threads: int) -> dict[str, dict]:
    """Start every job at once, ``threads`` torch threads each, wait for all; each one's :func:`run_info` and its
    own wall time (start-up, final validation and export included)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    procs = {}
    with contextlib.ExitStack() as logs:
        for name, (cmd, out) in jobs.items():
            out.mkdir(parents=True, exist_ok=True)
            log = logs.enter_context(open(out / "log.txt", "w"))
            procs[name] = (subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT), time.monotonic())
        ended: dict[str, float] = {}
        while len(ended) < len(procs):
            for name, (proc, _) in procs.items():
                if name not in ended and proc.poll() is not None:
                    ended[name] = time.monotonic()
            time.sleep(0.2)
    results = {}
    for name, (proc, t0) in procs.items():
        out = jobs[name][1]
        if proc.returncode != 0:
            tail = (out / "log.txt").read_text().strip().splitlines()[-1:]
            raise SystemExit(f"bench/domain_adaptation.py: {name} failed (exit {proc.returncode}): {tail}; "
                             f"see {out / 'log.txt'}\ncommand: {' '.join(jobs[name][0])}")
        results[name] = {"wall_seconds": round(ended[name] - t0, 1)} | run_info(out)
    return results


def sweep(lrs: dict[str, list[float]], steps: int, base: Path, recipe, threads: int) -> dict[str, list[dict]]:
    """Each contender's LR values on a short run of ``steps`` steps (a step count, not a time budget: the points of a
    contender compare at equal steps whatever the machine's load did meanwhile), the two contenders' i-th values at
    the same time."""
    points: dict[str, list[dict]] = {name: [] for name in CONTENDERS}
    shutil.rmtree(base, ignore_errors=True)
    for i in range(len(lrs["continued"])):
        jobs = {name: (train_command(recipe(name, lrs[name][i]), base / f"{name}-lr{lrs[name][i]:g}", steps=steps),
                       base / f"{name}-lr{lrs[name][i]:g}") for name in CONTENDERS}
        for name, info in run_together(jobs, threads).items():
            points[name].append({"lr": lrs[name][i]} | info)
            print(f"  sweep {name:<9} lr {lrs[name][i]:<7g} {info['steps']:>5} steps  val loss {info['val_loss']:.3f}  "
                  f"val acc {info['val_accuracy']:.3f}", flush=True)
    return points


# -- the report -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--general", type=Path, help="an HF RoBERTa-family dir with its tokenizer (default: train one)")
    p.add_argument("--general-minutes", type=float, default=4, help="budget of the general model")
    p.add_argument("--minutes", type=float, default=5, help="budget of each contender (continued, scratch)")
    p.add_argument("--sweep-steps", type=int, default=250, help="steps of each LR sweep run (~1 min at 1 thread)")
    p.add_argument("--continued-lrs", type=float, nargs="+", default=[5e-4, 1e-3, 2e-3], help="peak LRs to try")
    p.add_argument("--scratch-lrs", type=float, nargs="+", default=[2e-3, 4e-3, 8e-3], help="peak LRs to try "
                   "(budget_cpu's is 2e-3)")
    p.add_argument("--quick", action="store_true", help="1-minute budgets, 2 LRs each on 100 steps, a 2 MB domain: a "
                   "smoke check")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2), help="torch threads per contender")
    p.add_argument("--source", type=Path, default=Path("/usr/share/doc"), help="the domain's text")
    p.add_argument("--max-bytes", type=int, default=12_000_000, help="domain corpus size (unique paragraphs)")
    p.add_argument("--heldout-blocks", type=int, default=2000, help="held-out blocks scored (evenly spaced)")
    p.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "roberta-pl-domain")
    p.add_argument("--out", type=Path, help="the JSON (default: bench/results/domain_adaptation[_quick].json)")
    a = p.parse_args(argv)
    given = set(argv if argv is not None else sys.argv[1:])
    if a.quick:  # each only where not given
        for flag, value in (("--general-minutes", 1), ("--minutes", 1), ("--sweep-steps", 100),
                            ("--continued-lrs", [5e-4, 1e-3]), ("--scratch-lrs", [2e-3, 4e-3]), ("--max-bytes", 2_000_000)):
            if flag not in given:
                setattr(a, flag[2:].replace("-", "_"), value)
    if len(a.continued_lrs) != len(a.scratch_lrs):  # the i-th of each train side by side: every point shares the machine
        p.error(f"--continued-lrs and --scratch-lrs: give as many of each ({len(a.continued_lrs)} and {len(a.scratch_lrs)})")
    started, t0, load_before = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.monotonic(), os.getloadavg()

    general_info = None
    if a.general is None:
        a.general, general_info = train_general(a.general_minutes, a.work, os.cpu_count() or 1)
    a.general = a.general.resolve()
    print(f"Preparing the domain from {a.source} with {a.general}'s tokenizer in {a.work} (cached) ...", flush=True)
    data, corpus = prepare_domain(a.work, a.source, a.max_bytes, a.general, a.heldout_blocks)
    shape = same_shape(a.general)

    def recipe(name: str, lr: float) -> list[str]:
        return contender_recipe(name, lr, a.general, data / "shards", shape)

    lrs = {"continued": a.continued_lrs, "scratch": a.scratch_lrs}
    points: dict[str, list[dict]] = {name: [] for name in CONTENDERS}
    if len(a.continued_lrs) > 1:
        print(f"LR sweep: {a.sweep_steps} steps a run, continued and scratch two at a time, "
              f"{a.threads} thread(s) each; the lowest final val loss wins", flush=True)
        points = sweep(lrs, a.sweep_steps, a.work / "sweep", recipe, a.threads)
    best = {name: min(points[name], key=lambda r: r["val_loss"])["lr"] if points[name] else lrs[name][0]
            for name in CONTENDERS}

    print(f"Final runs: {a.minutes:g} min each, at the same time (continued lr {best['continued']:g}, "
          f"scratch lr {best['scratch']:g}) ...", flush=True)
    base = a.work / f"final-{a.minutes:g}min"
    shutil.rmtree(base, ignore_errors=True)
    jobs = {name: (train_command(recipe(name, best[name]), base / name, seconds=a.minutes * 60), base / name)
            for name in CONTENDERS}
    import torch
    import transformers

    load_final = os.getloadavg()
    results = run_together(jobs, a.threads)
    transformers.utils.logging.disable_progress_bar()
    results = {"general": {"model": str(a.general)} | (general_info or {}) | evaluate(a.general, data),
               **{name: {"lr": best[name]} | results[name] | evaluate(base / name / "hf", data) for name in CONTENDERS}}

    print(f"\n{'held-out, ' + corpus['source']:<34} {'steps':>6} {'tokens':>11} {'accuracy':>9} {'loss':>7}")
    for name, label in (("general", "general (before continuing)"), ("continued", f"continued {a.minutes:g} min"),
                        ("scratch", f"scratch {a.minutes:g} min")):
        r = results[name]
        steps, tokens = (r.get("steps"), r.get("tokens")) if name != "general" else ("", "")
        print(f"{label:<34} {steps!s:>6} {tokens if tokens == '' else f'{tokens:,}':>11} "
              f"{r['heldout_accuracy']:>9.3f} {r['heldout_loss']:>7.3f}")
    acc = {name: results[name]["heldout_accuracy"] for name in results}
    print(f"continued - general = {acc['continued'] - acc['general']:+.3f}, "
          f"continued - scratch = {acc['continued'] - acc['scratch']:+.3f} accuracy")
    walls = [results[name]["wall_seconds"] for name in CONTENDERS]
    print(f"wall seconds (start-up and export included): continued {walls[0]:.0f}, scratch {walls[1]:.0f}"
          + (" -- NOT the same time: the budget planner's early rate measurement saw different loads"
             if abs(walls[0] - walls[1]) > 0.1 * min(walls) else ""))

    report = {
        "date": started, "code": code_version(), "wall_seconds": round(time.monotonic() - t0, 1),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads_each": a.threads,
                    "torch": torch.__version__, "transformers": transformers.__version__,
                    "load_before": load_before, "load_final_start": load_final, "load_after": os.getloadavg()},
        "settings": {"general": str(a.general), "general_minutes": None if general_info is None else a.general_minutes,
                     "minutes": a.minutes, "sweep_steps": a.sweep_steps, "seq_len": SEQ_LEN,
                     "recipes": {name: recipe(name, best[name]) for name in CONTENDERS},
                     "general_recipe": None if general_info is None else ["experiment=budget_cpu"]},
        "domain": corpus, "lr_sweeps": {name: {"tried": lrs[name], "chosen": best[name], "points": points[name]}
                                        for name in CONTENDERS},
        "results": results,
    }
    out = a.out or RESULTS / f"domain_adaptation{'_quick' if a.quick else ''}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {out} ({report['wall_seconds'] / 60:.1f} min in all)")


if __name__ == "__main__":
    main()
