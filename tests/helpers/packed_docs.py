"""Proofs of per-document attention for any masked-LM model of ours (RoBERTa, ModernBERT-class).

A model qualifies when ``model(input_ids, document_ids=ids)`` returns an output with ``.logits`` ``[B, T, V]`` and
``model(input_ids)`` runs one sequence. The batches come from the real ``packed_docs`` packer
(:func:`data_pipelines.packing.pack_packed_docs`) and :func:`data_pipelines.packing.document_ids`, so a row holds
several documents, and the first one of a row may be the rest of a document the previous row cut.
"""

from __future__ import annotations

import numpy as np
import torch

from data_pipelines.packing import document_ids, pack_packed_docs


def packed_batch(rows: int, seq_len: int, vocab_size: int, *, seed: int = 0, bos: int = 0, eos: int = 2,
                 first_id: int = 5, lengths: tuple[int, int] = (3, 40)) -> tuple[torch.Tensor, torch.Tensor]:
    """A ``packed_docs`` micro-batch of random documents.

    Args:
        rows, seq_len: the batch's shape.
        vocab_size: ids are drawn from ``[first_id, vocab_size)`` (no specials inside a document).
        seed: the documents' seed.
        bos, eos: the specials framing each document.
        first_id: the lowest ordinary id.
        lengths: document lengths are drawn from this range (without the two specials).

    Returns:
        ``(input_ids, document_ids)``, LongTensors ``[rows, seq_len]``.
    """
    rng = np.random.default_rng(seed)

    def docs():
        while True:
            yield rng.integers(first_id, vocab_size, size=int(rng.integers(*lengths)))

    blocks = np.stack([b for _, b in zip(range(rows), pack_packed_docs(docs(), seq_len, bos=bos, eos=eos))])
    return torch.from_numpy(blocks.astype(np.int64)), torch.from_numpy(document_ids(blocks, bos))


def document_spans(ids: torch.Tensor) -> list[list[tuple[int, int]]]:
    """Each row's documents as ``[start, end)`` spans (runs of equal ids)."""
    spans = []
    for row in ids.tolist():
        starts = [0] + [t for t in range(1, len(row)) if row[t] != row[t - 1]] + [len(row)]
        spans.append(list(zip(starts, starts[1:])))
    return spans


@torch.no_grad()
def assert_packed_equals_each_document_alone(model: torch.nn.Module, input_ids: torch.Tensor, doc_ids: torch.Tensor,
                                             atol: float = 1e-5) -> int:
    """The packed batch's per-token logits equal those of each document run alone, as a batch of one (fp32).

    Returns:
        The number of documents compared (so a caller can check the batch held several per row).
    """
    model.eval()
    packed = model(input_ids, document_ids=doc_ids).logits
    compared = 0
    for b, spans in enumerate(document_spans(doc_ids)):
        for lo, hi in spans:
            alone = model(input_ids[b:b + 1, lo:hi]).logits[0]
            torch.testing.assert_close(packed[b, lo:hi], alone, rtol=0, atol=atol,
                                       msg=lambda m, b=b, lo=lo, hi=hi: f"row {b}, document [{lo}, {hi}): {m}")
            compared += 1
    return compared


@torch.no_grad()
def assert_no_token_attends_across_documents(model: torch.nn.Module, input_ids: torch.Tensor,
                                             doc_ids: torch.Tensor, vocab_size: int, first_id: int = 5) -> None:
    """Replace the ordinary tokens of one document at a time: every other document's logits stay bit for bit the
    same, and the changed document's do change (so the check can see a change when there is one)."""
    model.eval()
    before = model(input_ids, document_ids=doc_ids).logits
    generator = torch.Generator().manual_seed(0)
    for b, spans in enumerate(document_spans(doc_ids)):
        for lo, hi in spans:
            changed = input_ids.clone()
            ordinary = changed[b, lo:hi] >= first_id
            changed[b, lo:hi][ordinary] = torch.randint(first_id, vocab_size, (int(ordinary.sum()),), generator=generator)
            after = model(changed, document_ids=doc_ids).logits
            inside = torch.zeros(input_ids.shape, dtype=torch.bool)
            inside[b, lo:hi] = True
            assert torch.equal(after[~inside], before[~inside]), f"row {b}: changing document [{lo}, {hi}) changed another's"
            assert not torch.equal(after[inside], before[inside])
