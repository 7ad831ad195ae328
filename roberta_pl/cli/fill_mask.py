"""roberta-pl-fill-mask MODEL "text with <mask>": the model's top-k tokens for each <mask>."""

from __future__ import annotations

import argparse
import sys

import torch

from roberta_pl.checkpoints import load_pretrained
from roberta_pl.model import RobertaForMaskedLM


@torch.no_grad()
def fill_mask(model: RobertaForMaskedLM, tokenizer, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """Top-k (token, probability) for each ``<mask>`` in ``text``.

    Args:
        model: our masked-LM model.
        tokenizer: a :class:`data_pipelines.tokenizer.SpmTokenizer` (``<mask>`` is one id).
        text: input containing at least one ``<mask>``.
        top_k: candidates per mask.
    """
    ids = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id][: model.config.max_seq_len]
    positions = [i for i, t in enumerate(ids) if t == tokenizer.mask_id]
    if not positions:
        raise ValueError(f"no <mask> token in {text!r}")
    logits = model.eval()(torch.tensor([ids])).logits[0, positions]
    probs = logits.float().softmax(-1)
    top = probs.topk(top_k, dim=-1)
    return [[(tokenizer.decode([int(i)]).strip() or tokenizer.id_to_piece(int(i)), float(p))
             for p, i in zip(ps, ix)] for ps, ix in zip(top.values, top.indices)]


def format_predictions(text: str, predictions: list[list[tuple[str, float]]]) -> str:
    lines = [text]
    for n, preds in enumerate(predictions, 1):
        lines.append(f"  <mask> #{n}: " + ", ".join(f"{tok!r} {p:.3f}" for tok, p in preds))
    return "\n".join(lines)


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
        model, tok_dir = load_pretrained(args.model)
        tok_dir = args.tokenizer or tok_dir
        if tok_dir is None:
            raise ValueError(f"{args.model} records no tokenizer; pass --tokenizer")
        tokenizer = load_tokenizer(tok_dir)
        for text in args.text:
            print(format_predictions(text, fill_mask(model, tokenizer, text, args.top_k)))
    except (FileNotFoundError, ValueError, KeyError) as e:
        sys.exit(f"roberta-pl-fill-mask: error: {e}")


if __name__ == "__main__":
    main()
