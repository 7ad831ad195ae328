"""The RoBERTa model on packed_docs batches: each document's logits are those of the document alone, no token
attends across a boundary, and without document_ids nothing changes (cross-document attention is what we remove)."""

import pytest
import torch
from packed_docs import (
    assert_no_token_attends_across_documents,
    assert_packed_equals_each_document_alone,
    document_spans,
    packed_batch,
)

from roberta_pl.model import RobertaConfig, RobertaForMaskedLM

VOCAB = 300


def _model(**overrides) -> RobertaForMaskedLM:
    torch.manual_seed(0)
    config = RobertaConfig.from_name("tiny", vocab_size=VOCAB, **overrides)
    return RobertaForMaskedLM(config).eval()


@pytest.mark.parametrize("pre_layernorm", [False, True], ids=["post_ln", "pre_ln"])
def test_a_packed_batch_gives_each_documents_logits_alone(pre_layernorm):
    ids, docs = packed_batch(rows=3, seq_len=128, vocab_size=VOCAB)
    compared = assert_packed_equals_each_document_alone(_model(pre_layernorm=pre_layernorm), ids, docs)
    assert compared >= 3 * 3  # several documents a row
    assert any(row[0][0] == 0 and ids[b, 0] != 0 for b, row in enumerate(document_spans(docs)))  # a cut document


def test_no_token_attends_across_a_document_boundary():
    ids, docs = packed_batch(rows=2, seq_len=64, vocab_size=VOCAB, seed=1)
    model = _model()
    assert_no_token_attends_across_documents(model, ids, docs, VOCAB)
    # The check sees cross-document attention where there is some: the same batch as FULL-SENTENCES would run it.
    with torch.no_grad():
        changed = ids.clone()
        changed[0, :4] = torch.tensor([7, 8, 9, 10])
        assert not torch.equal(model(changed).logits[0, -4:], model(ids).logits[0, -4:])


def test_the_sparse_loss_and_gradients_run_on_packed_batches():
    ids, docs = packed_batch(rows=2, seq_len=64, vocab_size=VOCAB, seed=2)
    labels = torch.full_like(ids, -100)
    labels[:, 5::7] = ids[:, 5::7]
    model = _model().train()
    out = model(ids, labels=labels, document_ids=docs)
    out.loss.backward()
    assert torch.isfinite(out.loss) and out.logits.shape[0] == int((labels != -100).sum())
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
