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
    vocab = tokenizer.vocab_size
    if vocab > model.config.vocab_size:
        raise ValueError(f"tokenizer {tokenizer.path} has {vocab} tokens but the model {model.config.vocab_size}: "
                         f"not the tokenizer it was trained with")
    ids = [tokenizer.bos_id, *tokenizer.encode(text), tokenizer.eos_id][: model.config.max_seq_len]
    positions = [i for i, t in enumerate(ids) if t == tokenizer.mask_id]
    if not positions:
        raise ValueError(f"no <mask> token in {text!r}")
    # Only the tokenizer's ids: the model may have more rows (model.vocab_size above the tokenizer's), none a token.
    logits = model.eval()(torch.tensor([ids])).logits[0, positions, :vocab]
    probs = logits.float().softmax(-1)
    top = probs.topk(top_k, dim=-1)
    return [[(token_text(tokenizer, int(i)), float(p)) for p, i in zip(ps, ix)]
            for ps, ix in zip(top.values, top.indices)]


def token_text(tokenizer, token_id: int) -> str:
    """What one predicted token puts in the text, as a user reads it.

    A word piece loses its word-start space ("▁the" → "the", as ``transformers``' fill-mask ``token_str``); a
    whitespace piece stays the whitespace it stands for ("▁▁▁▁" → four spaces, byte piece ``<0x0A>`` → a newline,
    which :func:`format_predictions` shows as ``'\\n'``); other ASCII byte pieces are their character. A lone
    non-ASCII byte (one byte of a multi-byte character) and the specials keep their piece (``<0xE2>``, ``<unk>``):
    no text stands for them alone.

    Args:
        tokenizer: a :class:`data_pipelines.tokenizer.SpmTokenizer`.
        token_id: the id.
    Returns:
        The token's text.
    """
    piece, sp = tokenizer.id_to_piece(token_id), tokenizer.sp
    if sp.is_byte(token_id):
        byte = int(piece[3:-1], 16)
        return chr(byte) if byte < 0x80 else piece
    if sp.is_control(token_id) or sp.is_unknown(token_id) or token_id in tokenizer.special_ids:
        return piece
    text = piece.replace("\u2581", " ")  # SentencePiece's word-start mark "▁" is a space
    return text.strip() or text


def format_predictions(text: str, predictions: list[list[tuple[str, float]]]) -> str:
    """``text`` and, per ``<mask>``, its candidates with probabilities; each token quoted as a Python string
    literal, so whitespace shows (``'\\n'``, ``' '``)."""
    lines = [text]
    for n, preds in enumerate(predictions, 1):
        lines.append(f"  <mask> #{n}: " + ", ".join(f"{tok!r} {p:.3f}" for tok, p in preds))
    return "\n".join(lines)
