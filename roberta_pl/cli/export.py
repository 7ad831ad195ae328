"""roberta-pl-export CKPT OUT_DIR: a Lightning or DeepSpeed checkpoint -> a HuggingFace model directory."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from roberta_pl.checkpoints import load_pretrained
from roberta_pl.hf import save_hf


def export(checkpoint: str | Path, out_dir: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer files that
    ``transformers.AutoModelForMaskedLM`` / ``AutoTokenizer`` load.

    Args:
        checkpoint: a ``.ckpt`` file, a DeepSpeed checkpoint directory or a HF directory.
        out_dir: output directory.
        tokenizer: tokenizer directory; default: the one recorded in the checkpoint.
    """
    model, recorded = load_pretrained(checkpoint)
    tok = Path(tokenizer) if tokenizer else recorded
    if tok is not None and not tok.is_dir():
        raise FileNotFoundError(f"tokenizer directory {tok} not found; pass --tokenizer")
    return save_hf(model, out_dir, tokenizer=tok if tok != Path(out_dir) else None)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="roberta-pl-export",
        description="Export a roberta-pl checkpoint (Lightning .ckpt or DeepSpeed ZeRO directory, consolidated "
                    "to fp32) to a HuggingFace directory that transformers.AutoModelForMaskedLM loads.",
    )
    p.add_argument("checkpoint", help="Lightning .ckpt file or DeepSpeed checkpoint directory")
    p.add_argument("out_dir", help="output directory (created)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the one recorded in the checkpoint)")
    args = p.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out_dir, args.tokenizer)
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        sys.exit(f"roberta-pl-export: error: {e}")
    print(f"Exported to {out}")


if __name__ == "__main__":
    main()
