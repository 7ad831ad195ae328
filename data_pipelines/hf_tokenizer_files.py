"""An HF tokenizer directory's files as one ``tokenizer.json`` document, which ``tokenizers`` runs.

A directory is read in the first form it holds:

- ``tokenizer.json`` (roberta-base's byte-level BPE, XLM-R's SentencePiece unigram, the one we write beside
  ``spm.model``): as it is, which is what ``transformers`` runs too;
- ``vocab.json`` + ``merges.txt`` (a byte-level BPE saved without ``tokenizer.json``): the document roberta-base's
  ``tokenizer.json`` is, built from them, ``<mask>`` taking the space before it;
- ``sentencepiece.bpe.model`` (XLM-R's, a SentencePiece *unigram* model): the document ``transformers`` converts it
  to, fairseq's layout ``<s>``=0 ``<pad>``=1 ``</s>``=2 ``<unk>``=3, the model's pieces one id later, ``<mask>`` last.

Specials are named by ``special_tokens_map.json`` or ``tokenizer_config.json``, else RoBERTa's names. No file is read
through a symbolic link out of its directory.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from data_pipelines.errors import DataError
from data_pipelines.tokenizer import WORD_START as METASPACE

TOKENIZER_JSON = "tokenizer.json"
VOCAB_JSON, MERGES_TXT = "vocab.json", "merges.txt"
SPM_MODEL = "sentencepiece.bpe.model"  # XLM-R's name (a unigram model, whatever the name says)
# Every file of an HF tokenizer directory that describes the tokenizer: what an export copies back out.
HF_TOKENIZER_FILES = (TOKENIZER_JSON, VOCAB_JSON, MERGES_TXT, SPM_MODEL, "added_tokens.json", "tokenizer_config.json",
                      "special_tokens_map.json")
EXPECTED = (f"an HF RoBERTa-family tokenizer ({TOKENIZER_JSON}, {VOCAB_JSON} + {MERGES_TXT}, or {SPM_MODEL})")
ROLES = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>", "mask": "<mask>"}
_BERT_ROLES = {"bos": "cls_token", "eos": "sep_token"}  # where a tokenizer names no bos/eos token


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


def read_json(path: Path, name: str):
    data = read_own_file(path, name)
    try:
        return json.loads(data.decode("utf-8"))
    except ValueError as exc:  # UnicodeDecodeError and json's JSONDecodeError both are
        raise DataError(f"{path / name}: not JSON ({str(exc).splitlines()[0]})") from None


def special_names(path: Path) -> dict[str, str]:
    """The specials' names by role, from ``special_tokens_map.json`` or ``tokenizer_config.json`` (RoBERTa's
    names where neither says). A BERT-style tokenizer without ``bos``/``eos`` tokens (ModernBERT's ``[CLS] A [SEP]``)
    gives its ``cls``/``sep`` tokens those roles: they open and close every sequence."""
    names, bert = dict(ROLES), {}
    for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the map wins where both say
        if not (path / name).is_file():
            continue
        config = read_json(path, name)
        for role, key, into in [(r, f"{r}_token", names) for r in ROLES] + [(r, k, bert) for r, k in _BERT_ROLES.items()]:
            value = config.get(key)
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str):
                into[role] = value
    return names | {role: value for role, value in bert.items() if names[role] == ROLES[role]}


def tokenizer_spec(path: Path, names: dict[str, str]) -> dict:
    """The ``tokenizer.json`` document of an HF tokenizer directory: its own, or built from its other form.

    Args:
        path: the directory.
        names: the specials' names by role (:func:`special_names`).
    """
    if (path / TOKENIZER_JSON).is_file():
        return read_json(path, TOKENIZER_JSON)
    if (path / VOCAB_JSON).is_file() and (path / MERGES_TXT).is_file():
        return _byte_bpe_spec(path, names)
    if (path / SPM_MODEL).is_file():
        return _xlmr_spec(path, names)
    raise DataError(f"{path}: not a tokenizer directory: expected {EXPECTED}")


def _added_token(token_id: int, content: str, special: bool, lstrip: bool = False) -> dict:
    return {"id": token_id, "content": content, "single_word": False, "lstrip": lstrip, "rstrip": False,
            "normalized": not special, "special": special}


def _byte_bpe_spec(path: Path, names: dict[str, str]) -> dict:
    """roberta-base's ``tokenizer.json`` for a ``vocab.json`` + ``merges.txt``: byte-level pre-tokenization, no
    prefix space, the specials as added tokens (``<mask>`` taking the space before it), ``<s> A </s>``."""
    vocab = read_json(path, VOCAB_JSON)
    extra = read_json(path, "added_tokens.json") if (path / "added_tokens.json").is_file() else {}
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
    config = read_json(path, "tokenizer_config.json") if (path / "tokenizer_config.json").is_file() else {}
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
