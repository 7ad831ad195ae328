"""The masked-LM LightningModule: encoder + sparse MLM head, loss, metrics and the optimizer.

Everything about precision, devices and parallelism is the Trainer's business (Lightning/DeepSpeed flags);
this module only says what one step computes.
"""

from __future__ import annotations

import hashlib
from typing import Any

import lightning.pytorch as pl
import torch

from roberta_pl.lightning_compat import completes_step, is_logging_step, micro_batches_started
from roberta_pl.model import RobertaConfig, RobertaForMaskedLM, mlm_flops_per_token
from roberta_pl.optim import build_adamw, lr_lambda


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed that is a pure function of (seed, step, rank): dropout after a resume matches."""
    digest = hashlib.blake2b(f"{seed}:{step}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


class MaskedLMModule(pl.LightningModule):
    """RoBERTa masked-LM pretraining.

    Args:
        model: fields of :class:`~roberta_pl.model.RobertaConfig` (``vocab_size`` resolved).
        optim: ``lr, betas, eps, weight_decay, warmup_steps, decay, power, end_lr_ratio``.
        max_steps: optimizer steps, the length of the LR schedule.
        seq_len, micro_batch_size, mask_prob: used for the FLOPs-per-batch figure behind MFU.
        seed: base of the per-step dropout seed.
        compile: ``torch.compile`` the encoder.
        tokenizer: the tokenizer directory, recorded so export and fill-mask find it from the checkpoint.
        tokenizer_hash: the tokenizer's content hash, recorded so a resume with another tokenizer is refused.
        packed: batches are FULL-SENTENCES blocks with no padding, so the attention mask can be skipped.
    """

    def __init__(self, model: dict[str, Any], optim: dict[str, Any], max_steps: int, seq_len: int,
                 micro_batch_size: int, mask_prob: float = 0.15, seed: int = 0, compile: bool = False,
                 tokenizer: str | None = None, packed: bool = True, tokenizer_hash: str | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.config = RobertaConfig(**model)
        self.model = RobertaForMaskedLM(self.config)
        if compile:
            self.model.roberta.compile()  # in place: parameter names (and so checkpoints/exports) unchanged
        # Read by ThroughputLogger for MFU; the head runs on mask_prob of the tokens.
        self.flops_per_position = mlm_flops_per_token(self.config, seq_len, mask_prob)
        self._window: torch.Tensor | None = None  # (loss sum, accuracy sum, micro-batches) of the current step
        self._logged_step = False

    # -- steps --------------------------------------------------------------------------------------
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Dropout is a function of (seed, micro-batch index, rank), not of RNG history, so a resumed run
        # draws the same masks as the uninterrupted one. `ready` already counts the current batch.
        micro_step = micro_batches_started(self.trainer) - 1
        torch.manual_seed(step_seed(self.hparams.seed, micro_step, self.global_rank))

    def _shared_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        labels = batch["labels"]
        # FULL-SENTENCES blocks are never padded: no mask lets SDPA pick the flash kernel, and deciding it
        # from the config (not from the tensor) costs no device sync.
        mask = None if self.hparams.packed else batch.get("attention_mask")
        out = self.model(batch["input_ids"], mask, labels)
        targets = out.targets  # the model's own gather of the masked labels: no second one here
        if targets.numel() == 0:  # nothing masked (tiny batches): a zero loss that keeps the graph
            zero = out.logits.sum() * 0.0
            return zero, zero.detach(), zero, 0
        with torch.no_grad():
            accuracy = (out.logits.argmax(-1) == targets).float().mean()
        # The objective is the masked-token loss *sum* over the expected number of masked tokens
        # (mask_prob x real tokens), a constant per micro-batch. Lightning divides by accumulation and DDP
        # averages over ranks, so every split of a global batch (micro x accumulation x world) gives the
        # same update: sum / (mask_prob x tokens in the global batch). The logged loss is the true mean.
        real_tokens = batch["input_ids"].numel() if mask is None else mask.sum()
        objective = out.loss * targets.numel() / (self.hparams.mask_prob * real_tokens)
        return out.loss, accuracy, objective, targets.numel()

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        loss, accuracy, objective, _ = self._shared_step(batch)
        # Logged once per optimizer step: the mean over the step's micro-batches (summed on the device, no
        # sync) and over the ranks (one all-reduce, on logging steps only). Logging every micro-batch would
        # write each logging step A times and report the last micro-batch's loss of rank 0.
        window = torch.stack([loss.detach().float(), accuracy.float(), torch.ones((), device=loss.device)])
        self._window = window if self._window is None else self._window + window
        if completes_step(self.trainer):
            total, self._window = self._window, None
            if is_logging_step(self.trainer):
                self.log("train/loss", total[0] / total[2], prog_bar=True, sync_dist=True)
                self.log("train/accuracy", total[1] / total[2], sync_dist=True)
                self._logged_step = True
        return objective

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        loss, accuracy, _, n = self._shared_step(batch)
        self.log("val/loss", loss, prog_bar=True, sync_dist=True, batch_size=n)
        self.log("val/accuracy", accuracy, prog_bar=True, sync_dist=True, batch_size=n)

    def on_validation_epoch_end(self) -> None:
        loss = self.trainer.callback_metrics.get("val/loss")
        if loss is not None:
            self.log("val/perplexity", torch.exp(loss.float().clamp(max=30.0)), sync_dist=False)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._logged_step:  # from the loss just logged: the mean over the step and the ranks
            self._logged_step = False
            self.log("train/perplexity", torch.exp(self.trainer.callback_metrics["train/loss"].float().clamp(max=30.0)))

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        # Pre-clipping global grad norm, only on logging steps (DeepSpeed shards grads and reports its own).
        if not is_logging_step(self.trainer) or self._uses_deepspeed():
            return
        norms = [p.grad.detach().norm(2) for p in self.parameters() if p.grad is not None]
        if norms:
            self.log("train/grad_norm", torch.stack(norms).norm(2))

    def _uses_deepspeed(self) -> bool:
        from lightning.pytorch.strategies import DeepSpeedStrategy

        return isinstance(self.trainer.strategy, DeepSpeedStrategy)

    def _offloads_optimizer(self) -> bool:
        """ZeRO-Offload: DeepSpeed steps the optimizer on CPU and accepts only its own CPU Adam there."""
        if not self._trainer or not self._uses_deepspeed():
            return False
        return bool((self.trainer.strategy.config or {}).get("zero_optimization", {}).get("offload_optimizer"))

    # -- optimizer ----------------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.hparams.optim
        optimizer = build_adamw(self.model, o["lr"], o["betas"], o["eps"], o["weight_decay"],
                                cpu_adam=self._offloads_optimizer())
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            lambda step: lr_lambda(step, warmup_steps=o["warmup_steps"], total_steps=self.hparams.max_steps,
                                   decay=o["decay"], power=o.get("power", 1.0), end_ratio=o.get("end_lr_ratio", 0.0)),
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
