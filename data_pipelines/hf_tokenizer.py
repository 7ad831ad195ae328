"""Any HuggingFace RoBERTa-family tokenizer, behind the interface of :class:`data_pipelines.tokenizer.SpmTokenizer`.

Its directory (``tokenizer.json``; ``vocab.json`` + ``merges.txt``; or ``sentencepiece.bpe.model``) becomes one
``tokenizer.json`` document (:mod:`data_pipelines.hf_tokenizer_files`) that the ``tokenizers`` library runs, as
``transformers`` does. Specials and their ids come from the tokenizer: roberta-base's ``<mask>`` is 50264, its last
id. Word boundaries come from the tokenizer's own mark, "Ġ" (a space, byte-level BPE) or "▁" (SentencePiece), with
the semantics of :meth:`~data_pipelines.tokenizer.SpmTokenizer.word_start_table`."""

from __future__ import annotations

import bisect
import functools
import hashlib
import json
import re
import unicodedata
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from data_pipelines.errors import DataError
from data_pipelines.hf_tokenizer_files import EXPECTED, HF_TOKENIZER_FILES, ROLES, special_names, tokenizer_spec
from data_pipelines.tokenizer import ENDS_WORD, STARTS_WORD, WHITESPACE_BYTES
from data_pipelines.tokenizer import WORD_START as METASPACE

_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@lru_cache(maxsize=1)
def byte_decoder() -> dict[str, int]:
    """Byte-level BPE's alphabet back to bytes (GPT-2's ``bytes_to_unicode``, inverted): "Ġ" is the space."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class HFTokenizer:
    """A loaded HF tokenizer directory, with the interface the data side uses from ``SpmTokenizer``.

    Attributes:
        path: the tokenizer directory.
        tok: the ``tokenizers.Tokenizer`` that encodes (no padding, no truncation, no ``<s> … </s>``).
        hash: 16 hex digits of a SHA-256 over what decides the ids (vocabulary, merges or piece scores, added
            tokens, normaliser and pre-tokeniser settings); shards carry it.
        mark: the word-start mark of its pieces, ``"Ġ"`` (byte-level BPE) or ``"▁"`` (SentencePiece).
        files: the names of its files in ``path`` (what an export copies back out).
        bos_id, eos_id, pad_id, unk_id, mask_id: the specials' ids, wherever they sit.
        special_ids: every id never masked nor drawn as a random replacement: the five above, every added special
            token, and ids no piece has.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise DataError(f"{self.path}: an HF tokenizer needs the tokenizers library; `pip install tokenizers`") from None
        names = special_names(self.path)
        spec = tokenizer_spec(self.path, names)
        try:
            self.tok = Tokenizer.from_str(json.dumps(spec))
        except Exception as exc:
            raise DataError(f"{self.path}: the tokenizers library cannot read it ({str(exc).splitlines()[0]})") from None
        self.tok.no_padding()  # we add specials, pack and pad ourselves
        self.tok.no_truncation()
        self.mark = _word_mark(spec)
        if self.mark is None:
            raise DataError(f"{self.path}: a {spec['model'].get('type')} tokenizer without byte-level or Metaspace "
                            f"pre-tokenization; expected {EXPECTED}")
        ids = {role: self.tok.token_to_id(name) for role, name in names.items()}
        missing = [names[r] for r, i in ids.items() if i is None]
        if missing:
            raise DataError(f"{self.path}: no {', '.join(missing)} token; expected {EXPECTED} with <s> <pad> </s> <unk> <mask>")
        self.bos_id, self.eos_id, self.pad_id, self.unk_id, self.mask_id = (ids[r] for r in ROLES)
        vocab = self.tok.get_vocab(with_added_tokens=True)
        self._vocab_size = max(vocab.values()) + 1
        self._added = {t["id"]: t for t in spec.get("added_tokens", [])}
        holes = set(range(self._vocab_size)) - set(vocab.values())  # ids no piece has (a gap in a hand-edited vocab)
        added_special = {i for i, t in self._added.items() if t.get("special")}
        self._special_ids = tuple(sorted({*ids.values(), *added_special, *holes}))
        self._byte_fallback = bool(spec["model"].get("byte_fallback"))
        self._spec = spec
        self.hash = _content_hash(spec)
        self.files = tuple(name for name in HF_TOKENIZER_FILES if (self.path / name).is_file())

    # -- the SpmTokenizer interface ---------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the model's embedding rows)."""
        return self._vocab_size

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids never masked or drawn as random replacements."""
        return self._special_ids

    @property
    def space_id(self) -> int | None:
        """The id of a lone space piece ("Ġ" or "▁"), None when the vocabulary has none."""
        return self.tok.token_to_id(self.mark)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without ``<s>``/``</s>``: ``transformers``' ids for it, a literal ``<mask>`` one id
        (taking the space before it where the tokenizer says so, as roberta-base's does)."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts (``tokenizers`` runs them in native threads)."""
        return [e.ids for e in self.tok.encode_batch(list(texts), add_special_tokens=False)]

    def encode_corpus(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of corpus documents, every character of them text: a literal ``<s>``, ``</s>``, ``<pad>``,
        ``<unk>`` or ``<mask>`` (HTML strikethrough, code) is spelled in ordinary pieces, never a special's id, so
        shards hold no control id but the ones packing adds (``encode`` keeps ``transformers``' ids, for fill-mask
        and fine-tuning text, where a typed ``<mask>`` is the mask)."""
        return [e.ids for e in self._corpus_tok.encode_batch(list(texts), add_special_tokens=False)]

    @functools.cached_property
    def _corpus_tok(self):
        """The tokenizer ``encode_corpus`` runs: this one with every special kept as text (``encode_special_tokens``)
        and no piece of the model itself that could spell one from text (see :func:`_spell_specials`)."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(json.dumps(_spell_specials(self._spec, set(self._special_ids))))
        tok.no_padding()
        tok.no_truncation()
        tok.encode_special_tokens = True
        return tok

    def encode_words(self, words: Sequence[str]) -> list[list[int]]:
        """Each word's token ids, as in the running text ``" ".join(words)`` (for token classification)."""
        # Encode the words as running text and give each token to the word its characters start in: the
        # pieces are then exactly those of the sentence (byte-level BPE marks word starts with a leading
        # space, which encoding words one by one would lose).
        text, starts = "", []
        for w in words:
            text += " " if text else ""
            starts.append(len(text))
            text += w
        enc = self.tok.encode(text, add_special_tokens=False)
        pieces: list[list[int]] = [[] for _ in words]
        for token_id, (begin, end) in zip(enc.ids, enc.offsets):
            while begin < end and text[begin] == " ":  # offsets may include the separating space
                begin += 1
            pieces[max(0, bisect.bisect_right(starts, begin) - 1)].append(token_id)
        return pieces

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; ``<s>``, ``</s>`` and ``<pad>`` decode to nothing, other specials to themselves."""
        drop = {self.bos_id, self.eos_id, self.pad_id}
        return self.tok.decode([int(i) for i in ids if int(i) not in drop], skip_special_tokens=False)

    def id_to_piece(self, token_id: int) -> str | None:
        """The piece string of one id, e.g. ``"Ġthe"`` or ``"▁the"`` (None for an id no piece has)."""
        return self.tok.id_to_token(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        """The id of one piece (``unk_id`` when absent)."""
        found = self.tok.token_to_id(piece)
        return self.unk_id if found is None else found

    def token_text(self, token_id: int) -> str:
        """What one predicted token puts in the text, as a user reads it (``transformers``' fill-mask
        ``token_str``): a word piece without its word-start space, a whitespace piece as the whitespace, a
        special or a lone byte of a multi-byte character as its piece."""
        raw = self._raw(int(token_id))
        if raw is None:
            return self.id_to_piece(token_id) or ""
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            return self.id_to_piece(token_id)
        return text.strip() or text

    def _raw(self, token_id: int) -> bytes | None:
        """The bytes a piece stands for (a space for its word-start mark); None for added tokens and holes."""
        if token_id in self._added:
            return None
        piece = self.tok.id_to_token(token_id)
        if piece is None:
            return None
        if self.mark == "Ġ":
            table = byte_decoder()
            return bytes(table[c] for c in piece) if all(c in table for c in piece) else piece.encode()
        byte = _BYTE_PIECE.fullmatch(piece) if self._byte_fallback else None
        return bytes([int(byte[1], 16)]) if byte else piece.replace(METASPACE, " ").encode()

    def _is_byte_piece(self, token_id: int) -> bool:
        piece = self.tok.id_to_token(token_id)
        return self._byte_fallback and piece is not None and _BYTE_PIECE.fullmatch(piece) is not None

    def whitespace_table(self) -> np.ndarray:
        """Per piece, whether it is whitespace only: a bool array over the vocabulary, true for "Ġ", "ĠĠĠ", "Ċ"
        (newline), "▁", "▁▁" and whitespace byte pieces."""
        table = np.zeros(self.vocab_size, dtype=bool)
        for i in range(self.vocab_size):
            raw = self._raw(i)
            table[i] = bool(raw) and all(b in WHITESPACE_BYTES for b in raw)
        return table

    def word_start_table(self) -> np.ndarray:
        """Per piece, where words start: ``uint8`` flags over the vocabulary, as
        :meth:`data_pipelines.tokenizer.SpmTokenizer.word_start_table` gives them.

        ``STARTS_WORD`` on a piece beginning with the word-start mark ("Ġ" or "▁": a space precedes it), on a
        piece of punctuation or symbols only (the mark aside), on whitespace, and on every special or added token;
        ``ENDS_WORD`` also on the punctuation pieces, the specials and added tokens, and on whitespace that holds
        more than spaces (a newline, a tab) or is a byte piece: each is a word on its own. A piece of spaces only
        ("Ġ", "▁▁▁▁") starts the word it precedes. Every other piece (a continuation, a lone byte of a multi-byte
        character) continues the word before it.
        """
        table = np.zeros(self.vocab_size, dtype=np.uint8)
        for i in range(self.vocab_size):
            raw = self._raw(i)
            if raw is None:
                table[i] = STARTS_WORD | ENDS_WORD
                continue
            if raw and all(b in WHITESPACE_BYTES for b in raw):
                alone = self._is_byte_piece(i) or any(b != 0x20 for b in raw)
                table[i] = STARTS_WORD | (ENDS_WORD if alone else 0)
                continue
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:  # part of a multi-byte character
                table[i] = STARTS_WORD if raw.startswith(b" ") else 0
                continue
            body = text.lstrip(" ")
            if body and all(unicodedata.category(c)[0] in "PS" for c in body):
                table[i] = STARTS_WORD | ENDS_WORD
            elif text.startswith(" "):
                table[i] = STARTS_WORD
        table[list(self.special_ids)] = STARTS_WORD | ENDS_WORD
        return table


def _word_mark(spec: dict) -> str | None:
    """ "Ġ" for byte-level pre-tokenization, "▁" for Metaspace (SentencePiece), None for anything else."""
    def types(node) -> list[str]:
        if not isinstance(node, dict):
            return []
        inner = node.get("pretokenizers") or node.get("decoders") or []
        return [node.get("type"), *(t for n in inner for t in types(n))]

    found = types(spec.get("pre_tokenizer")) + types(spec.get("decoder"))
    return "Ġ" if "ByteLevel" in found else METASPACE if "Metaspace" in found else None


def _spell_specials(spec: dict, special_ids: set[int]) -> dict:
    """A copy of ``spec`` that never turns text into one of ``special_ids``: each is a special added token (so
    ``encode_special_tokens`` leaves its text to the model), no BPE merge builds one, and a unigram model's piece
    of one scores below any other path (a piece in XLM-R's vocabulary, which the lattice matches otherwise). The
    unigram's lowest score also sets its ``<unk>`` penalty; that moves only a tie between paths with different
    numbers of unknown characters, which the unigrams SentencePiece trains do not have (every character of a
    piece is a piece). Every other text encodes as ``spec`` does."""
    spec = json.loads(json.dumps(spec))
    for token in spec.get("added_tokens", []):
        token["special"] = token.get("special") or token["id"] in special_ids
    model = spec["model"]
    if model.get("type") == "Unigram":
        floor = min((score for _, score in model["vocab"]), default=0.0) - 1e6
        for i in special_ids:
            if i < len(model["vocab"]):
                model["vocab"][i][1] = floor
    elif model.get("type") == "BPE":
        vocab = model.get("vocab") or {}
        specials = {piece for piece, i in vocab.items() if i in special_ids}
        joined = ["".join(m.split(" ") if isinstance(m, str) else m) for m in model.get("merges") or []]
        model["merges"] = [m for m, piece in zip(model.get("merges") or [], joined) if piece not in specials]
    return spec


def _content_hash(spec: dict) -> str:
    """16 hex digits of a SHA-256 over what decides the ids: the model (vocabulary in id order, merges or scores,
    settings other than their defaults), the added tokens, the normaliser and the pre-tokeniser (offset
    trimming aside). The post-processor and decoder change no id; padding and truncation we turn off."""
    model = {k: v for k, v in spec["model"].items() if v not in (None, False, "")}
    vocab = model.pop("vocab", [])
    if isinstance(vocab, dict):
        vocab = sorted(vocab.items(), key=lambda kv: kv[1])
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.pop("merges", [])]
    keys = ("id", "content", "single_word", "lstrip", "rstrip", "normalized", "special")
    added = sorted(({k: t.get(k) for k in keys} for t in spec.get("added_tokens", [])), key=lambda t: t["id"])

    def settings(node):
        if isinstance(node, dict):
            return {k: settings(v) for k, v in node.items() if k != "trim_offsets"}
        return [settings(v) for v in node] if isinstance(node, list) else node

    doc = {"model": model, "vocab": vocab, "merges": merges, "added_tokens": added,
           "normalizer": settings(spec.get("normalizer")), "pre_tokenizer": settings(spec.get("pre_tokenizer"))}
    h = hashlib.sha256(b"hf-tokenizer-v1\n")
    h.update(json.dumps(doc, sort_keys=True, ensure_ascii=False, separators=(",", ":")).encode())
    return h.hexdigest()[:16]
