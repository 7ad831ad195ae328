"""Pretraining end to end with data.packing=packed_docs: a real Trainer on real shards, document_ids reaching the
model in training and validation, and a resume bit for bit equal to the uninterrupted run."""

import json

import torch
from test_pretrain import data_overrides, train  # noqa: F401

from roberta_pl.model import RobertaModel

PACKED = ["data.packing=packed_docs", "trainer.max_steps=6", "checkpoint.every_n_steps=2", "trainer.val_every_n_steps=3"]


def test_packed_docs_pretraining_resumes_bit_for_bit_with_document_ids_in_every_forward(tmp_path, data_overrides,
                                                                                         monkeypatch):
    seen: list[tuple[bool, int]] = []  # (in training, documents in the batch's fullest row) per forward
    forward = RobertaModel.forward

    def recording(self, input_ids, attention_mask=None, document_ids=None):
        seen.append((self.training, -1 if document_ids is None else int(document_ids[:, -1].max())))
        return forward(self, input_ids, attention_mask, document_ids)

    monkeypatch.setattr(RobertaModel, "forward", recording)
    straight = train(tmp_path / "straight", [*data_overrides, *PACKED])
    assert straight["global_step"] == 6
    # Every training and validation forward got the batch's document ids; rows hold several documents.
    assert {training for training, _ in seen} == {True, False} and min(n for _, n in seen) >= 0
    assert max(n for _, n in seen) >= 2
    train(tmp_path / "resumed", [*data_overrides, *PACKED, "trainer.stop_at_step=2"])
    train(tmp_path / "resumed", [*data_overrides, *PACKED])  # resume=auto picks up last.ckpt
    a = torch.load(tmp_path / "straight" / "checkpoints" / "last.ckpt", weights_only=True)
    b = torch.load(tmp_path / "resumed" / "checkpoints" / "last.ckpt", weights_only=True)
    assert a["global_step"] == b["global_step"] == 6
    assert a["MLMDataModule"]["pack_mode"] == "packed_docs"
    for k, v in a["state_dict"].items():
        assert torch.equal(v, b["state_dict"][k]), k  # bit for bit on CPU
    ha = json.loads((tmp_path / "straight" / "metrics_history.json").read_text())
    hb = json.loads((tmp_path / "resumed" / "metrics_history.json").read_text())
    assert [h for h in ha if "train_loss" in h] == [h for h in hb if "train_loss" in h]
    assert any("val_loss" in h for h in ha)
