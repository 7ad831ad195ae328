"""Load our masked-LM model from any of the places a trained model lives, and write Lightning checkpoints
atomically (:class:`AtomicCheckpointIO`).

- a HuggingFace directory (``config.json`` + ``model.safetensors``), e.g. what ``roberta-pl-export`` writes;
- a Lightning ``.ckpt`` file written by ``roberta-pl-train``;
- a DeepSpeed ZeRO checkpoint directory, consolidated to fp32 first.

Lightning checkpoints are read with ``torch.load(weights_only=True)``: no pickled code runs.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from roberta_pl.hf import load_hf, load_hf_encoder
from roberta_pl.model import RobertaConfig, RobertaForMaskedLM, RobertaModel


def _read_lightning_checkpoint(path: Path) -> dict:
    if path.is_dir():  # DeepSpeed: shards of parameters and optimizer state per rank
        from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "consolidated.ckpt"
            convert_zero_checkpoint_to_fp32_state_dict(str(path), str(out))
            return torch.load(out, map_location="cpu", weights_only=False)
    return torch.load(path, map_location="cpu", weights_only=True)


def load_pretrained(path: str | Path) -> tuple[RobertaForMaskedLM, Path | None]:
    """Our model (eval mode) and its tokenizer directory (None if unknown).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the file is neither a HF directory nor a roberta-pl checkpoint.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or model directory")
    if path.is_dir() and (path / "config.json").exists():
        return load_hf(path), path
    ckpt = _read_lightning_checkpoint(path)
    hparams = ckpt.get("hyper_parameters") or {}
    if "kind" in hparams and "labels" in hparams:  # a roberta-pl-finetune checkpoint: a classifier, no MLM head
        run_hf = path.parent.parent / "hf"
        where = f"roberta-pl-finetune exported it to {run_hf}" if run_hf.is_dir() else "roberta-pl-finetune exports it to <run_dir>/hf"
        raise ValueError(f"{path} is a fine-tuning checkpoint ({hparams['kind']}, labels {', '.join(map(str, hparams['labels']))}), "
                         f"not a masked LM; {where} (transformers' AutoModelFor{'Token' if hparams['kind'] == 'token_classification' else 'Sequence'}"
                         f"Classification loads it)")
    if "model" not in hparams or "state_dict" not in ckpt:
        raise ValueError(f"{path}: not a roberta-pl pretraining checkpoint (no model hyper-parameters)")
    model = RobertaForMaskedLM(RobertaConfig(**hparams["model"]))
    prefix = "model."
    state = {k[len(prefix):]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    model.load_state_dict(state, strict=True)
    tokenizer = hparams.get("tokenizer")
    return model.eval(), Path(tokenizer) if tokenizer else None


def load_encoder(path: str | Path) -> tuple[RobertaModel, Path | None]:
    """The bare encoder (eval mode) and its tokenizer directory, for fine-tuning and embeddings.

    Accepts what :func:`load_pretrained` does, and any HF RoBERTa directory whatever its head (masked-LM,
    classifier, or a bare ``RobertaModel``).
    """
    path = Path(path)
    if path.is_dir() and (path / "config.json").exists():
        return load_hf_encoder(path), path
    model, tokenizer = load_pretrained(path)
    return model.roberta, tokenizer


def export(checkpoint: str | Path, out_dir: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer files that
    ``transformers.AutoModelForMaskedLM`` / ``AutoTokenizer`` load.

    Args:
        checkpoint: a ``.ckpt`` file, a DeepSpeed checkpoint directory or a HF directory.
        out_dir: output directory.
        tokenizer: tokenizer directory; default: the one recorded in the checkpoint.
    """
    from roberta_pl.hf import save_hf

    model, recorded = load_pretrained(checkpoint)
    tok = Path(tokenizer) if tokenizer else recorded
    if tok is not None and not tok.is_dir():
        raise FileNotFoundError(f"tokenizer directory {tok} not found; pass --tokenizer")
    return save_hf(model, out_dir, tokenizer=tok if tok != Path(out_dir) else None)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file and renames it, so a kill mid-save leaves the previous
    checkpoint (and ``last.ckpt``) intact and loadable.

    ``torch.save`` streams straight into the temporary file (Lightning's default serialises the whole
    checkpoint into memory first, a second copy of it at peak), and the file is fsynced before the rename,
    so after a crash the name holds either the old checkpoint or the complete new one."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__}.save_checkpoint takes no storage_options (got {storage_options!r})")
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
