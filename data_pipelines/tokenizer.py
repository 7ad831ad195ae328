"""Train and load the SentencePiece BPE tokenizer, with fairseq/RoBERTa special ids.

Ids 0..4 are ``<s> <pad> </s> <unk> <mask>`` exactly as in fairseq/RoBERTa, so a converted
HuggingFace checkpoint and our own code agree without remapping. ``<mask>`` is a SentencePiece
*user-defined* symbol, so a literal "<mask>" in text encodes to the single id 4 (what fill-mask
needs).

Normalisation is the identity (no NFKC, no whitespace collapsing): the text you give is the text
you get back from ``decode``, and the HuggingFace ``tokenizer.json`` written next to the model
reproduces the ids exactly without needing SentencePiece's compiled normaliser. Characters not in
the vocabulary fall back to byte pieces ``<0xNN>``, so nothing is ever ``<unk>``.

Runs of spaces (code indentation, aligned tables) are cheap: with ``whitespace_pieces`` (the default)
SentencePiece learns whitespace-only pieces ("▁▁▁▁") from lines trained with their indentation, so
eight spaces of indentation are one or two tokens, not eight bare "▁" (on Python source, whitespace
pieces fall from 36% of the tokens to 9%, and the text takes 30% fewer tokens). The text is unchanged:
decode still returns it exactly, indentation included.

Output directory layout (what :func:`load_tokenizer` reads; it reads any HuggingFace RoBERTa-family tokenizer
directory too, as :class:`data_pipelines.hf_tokenizer.HFTokenizer`)::

    spm.model               the SentencePiece model
    tokenizer_meta.json     vocab size, special ids, content hash, training settings, lines read and sampled
    tokenizer.json          HuggingFace fast-tokenizer file (written without transformers: data_pipelines.spm_to_hf)
    tokenizer_config.json   so AutoTokenizer adds <s> … </s> and knows <mask>
    special_tokens_map.json
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import os
import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import sentencepiece as spm

from data_pipelines.corpus import iter_documents
from data_pipelines.errors import DataError, OnError, SkipReport

if TYPE_CHECKING:
    from data_pipelines.hf_tokenizer import HFTokenizer

log = logging.getLogger("data_pipelines")

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
BOS_ID, PAD_ID, EOS_ID, UNK_ID, MASK_ID = range(5)
MODEL_FILE = "spm.model"
META_FILE = "tokenizer_meta.json"
# Every file a tokenizer directory holds (the layout above): what an export copies, by name, and nothing else.
TOKENIZER_FILES = (MODEL_FILE, META_FILE, "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")
WORD_START = "\u2581"  # SentencePiece's "▁": the piece begins a new whitespace-separated word
# Flags of :meth:`SpmTokenizer.word_start_table` (whole-word and span masking read them).
STARTS_WORD = 1  # the piece starts a word
ENDS_WORD = 2  # the piece is a word on its own: the piece after it starts a new word
WHITESPACE_BYTES = frozenset(b"\t\n\v\f\r ")


def _sentences(docs: Iterator[str], max_chars: int, keep_indent: bool = True) -> Iterator[str]:
    """SentencePiece learns from lines; documents are split into their lines, long ones clipped. Lines keep
    their indentation (``keep_indent``), so whitespace-only pieces are learned from it."""
    for doc in docs:
        for line in doc.split("\n"):
            line = line.rstrip() if keep_indent else line.strip()
            if line.strip():
                yield line[:max_chars]


def train_tokenizer(
    inputs: str | os.PathLike | Sequence[str | os.PathLike],
    out_dir: str | os.PathLike,
    vocab_size: int = 32000,
    *,
    input_sentence_size: int = 2_000_000,
    text_field: str = "text",
    on_error: OnError = "raise",
    seed: int = 0,
    character_coverage: float = 0.9999,
    max_sentence_chars: int = 4192,
    num_threads: int | None = None,
    model_max_length: int = 512,
    whitespace_pieces: bool = True,
    progress: bool = False,
) -> "SpmTokenizer":
    """Train a SentencePiece BPE tokenizer with byte fallback and RoBERTa special ids.

    Memory and time are bounded on any corpus size: SentencePiece keeps a uniform reservoir sample
    of ``input_sentence_size`` lines (``shuffle_input_sentence``), so a 10 GB corpus costs one
    streaming read plus training on the sample. ``tokenizer_meta.json`` records how many lines were
    read (``lines_read``) and sampled (``lines_sampled``).

    Args:
        inputs: files, directories, globs or ``"@default"`` (see :mod:`data_pipelines.corpus`).
        out_dir: directory to write the model, metadata and HuggingFace files into.
        vocab_size: total vocabulary including the 5 specials and 256 byte pieces.
        input_sentence_size: at most this many lines are sampled for training.
        text_field: JSON key holding the text in ``.jsonl`` inputs.
        on_error: ``"raise"`` or ``"skip"`` for bad input (see :func:`iter_documents`).
        seed: seed of SentencePiece's sampling, for reproducible tokenizers.
        character_coverage: fraction of characters kept as pieces; the rest use byte fallback.
        max_sentence_chars: lines are clipped to this many characters for training.
        num_threads: SentencePiece trainer threads (default: all cores).
        model_max_length: recorded in ``tokenizer_config.json`` for HuggingFace users.
        whitespace_pieces: learn whitespace-only pieces ("▁▁▁▁") so runs of spaces cost one token or two
            instead of one each (False: the earlier tokenizers, one "▁" per space).
        progress: show a rich spinner with the number of lines read.

    Returns:
        The trained tokenizer, loaded from ``out_dir``.
    """
    out = Path(out_dir)
    created = not out.exists()  # a directory this call made is removed again if training fails
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _train(out, inputs, vocab_size, input_sentence_size, text_field, on_error, seed, character_coverage,
                      max_sentence_chars, num_threads, model_max_length, whitespace_pieces, progress)
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        raise


def _train(out: Path, inputs, vocab_size, input_sentence_size, text_field, on_error, seed, character_coverage,
           max_sentence_chars, num_threads, model_max_length, whitespace_pieces, progress) -> "SpmTokenizer":
    report = SkipReport()
    docs = iter_documents(inputs, text_field=text_field, on_error=on_error, report=report)
    sentences = _sentences(docs, max_sentence_chars, keep_indent=whitespace_pieces)
    # Fail early with our own message instead of SentencePiece's when the corpus is empty.
    first = next(sentences, None)
    if first is None:
        raise DataError(f"no text found in {inputs!r}; nothing to train a tokenizer on")

    def all_sentences() -> Iterator[str]:
        yield first
        yield from sentences

    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    # Reading a large corpus is most of the wall time; show that it moves.
    bar = Progress(SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.completed:,} lines"),
                   TimeElapsedColumn(), disable=not progress)
    task = bar.add_task("reading corpus for SentencePiece", total=None)

    raised: list[BaseException] = []  # an error of our reader, which SentencePiece would wrap in its own
    lines_read = 0  # lines handed to SentencePiece: it reads them all, keeping a reservoir sample

    def counted(lines: Iterator[str]) -> Iterator[str]:
        nonlocal lines_read
        try:
            for lines_read, line in enumerate(lines, 1):
                if lines_read % 10_000 == 0:
                    bar.update(task, completed=lines_read)
                yield line
        except Exception as e:
            raised.append(e)
            raise
        bar.update(task, completed=lines_read)

    spm.set_random_generator_seed(seed)
    # Written to memory, not a temp dir: the model proto records model_prefix, and a random temp
    # path would make every training run hash differently.
    buffer = io.BytesIO()
    try:
        with bar:
            spm.SentencePieceTrainer.train(
                sentence_iterator=counted(all_sentences()),
                model_writer=buffer,
                model_type="bpe",
                vocab_size=vocab_size,
                byte_fallback=True,
                character_coverage=character_coverage,
                input_sentence_size=input_sentence_size,
                shuffle_input_sentence=True,
                max_sentence_length=max_sentence_chars * 4,  # bytes, and we clipped to chars
                normalization_rule_name="identity",
                remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=whitespace_pieces,
                split_digits=True,
                bos_id=BOS_ID,
                pad_id=PAD_ID,
                eos_id=EOS_ID,
                unk_id=UNK_ID,
                bos_piece="<s>",
                pad_piece="<pad>",
                eos_piece="</s>",
                unk_piece="<unk>",
                user_defined_symbols=["<mask>"],
                hard_vocab_limit=False,  # a small corpus yields a smaller vocab instead of failing
                num_threads=num_threads or os.cpu_count() or 1,
                minloglevel=2,
            )
    except RuntimeError as exc:
        if raised:  # bad input found after the first document: our one-line error, not "INTERNAL: DataError: ..."
            raise raised[0] from None
        too_small = re.search(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)", str(exc))
        if too_small:
            raise DataError(
                f"vocab_size {too_small[1]} is too small for this corpus: its characters and the specials need "
                f"{too_small[2]} ids; raise vocab_size or lower character_coverage"
            ) from None
        raise DataError(f"SentencePiece training failed: {exc}".splitlines()[0]) from None
    # SentencePiece samples min(lines, input_sentence_size) lines ("Sampled N sentences from M sentences" in its
    # log), all of them when input_sentence_size is 0; it drops no line of ours as too long (clipped above).
    lines_sampled = min(lines_read, input_sentence_size) if input_sentence_size > 0 else lines_read
    model_bytes = buffer.getvalue()
    (out / MODEL_FILE).write_bytes(model_bytes)
    tok = SpmTokenizer(out)
    if tok.mask_id != MASK_ID or tok.sp.piece_to_id("<mask>") != MASK_ID:
        raise AssertionError("SentencePiece did not place <mask> at id 4")
    meta = {
        "vocab_size": tok.vocab_size,
        "hash": tok.hash,
        "special_ids": dict(zip(SPECIAL_TOKENS, range(5))),
        "model_type": "bpe",
        "byte_fallback": True,
        "normalization": "identity",
        "whitespace_pieces": whitespace_pieces,
        "requested_vocab_size": vocab_size,
        "input_sentence_size": input_sentence_size,
        "lines_read": lines_read,
        "lines_sampled": lines_sampled,
        "seed": seed,
        "skipped_inputs": report.to_dict(),
    }
    (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    from data_pipelines.spm_to_hf import write_hf_files  # it reads this module's constants

    write_hf_files(tok, out, model_max_length=model_max_length)
    log.info("trained tokenizer %s: vocab %d, hash %s, on %d sampled of %d lines", out, tok.vocab_size, tok.hash,
             lines_sampled, lines_read)
    return tok


@dataclass
class SpmTokenizer:
    """A loaded tokenizer directory: SentencePiece model plus the RoBERTa special ids.

    Attributes:
        path: the tokenizer directory.
        sp: the underlying ``SentencePieceProcessor``.
        hash: 16 hex digits of a SHA-256 over the pieces, scores and piece types — the content
            that decides the ids; shards carry it.
    """

    path: Path
    bos_id: int = BOS_ID
    pad_id: int = PAD_ID
    eos_id: int = EOS_ID
    unk_id: int = UNK_ID
    mask_id: int = MASK_ID

    def __post_init__(self) -> None:
        self.path = Path(self.path)
        model = self.path / MODEL_FILE
        if not model.is_file():
            raise DataError(f"{self.path}: not a tokenizer directory (no {MODEL_FILE}); run `roberta-pl-data tokenizer`")
        data = model.read_bytes()
        self.sp = spm.SentencePieceProcessor(model_proto=data)
        self.hash = self._content_hash()
        ids = [self.sp.piece_to_id(p) for p in SPECIAL_TOKENS]
        if ids != list(range(5)):
            raise DataError(f"{model}: special ids are {ids}, expected <s>=0 <pad>=1 </s>=2 <unk>=3 <mask>=4")

    @property
    def files(self) -> tuple[str, ...]:
        """The names of its files in ``path`` (what an export copies back out)."""
        return tuple(name for name in TOKENIZER_FILES if (self.path / name).is_file())

    @property
    def space_id(self) -> int:
        """The id of the lone space piece "▁"."""
        return self.sp.piece_to_id(WORD_START)

    def _content_hash(self) -> str:
        # Hash what decides the ids (pieces, scores, piece types), not the file bytes: the proto
        # also records trainer settings such as the thread count, which differ between machines.
        sp = self.sp
        h = hashlib.sha256(b"spm-bpe-identity-v1\n")
        for i in range(sp.get_piece_size()):
            kind = "c" if sp.is_control(i) else "u" if sp.is_unknown(i) else "b" if sp.is_byte(i) else "n"
            h.update(f"{sp.id_to_piece(i)}\t{sp.get_score(i)!r}\t{kind}\n".encode())
        return h.hexdigest()[:16]

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials and byte pieces included."""
        return self.sp.get_piece_size()

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids never masked or drawn as random replacements."""
        return (self.bos_id, self.pad_id, self.eos_id, self.unk_id, self.mask_id)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without ``<s>``/``</s>``. A literal ``<mask>`` takes the spaces before it, as in
        pretraining, where a masked "▁word" becomes a bare ``<mask>`` (and as roberta-base's tokenizer does)."""
        return self._mask_takes_space(self.sp.encode(text, out_type=int))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of many texts (SentencePiece runs them in native threads)."""
        return [self._mask_takes_space(ids) for ids in self.sp.encode(list(texts), out_type=int)]

    def encode_corpus(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of corpus documents, every character of them text: a literal ``<mask>`` is spelled in ordinary
        pieces, not the user-defined symbol (``<s>``, ``</s>``, ``<pad>``, ``<unk>`` are control pieces, which
        SentencePiece never reads from text), so shards hold no control id but the ones packing adds (``encode``
        keeps the mask, for fill-mask and fine-tuning text)."""
        return self._corpus_sp.encode(list(texts), out_type=int)

    @functools.cached_property
    def _corpus_sp(self) -> spm.SentencePieceProcessor:
        # The same model with <mask> a control piece: not matched in text, never built by a merge; every other
        # piece, score and id as in spm.model.
        from sentencepiece import sentencepiece_model_pb2 as pb

        proto = pb.ModelProto()
        proto.ParseFromString((self.path / MODEL_FILE).read_bytes())
        for i in self.special_ids:
            if proto.pieces[i].type == pb.ModelProto.SentencePiece.USER_DEFINED:
                proto.pieces[i].type = pb.ModelProto.SentencePiece.CONTROL
        return spm.SentencePieceProcessor(model_proto=proto.SerializeToString())

    def _mask_takes_space(self, ids: list[int]) -> list[int]:
        # All the whitespace before it, as the lstrip of <mask> in our tokenizer.json (and roberta-base's) takes it:
        # "a  <mask>" and "a\t<mask>" are "▁a <mask>" too.
        mask = self.mask_id
        if mask not in ids:
            return ids
        whitespace, out = self._whitespace_ids, []
        for t in ids:
            if t == mask:
                while out and out[-1] in whitespace:
                    out.pop()
            out.append(t)
        return out

    @functools.cached_property
    def _whitespace_ids(self) -> frozenset[int]:
        return frozenset(np.flatnonzero(self.whitespace_table()).tolist())

    def token_text(self, token_id: int) -> str:
        """What one predicted token puts in the text, as a user reads it.

        A word piece loses its word-start space ("▁the" → "the", as ``transformers``' fill-mask ``token_str``); a
        whitespace piece stays the whitespace it stands for ("▁▁▁▁" → four spaces, byte piece ``<0x0A>`` → a
        newline); other ASCII byte pieces are their character. A lone non-ASCII byte (one byte of a multi-byte
        character) and the specials keep their piece (``<0xE2>``, ``<unk>``): no text stands for them alone.
        """
        token_id = int(token_id)
        piece, sp = self.id_to_piece(token_id), self.sp
        if sp.is_byte(token_id):
            byte = int(piece[3:-1], 16)
            return chr(byte) if byte < 0x80 else piece
        if sp.is_control(token_id) or sp.is_unknown(token_id) or token_id in self.special_ids:
            return piece
        text = piece.replace(WORD_START, " ")
        return text.strip() or text

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``; control tokens (``<s>``, ``</s>``, ``<pad>``) decode to nothing."""
        return self.sp.decode([int(i) for i in ids])

    def id_to_piece(self, token_id: int) -> str:
        """The piece string of one id, e.g. ``"▁the"``."""
        return self.sp.id_to_piece(int(token_id))

    def piece_to_id(self, piece: str) -> int:
        """The id of one piece (``unk_id`` when absent)."""
        return self.sp.piece_to_id(piece)

    def whitespace_table(self) -> np.ndarray:
        """Per piece, whether it is whitespace only: a bool array over the vocabulary, true for "▁", "▁▁▁▁" and
        the byte pieces of whitespace characters (``<0x0A>`` newline, ``<0x09>`` tab, ...)."""
        table = np.zeros(self.vocab_size, dtype=bool)
        for i in range(self.vocab_size):
            piece = self.sp.id_to_piece(i)
            if self.sp.is_byte(i):
                table[i] = int(piece[3:-1], 16) in WHITESPACE_BYTES
            elif not (self.sp.is_control(i) or self.sp.is_unknown(i)):
                table[i] = piece.strip(WORD_START) == ""
        return table

    def word_start_table(self) -> np.ndarray:
        """Per piece, where words start: a ``uint8`` array over the vocabulary of flags.

        A *word* is what whole-word and span masking select as one unit. ``STARTS_WORD`` (1) is
        set on a piece that starts a word: one beginning with "▁" (a space precedes it), a
        whitespace byte piece (``<0x0A>`` newline, ``<0x09>`` tab, ``<0x0D>``, ...), a piece made
        only of punctuation or symbols (Unicode categories P* and S*, a leading "▁" aside, e.g.
        ``.`` ``,`` ``▁(`` ``'`` ``=``; ASCII punctuation byte pieces too), and every special.
        ``ENDS_WORD`` (2) is also set on the whitespace, punctuation and special pieces: each is a
        word on its own, so the piece after it starts a new word even without "▁" — the first
        word of a line after ``<0x0A>``, ``bar`` in ``foo.bar``, ``t`` in ``don't`` (as BERT's
        basic tokenizer splits punctuation before whole-word masking). Every other piece (plain
        continuation pieces, non-ASCII byte pieces) continues the word before it. Truthy entries
        are exactly the word starts.
        """
        table = np.zeros(self.vocab_size, dtype=np.uint8)
        for i in range(self.vocab_size):
            piece = self.sp.id_to_piece(i)
            if self.sp.is_byte(i):
                byte = int(piece[3:-1], 16)
                text = chr(byte) if byte < 0x80 else ""  # a non-ASCII byte is part of a character
                if byte in WHITESPACE_BYTES:
                    table[i] = STARTS_WORD | ENDS_WORD
                    continue
            elif self.sp.is_control(i) or self.sp.is_unknown(i):
                continue
            else:
                text = piece
            body = text.lstrip(WORD_START)
            if body and all(unicodedata.category(c)[0] in "PS" for c in body):
                table[i] = STARTS_WORD | ENDS_WORD
            elif text.startswith(WORD_START):
                table[i] = STARTS_WORD
        table[list(self.special_ids)] = STARTS_WORD | ENDS_WORD
        return table


def load_tokenizer(path: str | os.PathLike) -> "SpmTokenizer | HFTokenizer":
    """Load a tokenizer directory: ours, or any HuggingFace RoBERTa-family tokenizer.

    Args:
        path: a directory written by :func:`train_tokenizer` (``spm.model``), or an HF tokenizer or model
            directory (``tokenizer.json``, ``vocab.json`` + ``merges.txt``, or ``sentencepiece.bpe.model``; see
            :mod:`data_pipelines.hf_tokenizer_files`).

    Returns:
        An :class:`SpmTokenizer` or an :class:`~data_pipelines.hf_tokenizer.HFTokenizer`; both give the ids,
        specials, word tables and files the data side uses.
    """
    from data_pipelines.hf_tokenizer import HFTokenizer  # both read this module's flags
    from data_pipelines.hf_tokenizer_files import EXPECTED, is_hf_tokenizer_dir

    path = Path(path)
    if (path / MODEL_FILE).is_file():
        return SpmTokenizer(path)
    if is_hf_tokenizer_dir(path):
        return HFTokenizer(path)
    if not path.is_dir():
        raise DataError(f"{path}: not a tokenizer directory (no such directory); expected one with {MODEL_FILE} "
                        f"(`roberta-pl-data tokenizer`) or {EXPECTED}")
    raise DataError(f"{path}: not a tokenizer directory: expected {MODEL_FILE} (`roberta-pl-data tokenizer`) or {EXPECTED}")
