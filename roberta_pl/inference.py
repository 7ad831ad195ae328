"""Fill-mask inference with our masked-LM model and SentencePiece tokenizer (``roberta-pl-fill-mask`` and the
predictions a pretraining run prints at the end)."""

from __future__ import annotations

import torch

@torch.no_grad()
def fill_mask(model: torch.nn.Module, tokenizer, text: str, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """Top-k (token, probability) for each ``<mask>`` in ``text``.

    Args:
        model: our masked-LM model (either architecture).
        tokenizer: a :class:`data_pipelines.tokenizer.SpmTokenizer` or an HF tokenizer (its mask token is one id).
        text: input containing at least one mask token (``<mask>``; ``[MASK]`` for BERT-style vocabularies).
        top_k: candidates per mask.
    """
    vocab = tokenizer.vocab_size
    if vocab > model.config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.path} has {vocab} tokens but the model {model.config.vocab_size}: "
                         f"not the tokenizer it was trained with")
    ids = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id][: model.config.max_seq_len]
    positions = [i for i, t in enumerate(ids) if t == tokenizer.mask_id]
    if not positions:
        raise ValueError(f"no {tokenizer.token_text(tokenizer.mask_id)} token in {text!r}")
    # Only the tokenizer's ids: the model may have more rows (model.vocab_size above the tokenizer's), none a token.
    logits = model.eval()(torch.tensor([ids])).logits[0, positions, :vocab]
    probs = logits.float().softmax(-1)
    top = probs.topk(top_k, dim=-1)
    return [[(tokenizer.token_text(int(i)), float(p)) for p, i in zip(ps, ix)]
            for ps, ix in zip(top.values, top.indices)]


def format_predictions(text: str, predictions: list[list[tuple[str, float]]], mask: str = "<mask>") -> str:
    """``text`` and, per mask (``mask``: the tokenizer's mask token, ``[MASK]`` for ModernBERT's), its candidates
    with probabilities; each token quoted as a Python string literal, so whitespace shows (``'\\n'``, ``' '``)."""
    lines = [text]
    for n, preds in enumerate(predictions, 1):
        lines.append(f"  {mask} #{n}: " + ", ".join(f"{tok!r} {p:.3f}" for tok, p in preds))
    return "\n".join(lines)
