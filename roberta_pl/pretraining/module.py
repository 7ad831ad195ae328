"""The masked-LM LightningModule: encoder + sparse MLM head, loss, metrics and the optimizer.

Everything about precision, devices and parallelism is the Trainer's business (Lightning/DeepSpeed flags);
this module only says what one step computes.
"""

from __future__ import annotations

import hashlib
from typing import Any

import lightning.pytorch as pl
import torch

from data_pipelines.contract import DOCUMENT_IDS, STEP_WINDOW
from roberta_pl.batch_plan import StepHorizon
from roberta_pl.lightning_compat import (
    completes_step,
    is_logging_step,
    micro_batches_started,
    release_validation_workers,
)
from roberta_pl.model import (
    RobertaConfig,
    mlm_flops_per_token,
    mlm_head_flops,
)
from roberta_pl.models import encoder_of, masked_lm
from roberta_pl.optim import build_adamw, lr_scheduler


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed that is a pure function of (seed, step, rank): dropout after a resume matches."""
    digest = hashlib.blake2b(f"{seed}:{step}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def masked_accuracy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The share of rows whose target alone scores highest (``logits`` ``[N, V]``, ``targets`` ``[N]``).

    A count of the logits at or above the target's, not an argmax: 2.5 ms against 3.3 ms for the quickstart's
    [600, 8192] logits on CPU, and no host sync. The count is summed as int32: a bool sum promotes to int64, which
    took 5 ms. A tie at the top is a miss, where an argmax would call it a hit when the target is the first tied
    index: with bf16 logits ties are not rare, and a tie is no prediction. A row with a NaN target logit is a miss.
    """
    target_logit = logits.gather(-1, targets.unsqueeze(-1))
    return ((logits >= target_logit).sum(-1, dtype=torch.int32) == 1).float().mean()


# Constructor arguments of earlier versions, still in old checkpoints' hyper-parameters: accepted and ignored. The
# mask rate set the FLOPs figure (ThroughputLogger now counts the masked positions each batch carries) and `packed`
# dropped the attention mask (now dropped whenever the batch's mask is all ones, see transfer_batch_to_device).
_RETIRED_HPARAMS = frozenset({"mask_prob", "packed"})


class MaskedLMModule(pl.LightningModule):
    """RoBERTa masked-LM pretraining.

    What the data side decided (masking, packing) reaches this module only through the batch: the labels say
    which positions to predict, the attention mask which are padding.

    Args:
        model: fields of :class:`~roberta_pl.model.RobertaConfig` (``vocab_size`` resolved).
        optim: ``lr, betas, eps, weight_decay, warmup_steps, decay, power, end_lr_ratio``.
        max_steps: optimizer steps, the length of the LR schedule (recorded; ``horizon`` follows a budget's figure).
        seq_len: the sequence length, for the encoder's FLOPs per position behind MFU (attention grows with it).
        micro_batch_size: sequences per micro-batch (recorded with the run).
        seed: base of the per-step dropout seed.
        compile: ``torch.compile`` the encoder.
        tokenizer: the tokenizer directory, recorded so export and fill-mask find it from the checkpoint.
        tokenizer_hash: the tokenizer's content hash, recorded so a resume with another tokenizer is refused.
        horizon: the run's step horizon, which the LR schedule decays to (default: ``max_steps``, fixed). A time
            budget fixes it during the run; ``hparams.max_steps`` records the fixed figure.
        pretrained: where the weights started (``pretrained=PATH``; None: random init), recorded with the run.
    """

    def __init__(self, model: dict[str, Any], optim: dict[str, Any], max_steps: int, seq_len: int,
                 micro_batch_size: int, seed: int = 0, compile: bool = False, tokenizer: str | None = None,
                 tokenizer_hash: str | None = None, horizon: StepHorizon | None = None, pretrained: str | None = None,
                 **retired: Any):
        unknown = sorted(set(retired) - _RETIRED_HPARAMS)
        if unknown:
            raise TypeError(f"MaskedLMModule got unexpected keyword argument(s) {', '.join(unknown)}")
        super().__init__()
        self.save_hyperparameters(ignore=sorted({*retired, "horizon"}))
        self.horizon = horizon if horizon is not None else StepHorizon(max_steps)
        self.horizon.follow(lambda steps: self.hparams.__setitem__("max_steps", steps), replans=True)
        self.config = RobertaConfig(**model)
        self.model = masked_lm(self.config)
        if compile:
            encoder_of(self.model).compile()  # in place: parameter names (and so checkpoints/exports) unchanged
        # Read by ThroughputLogger for MFU: the encoder runs on every position, the sparse head only on the
        # positions a batch masks (its labels other than -100), so the two are counted apart.
        self.flops_per_position = mlm_flops_per_token(self.config, seq_len, mask_prob=0.0)
        self.flops_per_prediction = mlm_head_flops(self.config)
        self._window: torch.Tensor | None = None  # (loss, accuracy) of the current step so far
        self._masked: torch.Tensor | None = None  # masked tokens in the current step's global batch
        self._logged_step = False

    def transfer_batch_to_device(self, batch: Any, device: torch.device, dataloader_idx: int) -> Any:
        # A batch with nothing padded (FULL-SENTENCES blocks always) goes without its attention mask, which lets SDPA
        # pick the flash kernel. Decided here, while the batch is still in host memory: no device sync.
        if isinstance(batch, dict):
            mask = batch.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.device.type == "cpu" and bool(mask.all()):
                batch = {k: v for k, v in batch.items() if k != "attention_mask"}
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    # -- steps --------------------------------------------------------------------------------------
    def on_train_start(self) -> None:
        # A fit starts on a step boundary (checkpoints are taken only there): nothing of a window left
        # unfinished by an earlier fit of this module carries over.
        self._window = self._masked = None

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Dropout is a function of (seed, micro-batch index, rank), not of RNG history, so a resumed run
        # draws the same masks as the uninterrupted one. `ready` already counts the current batch.
        micro_step = micro_batches_started(self.trainer) - 1
        torch.manual_seed(step_seed(self.hparams.seed, micro_step, self.global_rank))

    def _shared_step(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """``(mean cross-entropy over the masked tokens, their accuracy, the cross-entropy summed over them,
        how many there are)`` of one batch."""
        labels = batch["labels"]
        # attention_mask None: nothing padded; document_ids only in packed_docs batches (attention within documents)
        out = self.model(batch["input_ids"], batch.get("attention_mask"), labels, document_ids=batch.get(DOCUMENT_IDS))
        targets = out.targets  # the model's own gather of the masked labels: no second one here
        if targets.numel() == 0:  # nothing masked (tiny batches): a zero loss that keeps the graph
            zero = out.logits.sum() * 0.0
            return zero, zero.detach(), zero, 0
        with torch.no_grad():
            accuracy = masked_accuracy(out.logits, targets)
        return out.loss, accuracy, out.loss * targets.numel(), targets.numel()

    def _step_denominator(self, batch: dict, masked: int) -> torch.Tensor:
        """The step's denominator: masked tokens in the global batch (the window's count, summed over ranks).

        Counted on the first micro-batch of each accumulation window and kept for the rest of it. The train
        loader counted the window ahead (:class:`~data_pipelines.loaders.StepWindow`); one all-reduce of that
        count per step makes it global. ``torch.distributed`` directly: Lightning's ``strategy.reduce`` adds a
        barrier, which on GPUs blocks the host until the device is idle, once per step. Batches without a window
        count (a plain DataLoader) make each micro-batch its own mean: the step is the mean of the micro-batch
        means, which equals the objective only when every micro-batch masks as many tokens.
        """
        trainer = self.trainer
        window = batch.get(STEP_WINDOW)
        if window is None:
            return torch.tensor(float(max(masked, 1) * trainer.accumulate_grad_batches * trainer.world_size),
                                device=self.device)
        if self._masked is None:  # the first micro-batch of an optimizer step
            if window.position != 0 or window.size != trainer.accumulate_grad_batches:
                raise RuntimeError(
                    f"the train loader's accumulation window (micro-batch {window.position} of {window.size}) is not "
                    f"the trainer's step (accumulation {trainer.accumulate_grad_batches}, micro-batch "
                    f"{micro_batches_started(trainer) - 1}); connect the DataModule to the trainer's plan "
                    f"(MLMDataModule.connect(..., accumulation=...))")
            count = window.masked.to(device=self.device, dtype=torch.float64, copy=True)
            if trainer.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(count)
            self._masked = count.clamp(min=1).float()
        return self._masked

    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        _, accuracy, loss_sum, masked = self._shared_step(batch)
        denominator = self._step_denominator(batch, masked)
        # The objective of a step is fairseq's: cross-entropy summed over every masked token of the global batch
        # / their number, whatever the split into micro-batches, accumulation and ranks (and in doc packing, where
        # micro-batches hold unequal numbers of tokens). Lightning divides what this returns by the accumulation,
        # and DDP and DeepSpeed average gradients over the ranks: both are multiplied back here.
        scale = self.trainer.accumulate_grad_batches * self.trainer.world_size
        objective = loss_sum * scale / denominator
        # Logged once per optimizer step: this micro-batch's share of the step's loss and accuracy, summed on the
        # device over the window (no sync) and over the ranks (one all-reduce, on logging steps only): exactly
        # the objective the step optimized. Logging every micro-batch would write each logging step A times.
        share = torch.stack([loss_sum.detach().float(), accuracy.float() * masked]) / denominator
        self._window = share if self._window is None else self._window + share
        if completes_step(self.trainer):
            total, self._window, self._masked = self._window, None, None
            if is_logging_step(self.trainer):
                self.log("train/loss", total[0], prog_bar=True, sync_dist=True, reduce_fx="sum")
                self.log("train/accuracy", total[1], sync_dist=True, reduce_fx="sum")
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

    def on_validation_end(self) -> None:
        # Validation reads limit_val_batches of a stream, so its loader never ends; Lightning would keep its workers
        # (forked copies of this process) idle until the next validation, each coming to hold as much memory as this one.
        if self.trainer.state.fn == "fit":
            release_validation_workers(self.trainer)

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
        try:
            if not self._uses_deepspeed():
                return False
        except RuntimeError:  # not attached to a Trainer (Lightning's `trainer` property says so by raising)
            return False
        return bool((self.trainer.strategy.config or {}).get("zero_optimization", {}).get("offload_optimizer"))

    # -- optimizer ----------------------------------------------------------------------------------
    def configure_optimizers(self):
        o = self.hparams.optim
        optimizer = build_adamw(self.model, o["lr"], o["betas"], o["eps"], o["weight_decay"],
                                cpu_adam=self._offloads_optimizer())
        return {"optimizer": optimizer,
                "lr_scheduler": lr_scheduler(optimizer, o, o["warmup_steps"], lambda: self.horizon.max_steps,
                                             lambda step: self.horizon.progress(step, o["warmup_steps"]))}
