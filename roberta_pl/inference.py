"""Fill-mask inference with our masked-LM model and SentencePiece tokenizer (``roberta-pl-fill-mask`` and the
predictions a pretraining run prints at the end)."""

from __future__ import annotations

import torch

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
