"""A real Lightning DDP job for tests/integration/test_ddp.py (run as a script: Lightning re-launches it per rank).

Usage: python ddp_equivalence_job.py OUT_DIR DEVICES ACCUMULATION [MICRO [ROWS.pt]]

Every optimizer step consumes the same global batch of pre-masked sequences whatever the split: rank r of W
takes its own contiguous slice of each global batch, in micro-batches of MICRO, so 2 ranks x accumulation A,
1 rank x accumulation 2A and 1 rank x accumulation 1 with a 2A-times larger micro-batch see the same sequences
per step and must reach the same parameters. ROWS.pt holds rows from the real data pipeline (see
:func:`masked_rows`); without it, random rows with 15% of positions to predict. Batches carry their step's
masked-token count as the real train loader's do (:func:`data_pipelines.loaders.with_step_windows`).
Each rank records the row indices it trained on, to show the ranks' data is disjoint; rank 0 saves the initial
and final parameters and the gradient of the first step.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from data_pipelines.loaders import with_step_windows
from roberta_pl.model import RobertaConfig, RobertaForMaskedLM
from roberta_pl.pretraining.module import MaskedLMModule

GLOBAL, MICRO, STEPS, SEQ, VOCAB = 16, 4, 3, 32, 300


def random_rows() -> dict[str, torch.Tensor]:
    """``GLOBAL * STEPS`` random rows of SEQ tokens, 15% of positions to predict (a varying count per row)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, VOCAB, (GLOBAL * STEPS, SEQ), generator=g)
    return {"input_ids": ids, "labels": torch.where(torch.rand(ids.shape, generator=g) < 0.15, ids, -100)}


def masked_rows(shard_dir, tokenizer_dir, seq_len: int, **data) -> dict[str, torch.Tensor]:
    """``GLOBAL * STEPS`` rows as the real pipeline makes them (``data``: packing and masking options, as
    :func:`data_fixtures.mlm_datamodule` takes them): ``input_ids``, ``attention_mask``, ``labels`` (and
    ``document_ids`` in packed_docs packing) and the tokenizer's ``vocab`` size."""
    from data_fixtures import mlm_datamodule

    from data_pipelines.tokenizer import load_tokenizer

    dm = mlm_datamodule(shard_dir, tokenizer_dir, seq_len=seq_len, micro_batch_size=GLOBAL * STEPS, **data)
    batch = next(iter(dm.train_dataloader()))
    return {k: batch[k].clone() for k in ("input_ids", "attention_mask", "labels", "document_ids") if k in batch} | {
        "vocab": torch.tensor(load_tokenizer(tokenizer_dir).vocab_size)}


def model_config(rows: dict) -> dict:
    vocab = int(rows["vocab"]) if "vocab" in rows else VOCAB
    return dict(vocab_size=vocab, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                max_seq_len=rows["input_ids"].shape[1], dropout=0.0, attention_dropout=0.0)


def build_module(rows: dict, micro: int = MICRO) -> "Module":
    """The module every split starts from: seed 0, so the same initial weights in every process."""
    torch.manual_seed(0)
    return Module(model=model_config(rows),
                  optim=dict(lr=1e-3, betas=[0.9, 0.98], eps=1e-6, weight_decay=0.01, warmup_steps=0, decay="linear"),
                  max_steps=STEPS, seq_len=rows["input_ids"].shape[1], micro_batch_size=micro)


def mean_ce_gradient(init: dict[str, torch.Tensor], rows: dict, parts: int = 1) -> dict[str, torch.Tensor]:
    """The gradient of the masked-LM objective as defined (fairseq's): the cross-entropy averaged over every
    masked token of the first optimizer step's global batch, computed in one pass from the weights ``init``.
    ``parts``: the mean, over that many equal slices of the batch, of each slice's own mean instead."""
    model = RobertaForMaskedLM(RobertaConfig(**model_config(rows)))
    model.load_state_dict(init)
    size = GLOBAL // parts
    for start in range(0, GLOBAL, size):
        part = slice(start, start + size)
        out = model(rows["input_ids"][part], rows["attention_mask"][part] if "attention_mask" in rows else None,
                    rows["labels"][part], rows["document_ids"][part] if "document_ids" in rows else None)
        (out.loss / parts).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


class Rows(Dataset):
    def __init__(self, rows: dict, rank: int, world: int):
        self.data = {k: v for k, v in rows.items() if k != "vocab"}
        share = GLOBAL // world
        self.rows = [s * GLOBAL + rank * share + i for s in range(STEPS) for i in range(share)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        return {**{k: v[row] for k, v in self.data.items()}, "row": row}


class WindowedLoader(DataLoader):
    """A DataLoader whose batches carry their step's masked-token count, as MLMDataModule's train loader's do."""

    def __init__(self, accumulation: int, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.accumulation = accumulation

    def __iter__(self):
        return with_step_windows(super().__iter__(), self.accumulation)


class Data(pl.LightningDataModule):
    """``windows=False``: a plain DataLoader, whose batches carry no step window."""

    def __init__(self, rows: dict | None = None, micro: int = MICRO, windows: bool = True):
        super().__init__()
        self.rows = random_rows() if rows is None else rows
        self.micro = micro
        self.windows = windows

    def train_dataloader(self):
        # Our own per-rank split (no DistributedSampler), so the global batch is identical across world sizes.
        rows = Rows(self.rows, self.trainer.global_rank, self.trainer.world_size)
        if not self.windows:
            return DataLoader(rows, batch_size=self.micro, shuffle=False)
        return WindowedLoader(self.trainer.accumulate_grad_batches, rows, batch_size=self.micro, shuffle=False)


class Module(MaskedLMModule):
    seen: list
    first_gradient: dict | None = None

    def training_step(self, batch, batch_idx):
        self.seen = getattr(self, "seen", []) + batch.pop("row").tolist()
        return super().training_step(batch, batch_idx)

    def on_before_optimizer_step(self, optimizer):
        super().on_before_optimizer_step(optimizer)
        if self.trainer.global_step == 0 and not self._uses_deepspeed():  # DDP: already averaged over ranks
            self.first_gradient = {k: p.grad.detach().clone() for k, p in self.model.named_parameters()}


def main(out: str, devices: int, accumulation: int, micro: int = MICRO, rows_file: str | None = None,
         windows: bool = True) -> None:
    rows = torch.load(rows_file, weights_only=True) if rows_file else random_rows()
    module = build_module(rows, micro)
    init = {k: v.clone() for k, v in module.model.state_dict().items()}
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         max_steps=STEPS, accumulate_grad_batches=accumulation, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False)
    trainer.fit(module, datamodule=Data(rows, micro, windows))
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rows-rank{trainer.global_rank}.json").write_text(json.dumps(module.seen))
    if trainer.is_global_zero:
        assert trainer.global_step == STEPS
        torch.save(init, out_dir / "init.pt")
        torch.save(module.first_gradient, out_dir / "first_gradient.pt")
        torch.save(module.model.state_dict(), out_dir / "final.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), *(int(a) if a.isdigit() else a for a in sys.argv[4:]))
