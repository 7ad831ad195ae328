"""roberta-pl-embed: sentence embeddings of a file's texts, written to ``.npy``.

    roberta-pl-embed runs/quickstart/hf sentences.txt                  # one text per line -> sentences.npy
    roberta-pl-embed model.ckpt reviews.csv --column review --pooling cls -o reviews.npy

Row ``i`` of the array is the embedding of the file's ``i``-th text (``float32``, ``[N, hidden]``).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np
import torch

from data_pipelines.errors import DataError
from data_pipelines.tabular import Example, read_sequence_examples

log = logging.getLogger("roberta_pl.embed")


def read_texts(path: Path, column: str) -> list[Example]:
    """Texts of a ``.txt`` file (one per line: row i of the output is line i) or of a CSV/TSV/JSONL file's
    ``column``. A blank line inside a ``.txt`` file is refused with its number (a row for it would embed
    nothing, and dropping it would shift every later row off its line); blank lines at the end are ignored."""
    if path.suffix.lower() == ".txt":
        if not path.is_file():
            raise DataError(f"{path}: no such file")
        rows: list[Example] = []
        with path.open("rb") as fh:
            for i, raw in enumerate(fh, 1):
                try:
                    rows.append(Example(i, raw.decode("utf-8").rstrip("\r\n")))
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{i}: not UTF-8 (byte {e.start}: {e.reason}); convert the file, "
                                    f"e.g. iconv -f latin1 -t utf-8") from None
        while rows and not rows[-1].text.strip():
            rows.pop()
        blank = next((r.line for r in rows if not r.text.strip()), None)
        if blank is not None:
            raise DataError(f"{path}:{blank}: blank line; the output has one row per line, so remove blank lines "
                            f"(or use a CSV/JSONL file with a text column)")
        if not rows:
            raise DataError(f"{path}: no texts")
        return rows
    return read_sequence_examples(path, column, label_column=None, require_labels=False)


@torch.no_grad()
def embed(encoder: torch.nn.Module, tokenizer, texts: list[str], pooling: str = "mean", batch_size: int = 32,
          max_len: int | None = None, progress: bool = False) -> tuple[np.ndarray, int]:
    """Embeddings ``[N, hidden]`` (float32) and how many texts were cut to ``max_len`` tokens.

    Args:
        encoder: a :class:`~roberta_pl.model.RobertaModel`.
        tokenizer: a fine-tuning text tokenizer (:func:`data_pipelines.task_data.load_text_tokenizer`).
        pooling: ``mean`` over real tokens (``<s>`` and ``</s>`` included) or ``cls`` (the ``<s>`` state).
    """
    from data_pipelines.task_data import collate, encode_pair
    from roberta_pl.model import pool

    max_len = min(max_len or encoder.config.max_seq_len, encoder.config.max_seq_len)
    encoded = [encode_pair(tokenizer, ids, None, max_len) for ids in tokenizer.encode_batch(texts)]
    truncated = sum(cut for _, cut in encoded)
    device = next(encoder.parameters()).device
    # Longest first: batches of similar lengths pad little; rows are put back in file order at the end.
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    out = np.empty((len(encoded), encoder.config.hidden_size), dtype=np.float32)
    batches = range(0, len(order), batch_size)
    if progress:
        from rich.progress import track

        batches = track(batches, description="embedding", transient=True)
    encoder.eval()
    for start in batches:
        idx = order[start:start + batch_size]
        batch = collate([(encoded[i][0], None) for i in idx], tokenizer.pad_id, regression=False)
        mask = batch["attention_mask"].to(device)
        hidden = encoder(batch["input_ids"].to(device), mask)
        out[idx] = pool(hidden.float(), mask, pooling).cpu().numpy()
    return out, truncated


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="roberta-pl-embed", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("model", help="a roberta-pl .ckpt, a DeepSpeed checkpoint dir or a HF RoBERTa dir")
    p.add_argument("file", help=".txt (one text per line) or .csv/.tsv/.jsonl (see --column)")
    p.add_argument("-o", "--output", help="output .npy (default: FILE with the suffix .npy)")
    p.add_argument("--column", default="text", help="text column of a CSV/TSV/JSONL file (default: text)")
    p.add_argument("--pooling", choices=("mean", "cls"), default="mean", help="mean of token states or the <s> state (default: mean)")
    p.add_argument("--batch-size", type=int, default=32, help="texts per forward pass (default: 32)")
    p.add_argument("--max-length", type=int, help="tokens per text, <s> and </s> included (default: the model's)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: the model's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="torch device (default: cuda where available, else cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from data_pipelines.task_data import load_text_tokenizer
    from roberta_pl.checkpoints import load_encoder

    src = Path(args.file)
    out = Path(args.output) if args.output else src.with_suffix(".npy")
    try:
        if out.exists() and not args.overwrite:
            raise DataError(f"{out} exists; pass --overwrite to replace it or -o another path")
        examples = read_texts(src, args.column)
        encoder, tok_dir = load_encoder(args.model, args.tokenizer)  # the recorded one only if its hash matches
        if tok_dir is None:
            raise DataError(f"{args.model} records no tokenizer; pass --tokenizer")
        tokenizer = load_text_tokenizer(tok_dir)
        vectors, truncated = embed(encoder.to(args.device), tokenizer, [e.text for e in examples], args.pooling,
                                   args.batch_size, args.max_length, progress=sys.stderr.isatty())
    except (DataError, FileNotFoundError, KeyError, ValueError) as e:
        sys.exit(f"roberta-pl-embed: error: {e}")
    if truncated:
        log.warning("%s: %d of %d texts were cut to fit %d tokens", src, truncated, len(examples),
                    args.max_length or encoder.config.max_seq_len)
    tmp = out.with_name(out.name + ".tmp.npy")
    np.save(tmp, vectors)
    tmp.replace(out)
    print(f"Wrote {out}: {vectors.shape[0]} x {vectors.shape[1]} float32 ({args.pooling} pooling)")


if __name__ == "__main__":
    main()
