"""roberta-pl-export CKPT OUT_DIR: a Lightning or DeepSpeed checkpoint -> a HuggingFace model directory."""

from __future__ import annotations

import argparse
import sys

from roberta_pl.checkpoints import export


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="roberta-pl-export",
        description="Export a roberta-pl checkpoint (Lightning .ckpt or DeepSpeed ZeRO directory, consolidated "
                    "to fp32) to a HuggingFace directory that transformers.AutoModelForMaskedLM loads.",
    )
    p.add_argument("checkpoint", help="Lightning .ckpt file or DeepSpeed checkpoint directory")
    p.add_argument("out_dir", help="output directory (created)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the one recorded in the checkpoint, if its hash "
                                       "is the recorded one); only its tokenizer files are copied")
    args = p.parse_args(argv)
    try:
        out = export(args.checkpoint, args.out_dir, args.tokenizer)
    except (OSError, ValueError, KeyError, RuntimeError) as e:  # OSError: an unreadable tokenizer file, a full disk
        sys.exit(f"roberta-pl-export: error: {e}")
    print(f"Exported to {out}")


if __name__ == "__main__":
    main()
