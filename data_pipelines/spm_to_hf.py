"""HuggingFace files for our SentencePiece tokenizer, written by hand so transformers/tokenizers stay dev-only
dependencies.

``tokenizer.json`` (the same ids as ``spm.model``), ``tokenizer_config.json`` and ``special_tokens_map.json`` make
``AutoTokenizer.from_pretrained(dir)`` work on a directory :func:`data_pipelines.tokenizer.train_tokenizer` wrote.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING

from data_pipelines.tokenizer import BOS_ID, EOS_ID, SPECIAL_TOKENS, WORD_START

if TYPE_CHECKING:
    from data_pipelines.tokenizer import SpmTokenizer


def _bpe_merges(tok: SpmTokenizer) -> list[list[str]]:
    """Recover BPE merges from a SentencePiece BPE vocabulary.

    SentencePiece BPE applies the merge whose *result* has the best score (lowest id) first, so a
    merge ``(a, b)`` ranks by the id of ``a+b``; ties between splits of the same piece rank by the
    ids of the parts, as in transformers' ``SentencePieceExtractor``.
    """
    vocab = {tok.id_to_piece(i): i for i in range(tok.vocab_size)}
    control = set(SPECIAL_TOKENS)
    merges = []
    for piece, pid in vocab.items():
        if piece in control or len(piece) < 2:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in vocab and right in vocab and left not in control and right not in control:
                merges.append((pid, vocab[left], vocab[right], left, right))
    merges.sort()
    return [[left, right] for _, _, _, left, right in merges]


def write_hf_files(tok: SpmTokenizer, out_dir: str | os.PathLike, model_max_length: int = 512) -> None:
    """Write ``tokenizer.json`` and configs so ``AutoTokenizer.from_pretrained(out_dir)`` matches.

    The fast tokenizer mirrors the SentencePiece model: Metaspace pre-tokenisation ("▁" for
    spaces, one prepended at the start, no splitting), the same BPE vocabulary and merges with
    byte fallback, and a RoBERTa post-processor adding ``<s> … </s>`` (pairs:
    ``<s> A </s></s> B </s>``).

    Args:
        tok: the loaded tokenizer.
        out_dir: directory to write into.
        model_max_length: longest sequence HuggingFace should accept.
    """
    out = Path(out_dir)
    vocab = {tok.id_to_piece(i): i for i in range(tok.vocab_size)}
    added = [
        {"id": i, "content": piece, "single_word": False, "lstrip": piece == "<mask>", "rstrip": False,
         "normalized": False, "special": True}  # <mask> takes the space before it, as in roberta-base
        for i, piece in enumerate(SPECIAL_TOKENS)
    ]
    spec = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Metaspace", "replacement": WORD_START, "prepend_scheme": "first", "split": False},
        "post_processor": {
            "type": "RobertaProcessing",
            "sep": ["</s>", EOS_ID],
            "cls": ["<s>", BOS_ID],
            "trim_offsets": False,
            "add_prefix_space": False,
        },
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": WORD_START}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
                {"type": "Strip", "content": " ", "start": 1, "stop": 0},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": "<unk>",
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": True,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": _bpe_merges(tok),
        },
    }
    (out / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    specials = {
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
        "pad_token": "<pad>", "cls_token": "<s>", "mask_token": "<mask>",
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        "add_prefix_space": False,
        "model_input_names": ["input_ids", "attention_mask"],
        **specials,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
