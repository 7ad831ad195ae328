"""A real Lightning DDP job for tests/integration/test_ddp.py (run as a script: Lightning re-launches it per rank).

Usage: python ddp_equivalence_job.py OUT_DIR DEVICES ACCUMULATION

Every optimizer step consumes the same global batch of pre-masked sequences whatever the world size:
rank r of W takes its own contiguous slice of each global batch, so 2 ranks x accumulation A and
1 rank x accumulation 2A see the same sequences per step and must reach the same parameters.
Each rank records the row indices it trained on, to show the ranks' data is disjoint.
"""

import json
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset

from roberta_pl.pretrain import MaskedLMModule

GLOBAL, MICRO, STEPS, SEQ, VOCAB = 16, 4, 3, 32, 300


class Rows(Dataset):
    def __init__(self, rank: int, world: int):
        g = torch.Generator().manual_seed(0)
        n = GLOBAL * STEPS
        self.ids = torch.randint(5, VOCAB, (n, SEQ), generator=g)
        self.labels = torch.where(torch.rand(n, SEQ, generator=g) < 0.15, self.ids, -100)
        share = GLOBAL // world
        self.rows = [s * GLOBAL + rank * share + i for s in range(STEPS) for i in range(share)]

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        row = self.rows[i]
        return {"input_ids": self.ids[row], "labels": self.labels[row], "row": row}


class Data(pl.LightningDataModule):
    def train_dataloader(self):
        # Our own per-rank split (no DistributedSampler), so the global batch is identical across world sizes.
        return DataLoader(Rows(self.trainer.global_rank, self.trainer.world_size), batch_size=MICRO, shuffle=False)


class Module(MaskedLMModule):
    seen: list

    def training_step(self, batch, batch_idx):
        self.seen = getattr(self, "seen", []) + batch.pop("row").tolist()
        return super().training_step(batch, batch_idx)


def main(out: str, devices: int, accumulation: int) -> None:
    torch.manual_seed(0)
    module = Module(model=dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                               max_seq_len=SEQ, dropout=0.0, attention_dropout=0.0),
                    optim=dict(lr=1e-3, betas=[0.9, 0.98], eps=1e-6, weight_decay=0.01, warmup_steps=0, decay="linear"),
                    max_steps=STEPS, seq_len=SEQ, micro_batch_size=MICRO)
    trainer = pl.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                         max_steps=STEPS, accumulate_grad_batches=accumulation, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                         use_distributed_sampler=False)
    trainer.fit(module, datamodule=Data())
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"rows-rank{trainer.global_rank}.json").write_text(json.dumps(module.seen))
    if trainer.is_global_zero:
        assert trainer.global_step == STEPS
        torch.save(module.model.state_dict(), out_dir / "final.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
