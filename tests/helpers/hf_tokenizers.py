"""HuggingFace RoBERTa-family tokenizer directories built locally, with no download.

Two layouts, as the hub's checkpoints have them:

- :func:`byte_bpe_tokenizer_dir`: a byte-level BPE trained by ``tokenizers``, roberta-base's layout
  (``<s>``=0 ``<pad>``=1 ``</s>``=2 ``<unk>``=3, then the 256 byte symbols and the merges, ``<mask>`` the last id,
  taking the space before it), with ``tokenizer.json``, ``vocab.json`` and ``merges.txt``;
- :func:`xlmr_tokenizer_dir`: a SentencePiece unigram model trained by ``sentencepiece``, saved as XLM-R's
  (``<s>``=0 ``<pad>``=1 ``</s>``=2 ``<unk>``=3, the model's pieces shifted by fairseq's offset of 1,
  ``<mask>`` last), with ``sentencepiece.bpe.model`` and ``tokenizer.json``.

Both load with ``transformers.AutoTokenizer.from_pretrained(dir)``. :func:`local_texts` gives real text to train
them on that is not the fixture corpus (standard-library docstrings): the Python language reference that ships
with every CPython (``pydoc_data``), topped up from the licence texts of ``/usr/share/common-licenses``.
"""

from __future__ import annotations

import io
import json
import shutil
import tempfile
from pathlib import Path

SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3 in both layouts; <mask> is the last id


def local_texts(n: int = 2000) -> list[str]:
    """``n`` lines of real English from this machine (Python's language reference, then licence texts), in a
    fixed order: lines keep their indentation, blank and letterless lines are left out."""
    import pydoc_data.topics

    sources = [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)]
    licences = Path("/usr/share/common-licenses")
    if licences.is_dir():
        sources += [p.read_text(errors="replace") for p in sorted(licences.iterdir()) if p.is_file()]
    lines: list[str] = []
    for text in sources:
        for line in text.splitlines():
            line = line.rstrip()
            if any(c.isalpha() for c in line):
                lines.append(line)
                if len(lines) == n:
                    return lines
    if len(lines) < n:
        raise RuntimeError(f"only {len(lines)} lines of local text on this machine, {n} asked for")
    return lines


def byte_bpe_tokenizer_dir(out: Path, texts: list[str], vocab_size: int = 1000) -> Path:
    """A roberta-base-style tokenizer directory: byte-level BPE trained on ``texts``.

    Args:
        out: the directory to write (created).
        texts: training text, one line or document per item.
        vocab_size: ids in all, ``<mask>`` included (at most: a small text may give fewer merges).

    Returns:
        ``out``, holding ``tokenizer.json``, ``tokenizer_config.json``, ``special_tokens_map.json``,
        ``vocab.json`` (with ``<mask>``, as roberta-base's) and ``merges.txt``.
    """
    from tokenizers import AddedToken, ByteLevelBPETokenizer
    from transformers import RobertaTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size - 1, min_frequency=2, special_tokens=list(SPECIALS),
                            show_progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        vocab_file, merges_file = bpe.save_model(tmp)
        vocab = json.loads(Path(vocab_file).read_text())
        vocab["<mask>"] = len(vocab)
        Path(vocab_file).write_text(json.dumps(vocab, ensure_ascii=False))
        # roberta-base's <mask> takes the space before it (lstrip), so "The <mask> sat." is The, <mask>, Ġsat, .
        tok = RobertaTokenizer(vocab=vocab_file, merges=merges_file,
                               mask_token=AddedToken("<mask>", lstrip=True, rstrip=False))
        tok.save_pretrained(out)
        for name in (vocab_file, merges_file):  # transformers 5 writes only tokenizer.json; the hub's dirs have both
            shutil.copy(name, out / Path(name).name)
    _write_special_tokens_map(out)
    return out


def xlmr_tokenizer_dir(out: Path, texts: list[str], vocab_size: int = 1000) -> Path:
    """An XLM-R-style tokenizer directory: a SentencePiece unigram model trained on ``texts``.

    The model keeps SentencePiece's own specials (``<unk>``=0 ``<s>``=1 ``</s>``=2) and NFKC normalisation, as
    XLM-R's does; the HF layout puts ``<s> <pad> </s> <unk>`` at 0..3, every other piece one id later, ``<mask>``
    last.

    Args:
        out: the directory to write (created).
        texts: training text, one line per item.
        vocab_size: ids in all, ``<pad>`` and ``<mask>`` included (at most, as for :func:`byte_bpe_tokenizer_dir`).

    Returns:
        ``out``, holding ``sentencepiece.bpe.model``, ``tokenizer.json``, ``tokenizer_config.json`` and
        ``special_tokens_map.json``.
    """
    import sentencepiece as spm
    from tokenizers import AddedToken
    from transformers import XLMRobertaTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(0)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(texts), model_writer=model, model_type="unigram",
                                   vocab_size=vocab_size - 2, hard_vocab_limit=False, num_threads=1, minloglevel=2)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "sentencepiece.bpe.model").write_bytes(model.getvalue())
        # xlm-roberta-base's <mask> takes the space before it too
        tok = XLMRobertaTokenizer.from_pretrained(tmp, mask_token=AddedToken("<mask>", lstrip=True, rstrip=False))
        tok.save_pretrained(out)
    (out / "sentencepiece.bpe.model").write_bytes(model.getvalue())
    _write_special_tokens_map(out)
    return out


def _write_special_tokens_map(out: Path) -> None:
    # transformers 5 keeps these in tokenizer_config.json; the hub's RoBERTa dirs also carry the older file.
    path = out / "special_tokens_map.json"
    if not path.exists():
        specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "sep_token": "</s>",
                    "pad_token": "<pad>", "cls_token": "<s>", "mask_token": "<mask>"}
        path.write_text(json.dumps(specials, indent=2) + "\n")


MODERNBERT_SPECIALS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")  # after the BPE's ids, as ModernBERT's 50280..4


def modernbert_tokenizer_dir(out: Path, texts: list[str], vocab_size: int = 1000) -> Path:
    """A ModernBERT-style tokenizer directory: byte-level BPE trained on ``texts`` with no specials of its own, then
    ``[UNK] [CLS] [SEP] [PAD] [MASK]`` appended as the last ids (``[MASK]`` taking the space before it), and the
    ``[CLS] A [SEP]`` template, as answerdotai/ModernBERT-base's ``tokenizer.json`` has them.

    Args:
        out: the directory to write (created).
        texts: training text.
        vocab_size: ids in all, the five specials included (at most, as for :func:`byte_bpe_tokenizer_dir`).

    Returns:
        ``out``, holding ``tokenizer.json``, ``tokenizer_config.json`` and ``special_tokens_map.json``.
    """
    from tokenizers import AddedToken, ByteLevelBPETokenizer, processors
    from transformers import PreTrainedTokenizerFast

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size - len(MODERNBERT_SPECIALS), min_frequency=2,
                            show_progress=False)
    tok = bpe._tokenizer
    tok.add_special_tokens([AddedToken(t, lstrip=t == "[MASK]", rstrip=False, normalized=False, special=True)
                            for t in MODERNBERT_SPECIALS])
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(single="[CLS]:0 $A:0 [SEP]:0",
                                                       pair="[CLS]:0 $A:0 [SEP]:0 $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]",
                                   pad_token="[PAD]", mask_token="[MASK]", model_input_names=["input_ids",
                                                                                              "attention_mask"])
    fast.save_pretrained(out)
    specials = {"unk_token": "[UNK]", "cls_token": "[CLS]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                "mask_token": "[MASK]"}
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
    return out
