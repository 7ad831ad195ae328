"""Any HuggingFace RoBERTa-family tokenizer, behind the interface of :class:`data_pipelines.tokenizer.SpmTokenizer`.

A directory is read in the first form it holds:

- ``tokenizer.json`` (roberta-base's byte-level BPE, XLM-R's SentencePiece unigram, the one we write beside
  ``spm.model``): run as it is by the ``tokenizers`` library, which is what ``transformers`` runs too;
- ``vocab.json`` + ``merges.txt`` (a byte-level BPE saved without ``tokenizer.json``): the same tokenizer that
  roberta-base's ``tokenizer.json`` describes is built from them, ``<mask>`` taking the space before it;
- ``sentencepiece.bpe.model`` (XLM-R's, a SentencePiece *unigram* model): built as ``transformers`` builds it,
  fairseq's layout ``<s>``=0 ``<pad>``=1 ``</s>``=2 ``<unk>``=3, the model's pieces one id later, ``<mask>`` last.

Specials and their ids come from the tokenizer (names from ``special_tokens_map.json`` or
``tokenizer_config.json``, else RoBERTa's): roberta-base's ``<mask>`` is 50264, its last id. Word boundaries come
from the tokenizer's own mark, "Ġ" (a space, byte-level BPE) or "▁" (SentencePiece), with the semantics of
:meth:`~data_pipelines.tokenizer.SpmTokenizer.word_start_table`.
"""

from __future__ import annotations

import base64
import bisect
import hashlib
import json
import re
import unicodedata
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from data_pipelines.errors import DataError
from data_pipelines.tokenizer import WHITESPACE_BYTES, ENDS_WORD, STARTS_WORD
from data_pipelines.tokenizer import WORD_START as METASPACE

TOKENIZER_JSON = "tokenizer.json"
VOCAB_JSON, MERGES_TXT = "vocab.json", "merges.txt"
SPM_MODEL = "sentencepiece.bpe.model"  # XLM-R's name (a unigram model, whatever the name says)
# Every file of an HF tokenizer directory that describes the tokenizer: what an export copies back out.
HF_TOKENIZER_FILES = (TOKENIZER_JSON, VOCAB_JSON, MERGES_TXT, SPM_MODEL, "added_tokens.json", "tokenizer_config.json",
                      "special_tokens_map.json")
EXPECTED = (f"an HF RoBERTa-family tokenizer ({TOKENIZER_JSON}, {VOCAB_JSON} + {MERGES_TXT}, or {SPM_MODEL})")
ROLES = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>", "mask": "<mask>"}
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def is_hf_tokenizer_dir(path: Path) -> bool:
    """Whether ``path`` holds one of the forms :class:`HFTokenizer` reads."""
    return ((path / TOKENIZER_JSON).is_file() or (path / SPM_MODEL).is_file()
            or ((path / VOCAB_JSON).is_file() and (path / MERGES_TXT).is_file()))


def read_own_file(path: Path, name: str) -> bytes:
    """The bytes of ``path / name``, refusing a symbolic link out of the directory.

    A tokenizer directory may come from a checkpoint's hyper-parameters, which anyone can edit: a link is followed
    only to a file inside the directory or, for a HuggingFace hub snapshot (``snapshots/REV/NAME ->
    ../../blobs/SHA``), inside its repository's ``blobs``.
    """
    file = path / name
    if file.is_symlink():
        root = path.resolve()
        inside = [root] + ([root.parent.parent / "blobs"] if root.parent.name == "snapshots" else [])
        try:
            target = file.resolve(strict=True)
        except (OSError, RuntimeError):  # dangling, or a loop of links
            target = None
        if target is None or not any(target.is_relative_to(d) for d in inside):
            raise DataError(f"{file} is a symbolic link out of its directory (to {target}); not read: replace the link "
                            f"with the file it points to")
    return file.read_bytes()


def _read_json(path: Path, name: str):
    try:
        return json.loads(read_own_file(path, name).decode("utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise DataError(f"{path / name}: not JSON ({str(exc).splitlines()[0]})") from None


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
        names = _special_names(self.path)
        spec = self._spec(names)
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
        self.hash = _content_hash(spec)
        self.files = tuple(name for name in HF_TOKENIZER_FILES if (self.path / name).is_file())

    # -- reading the directory -------------------------------------------------------------------------------
    def _spec(self, names: dict[str, str]) -> dict:
        """The ``tokenizer.json`` document of the directory: its own, or built from its other form."""
        path = self.path
        if (path / TOKENIZER_JSON).is_file():
            return _read_json(path, TOKENIZER_JSON)
        if (path / VOCAB_JSON).is_file() and (path / MERGES_TXT).is_file():
            return _byte_bpe_spec(path, names)
        if (path / SPM_MODEL).is_file():
            return _xlmr_spec(path, names)
        raise DataError(f"{path}: not a tokenizer directory: expected {EXPECTED}")

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


# -- building tokenizer.json documents -----------------------------------------------------------------------
def _special_names(path: Path) -> dict[str, str]:
    """The specials' names by role, from ``special_tokens_map.json`` or ``tokenizer_config.json`` (RoBERTa's
    names where neither says)."""
    names = dict(ROLES)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the map wins where both say
        if not (path / name).is_file():
            continue
        config = _read_json(path, name)
        for role in ROLES:
            value = config.get(f"{role}_token")
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                names[role] = value
    return names


def _added_token(token_id: int, content: str, special: bool, lstrip: bool = False) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": lstrip, "rstrip": False,
            "normalized": not special, "special": special}


def _byte_bpe_spec(path: Path, names: dict[str, str]) -> dict:
    """roberta-base's ``tokenizer.json`` for a ``vocab.json`` + ``merges.txt``: byte-level pre-tokenization, no
    prefix space, the specials as added tokens (``<mask>`` taking the space before it), ``<s> A </s>``."""
    vocab = _read_json(path, VOCAB_JSON)
    extra = _read_json(path, "added_tokens.json") if (path / "added_tokens.json").is_file() else {}
    try:
        lines = read_own_file(path, MERGES_TXT).decode("utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"{path / MERGES_TXT}: not UTF-8 text ({exc})") from None
    merges = []
    for n, line in enumerate(lines, 1):
        if not line.strip() or (n == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2:
            raise DataError(f"{path / MERGES_TXT}, line {n}: not a merge of two pieces: {line!r}")
        merges.append(parts)
    vocab = {**vocab, **{k: v for k, v in extra.items() if k not in vocab}}
    specials = set(names.values())
    added = []
    for role, name in names.items():  # a special the files lack goes last, as transformers adds it
        if name not in vocab:
            vocab[name] = max(vocab.values(), default=-1) + 1
        added.append(_added_token(vocab[name], name, True, lstrip=role == "mask"))
    added += [_added_token(i, t, False) for t, i in extra.items() if t not in specials]
    added.sort(key=lambda t: t["id"])
    config = _read_json(path, "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
    prefix = bool(config.get("add_prefix_space", False))
    level = {"type": "ByteLevel", "add_prefix_space": prefix, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": level,
        "post_processor": {"type": "RobertaProcessing", "sep": [names["eos"], vocab[names["eos"]]],
                           "cls": [names["bos"], vocab[names["bos"]]], "trim_offsets": True, "add_prefix_space": prefix},
        "decoder": {**level, "add_prefix_space": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }


def _xlmr_spec(path: Path, names: dict[str, str]) -> dict:
    """XLM-R's ``tokenizer.json`` for its SentencePiece model, as ``transformers`` converts it: the model's
    normaliser (its precompiled character map), split on whitespace, "▁" prepended to every word, the pieces one
    id later than in the model (fairseq's offset), ``<mask>`` last."""
    import sentencepiece as spm

    model_file = path / SPM_MODEL
    data = read_own_file(path, SPM_MODEL)
    try:
        sp = spm.SentencePieceProcessor(model_proto=data)
        proto = _proto_fields(data)
        trainer, normalizer = (_proto_fields(proto.get(n, [b""])[0]) for n in (2, 3))
    except (RuntimeError, ValueError, IndexError, KeyError):
        raise DataError(f"{model_file}: not a SentencePiece model") from None
    model_type = trainer.get(3, [1])[0]  # TrainerSpec.model_type: 1 unigram (the default), 2 BPE, 3 word, 4 char
    if model_type != 1:
        raise DataError(f"{model_file}: a SentencePiece {({2: 'BPE', 3: 'word', 4: 'char'}).get(model_type, model_type)} "
                        f"model; without a {TOKENIZER_JSON}, only XLM-R's kind (unigram) is read: add its {TOKENIZER_JSON}")
    if [sp.id_to_piece(i) for i in range(3)] != ["<unk>", "<s>", "</s>"]:
        raise DataError(f"{model_file}: its first pieces are {[sp.id_to_piece(i) for i in range(3)]}, expected XLM-R's "
                        f"<unk> <s> </s>; add its {TOKENIZER_JSON}")
    vocab = [[names[r], 0.0] for r in ("bos", "pad", "eos", "unk")]
    vocab += [[sp.id_to_piece(i), sp.get_score(i)] for i in range(3, sp.get_piece_size())]
    vocab.append([names["mask"], 0.0])
    added = [_added_token(i, names[r], True, lstrip=r == "mask")
             for r, i in (("bos", 0), ("pad", 1), ("eos", 2), ("unk", 3), ("mask", len(vocab) - 1))]
    charsmap = normalizer.get(2, [b""])[0]
    metaspace = {"type": "Metaspace", "replacement": METASPACE, "prepend_scheme": "always", "split": True}
    bos, eos = names["bos"], names["eos"]
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
        "normalizer": {"type": "Precompiled", "precompiled_charsmap": base64.b64encode(charsmap).decode()} if charsmap else None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [{"type": "WhitespaceSplit"}, metaspace]},
        "post_processor": {"type": "RobertaProcessing", "sep": [eos, 2], "cls": [bos, 0], "trim_offsets": True,
                           "add_prefix_space": True},
        "decoder": metaspace,
        "model": {"type": "Unigram", "unk_id": 3, "vocab": vocab, "byte_fallback": False},
    }


def _proto_fields(data: bytes) -> dict[int, list]:
    """The fields of one protobuf message by number: varints as ints, length-delimited ones as bytes (enough of
    protobuf to read a SentencePiece model's trainer and normaliser settings without the protobuf package)."""
    fields: dict[int, list] = {}
    pos = 0

    def varint() -> int:
        nonlocal pos
        value = shift = 0
        while True:
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while pos < len(data):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            value = varint()
        elif wire == 2:
            size = varint()
            value, pos = data[pos:pos + size], pos + size
        elif wire in (1, 5):
            value, pos = data[pos:pos + (8 if wire == 1 else 4)], pos + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"wire type {wire}")
        fields.setdefault(number, []).append(value)
    return fields


def _word_mark(spec: dict) -> str | None:
    """ "Ġ" for byte-level pre-tokenization, "▁" for Metaspace (SentencePiece), None for anything else."""
    def types(node) -> list[str]:
        if not isinstance(node, dict):
            return []
        inner = node.get("pretokenizers") or node.get("decoders") or []
        return [node.get("type"), *(t for n in inner for t in types(n))]

    found = types(spec.get("pre_tokenizer")) + types(spec.get("decoder"))
    return "Ġ" if "ByteLevel" in found else METASPACE if "Metaspace" in found else None


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
