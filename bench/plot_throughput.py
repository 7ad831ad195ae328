"""Bar chart of training tokens/s, ours against HuggingFace, one panel per case, from the bench JSONs.

    python bench/plot_throughput.py [RESULTS_DIR]    # reads train_throughput_*.json, writes train_throughput.png
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
CASE_ORDER = ["cpu-tiny", "cpu-4x256", "gpu-base", "gpu-large"]


def plot(results_dir: Path = RESULTS) -> Path:
    """Draw every ``train_throughput_*.json`` in ``results_dir`` into ``train_throughput.png`` there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(p.read_text()) for p in sorted(Path(results_dir).glob("train_throughput_*.json"))]
    records.sort(key=lambda r: (CASE_ORDER.index(r["case"]) if r["case"] in CASE_ORDER else 99, r["case"]))
    out = Path(results_dir) / "train_throughput.png"
    if not records:
        raise FileNotFoundError(f"no train_throughput_*.json in {results_dir}")
    fig, axes = plt.subplots(1, len(records), figsize=(max(6.0, 4.2 * len(records)), 4.8), squeeze=False)
    for ax, rec in zip(axes[0], records):
        names = list(rec["results"])
        tps = [rec["results"][n]["tokens_per_s"] for n in names]
        colors = ["#9e9e9e" if n == rec["hf"] else "#1f77b4" for n in names]
        bars = ax.bar(names, tps, color=colors)
        for bar, n in zip(bars, names):
            r = rec["results"][n]
            label = f"{r.get('speedup_vs_hf_median_round', r['speedup_vs_hf']):.2f}x"  # paired rounds' median
            if r.get("mfu") is not None:
                label += f"\n{100 * r['mfu']:.0f}% MFU"
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=9)
        s, d = rec["settings"], rec["device"]
        c = rec["config"]
        ax.set_title(f"{rec['case']}: {c['num_layers']}x{c['hidden_size']}, vocab {c['vocab_size']}, seq {s['seq_len']} x "
                     f"{s['micro_batch']}, {s['precision']}, {s.get('torch_threads') or d.get('threads', '?')} thr"
                     f"{', fused AdamW' if d['type'] == 'cpu' and 'fused=True' in s['optimizer'] else ''}\n"
                     f"{d['name'][:40]}", fontsize=9)
        ax.set_ylabel("training tokens/s")
        ax.set_ylim(0, max(tps) * 1.25)
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle("RoBERTa MLM training tokens/s: roberta-pl (blue) vs transformers (grey)\n"
                 "same weights, batch, masks, precision and optimizer; labels: median paired-round speed-up over HF", fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


if __name__ == "__main__":
    print(plot(Path(sys.argv[1]) if len(sys.argv) > 1 else RESULTS))
