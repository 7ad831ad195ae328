"""MLMDataModule: the batch contract, exact resume (plain loop and a real Lightning Trainer)."""

from __future__ import annotations

import itertools
import logging

import lightning as L
import pytest
import torch
from data_fixtures import (  # noqa: F401
    corpus_file,
    mlm_datamodule,
    one_thread,
    shard_dir,
    tok,
    tokenizer_dir,
)

from data_pipelines.contract import DOCUMENT_IDS, IGNORE_INDEX, STEP_WINDOW
from data_pipelines.datamodule import DataSettings, MLMDataModule
from data_pipelines.errors import DataError

pytestmark = pytest.mark.usefixtures("one_thread")


def _dm(shard_dir, tokenizer_dir, **kw) -> MLMDataModule:
    args = dict(seq_len=64, micro_batch_size=4, valid_shards=shard_dir, strategy="whole_word", shuffle_window=8, seed=3)
    args.update(kw)
    return mlm_datamodule(shard_dir, tokenizer_dir, **args)


def _take(dm: MLMDataModule, n: int) -> list[dict]:
    """The next ``n`` train batches, across epoch boundaries, as a plain training loop would."""
    out = []
    while len(out) < n:
        for batch in dm.train_dataloader():
            out.append(batch)
            if len(out) == n:
                break
    return out


def _same(a: list[dict], b: list[dict]) -> bool:
    keys = ("input_ids", "attention_mask", "labels", DOCUMENT_IDS)
    return len(a) == len(b) and all(all(torch.equal(x[k], y[k]) for k in keys if k in x or k in y) for x, y in zip(a, b))


def test_batch_contract(shard_dir, tokenizer_dir, tok):
    dm = _dm(shard_dir, tokenizer_dir)
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", STEP_WINDOW}
    for k in ("input_ids", "attention_mask", "labels"):
        assert batch[k].dtype == torch.long and batch[k].shape == (4, 64)
    # The step's masked-token count (the loss's denominator): the whole accumulation window's, read ahead.
    dm = _dm(shard_dir, tokenizer_dir, accumulation=3)
    window = list(itertools.islice(iter(dm.train_dataloader()), 6))
    for start in (0, 3):
        masked = sum(int((b["labels"] != IGNORE_INDEX).sum()) for b in window[start:start + 3])
        assert [tuple(b[STEP_WINDOW][1:]) for b in window[start:start + 3]] == [(0, 3), (1, 3), (2, 3)]
        assert all(int(b[STEP_WINDOW].masked) == masked for b in window[start:start + 3])
    assert (batch["attention_mask"] == 1).all()  # FULL-SENTENCES: no padding
    doc = _dm(shard_dir, tokenizer_dir, pack_mode="doc")
    batches = list(itertools.islice(iter(doc.train_dataloader()), 20))
    mask = torch.cat([b["attention_mask"] for b in batches])
    ids = torch.cat([b["input_ids"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    assert (mask == 0).any() and torch.equal(mask == 0, ids == tok.pad_id)
    assert (labels[mask == 0] == IGNORE_INDEX).all()


def test_packed_docs_batches_carry_each_documents_boundaries_and_never_predict_its_specials(shard_dir, tokenizer_dir,
                                                                                             tok):
    dm = _dm(shard_dir, tokenizer_dir, pack_mode="packed_docs", num_workers=2)
    batches = list(itertools.islice(iter(dm.train_dataloader()), 12)) + list(dm.val_dataloader())
    assert all(set(b) >= {"input_ids", "attention_mask", "labels", DOCUMENT_IDS} for b in batches)
    ids = torch.cat([b["input_ids"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    docs = torch.cat([b[DOCUMENT_IDS] for b in batches])
    original = torch.where(labels != IGNORE_INDEX, labels, ids)
    assert docs.dtype == torch.long and docs.shape == ids.shape
    assert (torch.cat([b["attention_mask"] for b in batches]) == 1).all()  # no padding
    # Every <s> starts a document and every document but a row's first starts with <s>; the specials are kept.
    starts = torch.ones_like(docs, dtype=torch.bool)
    starts[:, 1:] = docs[:, 1:] != docs[:, :-1]
    assert torch.equal(starts[:, 1:], original[:, 1:] == tok.bos_id)
    assert torch.equal(ids == tok.bos_id, original == tok.bos_id) and torch.equal(ids == tok.eos_id, original == tok.eos_id)
    assert (labels[(original == tok.bos_id) | (original == tok.eos_id)] == IGNORE_INDEX).all()
    assert (docs[:, -1] > 1).any() and (labels != IGNORE_INDEX).any()  # several documents a row, and masked tokens


@pytest.mark.parametrize("num_workers, pack_mode", [(0, "full_sentences"), (2, "full_sentences"), (2, "doc"),
                                                    (2, "packed_docs")])
def test_exact_resume_from_state_dict(shard_dir, tokenizer_dir, num_workers, pack_mode):
    def _dm(*args, **kw):  # "doc" mode resumes by replaying; "full_sentences" and "packed_docs" seek by token counts
        return globals()["_dm"](*args, pack_mode=pack_mode, **kw)

    reference = _dm(shard_dir, tokenizer_dir, num_workers=num_workers)
    per_epoch = reference.batches_per_epoch_per_rank
    # k odd (workers' round-robin rotates) and a resume window that crosses into epoch 1.
    k = per_epoch - 3
    expected = _take(reference, k + 6)
    first = _dm(shard_dir, tokenizer_dir, num_workers=num_workers)
    assert _same(_take(first, k), expected[:k])
    state = first.state_dict()
    assert state["consumed"] == k
    resumed = _dm(shard_dir, tokenizer_dir, num_workers=num_workers)
    resumed.load_state_dict(state)
    assert _same(_take(resumed, 6), expected[k:])
    # The next epoch differs from the first (new shard order, shuffle and masks).
    assert not torch.equal(expected[k + 3]["input_ids"], expected[0]["input_ids"])


def test_masks_follow_the_step_not_the_worker_count(shard_dir, tokenizer_dir):
    a = _take(_dm(shard_dir, tokenizer_dir, num_workers=2), 4)
    b = _take(_dm(shard_dir, tokenizer_dir, num_workers=2), 4)
    assert _same(a, b)
    other_seed = _take(_dm(shard_dir, tokenizer_dir, num_workers=2, seed=4), 4)
    assert not torch.equal(a[0]["labels"], other_seed[0]["labels"])


def test_validation_is_fixed(shard_dir, tokenizer_dir):
    dm = _dm(shard_dir, tokenizer_dir)
    first = list(dm.val_dataloader())
    _take(dm, 5)  # training progress must not change validation batches
    assert len(first) > 0 and _same(first, list(dm.val_dataloader()))
    # One valid shard for two workers: documents are dealt to the workers, still deterministic.
    again = _dm(shard_dir, tokenizer_dir, num_workers=2)
    batches = list(again.val_dataloader())
    assert len(batches) > 0 and _same(batches, list(again.val_dataloader()))


def test_ranks_have_equal_lengths(shard_dir, tokenizer_dir):
    lengths = {_dm(shard_dir, tokenizer_dir, rank=r, world_size=3).batches_per_epoch_per_rank for r in range(3)}
    assert len(lengths) == 1


def test_tokenizer_mismatch_is_refused(shard_dir, tmp_path, corpus_file):
    from data_pipelines.tokenizer import train_tokenizer

    other = train_tokenizer(corpus_file, tmp_path / "tok", vocab_size=400, input_sentence_size=3000)
    with pytest.raises(DataError, match="written with tokenizer"):
        _dm(shard_dir, other.path).setup("fit")


def test_the_batch_plan_is_connected_once_and_the_epoch_follows_the_accumulation(shard_dir, tokenizer_dir):
    dm = MLMDataModule(shard_dir, tokenizer_dir, settings=DataSettings(seed=3))
    with pytest.raises(DataError, match=r"call connect\(seq_len, micro_batch_size, accumulation\)"):
        dm.train_dataloader()
    raw = dm.connect(64, 4).batches_per_epoch_per_rank
    # A batch ramp of accumulation 2, then 3: epochs hold whole steps of both (a multiple of 6), derived from the
    # phases the step windows follow, so the two cannot disagree.
    ramp = dm.connect(64, 4, accumulation=[(0, 0, 2), (4, 8, 3)])
    assert ramp is dm and dm.batch_multiple == 6 and dm.state_dict()["batch_multiple"] == 6
    assert dm.batches_per_epoch_per_rank % 6 == 0 and raw - dm.batches_per_epoch_per_rank < 6
    with pytest.raises(DataError, match="micro_batch_size >= 1"):
        dm.connect(64, 0)
    with pytest.raises(DataError, match="pack_mode must be one of full_sentences, doc, packed_docs; got 'full'"):
        DataSettings(pack_mode="full")
    with pytest.raises(DataError, match="num_workers >= 0"):
        DataSettings(num_workers=-1)


def test_a_checkpoint_of_the_old_packing_name_resumes_without_a_warning(shard_dir, tokenizer_dir, caplog):
    # Checkpoints written before the stream took the YAML's name saved pack_mode "full" (FULL-SENTENCES).
    old = _dm(shard_dir, tokenizer_dir).state_dict() | {"consumed": 5, "pack_mode": "full"}
    with caplog.at_level(logging.WARNING, logger="data_pipelines"):
        resumed = _dm(shard_dir, tokenizer_dir)
        resumed.load_state_dict(old)
    assert resumed.consumed == 5 and not resumed.replanned and "data settings changed" not in caplog.text
    with caplog.at_level(logging.WARNING, logger="data_pipelines"):
        _dm(shard_dir, tokenizer_dir, pack_mode="doc").load_state_dict(old)  # a real change still says so
    assert "data settings changed since the checkpoint (pack_mode)" in caplog.text
    # Before readers interleaved shards, checkpoints saved no interleave_shards: they read one shard at a time,
    # so the rest of their epoch comes in another order, and the resume says so.
    caplog.clear()
    before_interleaving = {k: v for k, v in old.items() if k != "interleave_shards"}
    with caplog.at_level(logging.WARNING, logger="data_pipelines"):
        _dm(shard_dir, tokenizer_dir).load_state_dict(before_interleaving)
    assert "data settings changed since the checkpoint (interleave_shards)" in caplog.text


# -- a real Lightning Trainer ------------------------------------------------------------------


class _Recorder(L.LightningModule):
    """Trains a tiny embedding bag and records every batch it trains on."""

    def __init__(self, vocab_size: int) -> None:
        super().__init__()
        self.emb = torch.nn.EmbeddingBag(vocab_size, 4)
        self.seen: list[dict] = []

    def training_step(self, batch, batch_idx):
        self.seen.append({k: v.clone() for k, v in batch.items() if torch.is_tensor(v)})
        return self.emb(batch["input_ids"]).pow(2).mean()

    def validation_step(self, batch, batch_idx):
        return None

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _trainer(tmp_path, max_steps: int, **kw) -> L.Trainer:
    return L.Trainer(
        max_steps=max_steps, accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=tmp_path, val_check_interval=20, num_sanity_val_steps=1,
        limit_val_batches=2, **kw,
    )


# The resumed fit leaves out the ModelCheckpoint that wrote the checkpoint, on purpose; Lightning says so.
@pytest.mark.filterwarnings(r"ignore:Be aware that when using `ckpt_path`:UserWarning:lightning\.pytorch\.trainer\.call")
@pytest.mark.parametrize("num_workers", [0, 2])
def test_lightning_resume_replays_the_same_batches(shard_dir, tokenizer_dir, tok, tmp_path, num_workers):
    def _dm(*args, **kw):  # bigger batches: fewer steps per epoch keep three fits quick
        return globals()["_dm"](*args, seq_len=128, micro_batch_size=16, **kw)

    per_epoch = _dm(shard_dir, tokenizer_dir).batches_per_epoch_per_rank
    total, k = per_epoch + 4, per_epoch - 2  # the resumed part crosses an epoch boundary
    full = _Recorder(tok.vocab_size)
    _trainer(tmp_path / "full", total).fit(full, datamodule=_dm(shard_dir, tokenizer_dir, num_workers=num_workers))
    assert len(full.seen) == total

    ckpt = L.pytorch.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=k, save_top_k=-1)
    part = _Recorder(tok.vocab_size)
    _trainer(tmp_path / "part", k, callbacks=[ckpt]).fit(part, datamodule=_dm(shard_dir, tokenizer_dir, num_workers=num_workers))
    path = next((tmp_path / "ckpt").glob(f"*step={k}.ckpt"))
    assert torch.load(path, weights_only=False)["MLMDataModule"]["consumed"] == k

    rest = _Recorder(tok.vocab_size)
    _trainer(tmp_path / "rest", total).fit(rest, datamodule=_dm(shard_dir, tokenizer_dir, num_workers=num_workers), ckpt_path=path)
    assert _same(part.seen, full.seen[:k])
    assert _same(rest.seen, full.seen[k:]), f"resumed run saw {len(rest.seen)} batches"


class _RankRecorder(_Recorder):
    """Writes how many batches its rank trained on, and a digest of them, when the epoch ends."""

    def __init__(self, vocab_size: int, out_dir: str) -> None:
        super().__init__(vocab_size)
        self.out_dir = out_dir

    def on_train_epoch_end(self) -> None:
        import json
        from pathlib import Path

        digest = [int(b["input_ids"].sum()) for b in self.seen]
        Path(self.out_dir, f"rank{self.global_rank}.json").write_text(json.dumps({"batches": len(self.seen), "digest": digest}))


@pytest.mark.slow
def test_ddp_ranks_take_equal_steps_on_different_data(shard_dir, tokenizer_dir, tok, tmp_path):
    import json

    dm = _dm(shard_dir, tokenizer_dir, valid_shards=None, seq_len=128, micro_batch_size=16)
    trainer = L.Trainer(
        max_epochs=1, accelerator="cpu", devices=2, strategy="ddp_spawn", logger=False, enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, default_root_dir=tmp_path,
    )
    trainer.fit(_RankRecorder(tok.vocab_size, str(tmp_path)), datamodule=dm)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    expected = _dm(shard_dir, tokenizer_dir, seq_len=128, micro_batch_size=16, rank=1, world_size=2).batches_per_epoch_per_rank
    assert ranks[0]["batches"] == ranks[1]["batches"] == expected
    # Each rank read its own shards (rank and world size came from the Trainer).
    assert ranks[0]["digest"] != ranks[1]["digest"]


def test_unused_data_per_epoch_is_reported_and_logged(shard_dir, tokenizer_dir, caplog):
    # Issue 13, finding 6: the run summary prints what each epoch leaves unused; at most one global batch.
    with caplog.at_level(logging.INFO, logger="data_pipelines"):
        dm = _dm(shard_dir, tokenizer_dir, num_workers=2, world_size=2, accumulation=2)
        unused = dm.unused_per_epoch()
    assert unused["exact"] and 0 <= unused["blocks"] < 2 * 4 * 2  # world × micro-batch × accumulation
    assert unused["total_blocks"] > 1000
    assert unused["blocks"] * 62 <= unused["tokens"] < (unused["blocks"] + 4) * 62  # plus < 1 block per reader
    assert f"{unused['blocks']} of {unused['total_blocks']} blocks" in caplog.text
    assert "left unused per epoch" in caplog.text
