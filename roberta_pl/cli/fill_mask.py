"""roberta-pl-fill-mask MODEL "text with <mask>": the model's top-k tokens for each <mask>."""

from __future__ import annotations

import argparse
import sys

from roberta_pl.checkpoints import load_pretrained
from roberta_pl.inference import fill_mask, format_predictions


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="roberta-pl-fill-mask",
        description="Print a masked-LM's top-k predictions for each <mask> in TEXT. MODEL is a roberta-pl "
                    "checkpoint (.ckpt or DeepSpeed dir) or a HuggingFace directory written by roberta-pl-export.",
    )
    p.add_argument("model", help="checkpoint file/dir or HF model directory")
    p.add_argument("text", nargs="+", help='text containing <mask>, e.g. "The capital of France is <mask>."')
    p.add_argument("--top-k", type=int, default=5, help="candidates per mask (default: 5)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: recorded in the checkpoint / the HF dir)")
    args = p.parse_args(argv)
    from data_pipelines.tokenizer import load_tokenizer

    try:
        model, tok_dir = load_pretrained(args.model, args.tokenizer)  # the recorded one only if its hash matches
        if tok_dir is None:
            raise ValueError(f"{args.model} records no tokenizer; pass --tokenizer")
        tokenizer = load_tokenizer(tok_dir)
        for text in args.text:
            print(format_predictions(text, fill_mask(model, tokenizer, text, args.top_k),
                                     tokenizer.token_text(tokenizer.mask_id)))
    except (FileNotFoundError, ValueError, KeyError) as e:
        sys.exit(f"roberta-pl-fill-mask: error: {e}")


if __name__ == "__main__":
    main()
