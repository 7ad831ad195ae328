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


def load_pretrained(path: str | Path, tokenizer: str | Path | None = None, *,
                    flag: str = "--tokenizer") -> tuple[RobertaForMaskedLM, Path | None]:
    """Our model (eval mode) and its tokenizer directory (None if unknown).

    The tokenizer directory a checkpoint records is returned only once it is the one the model was trained with (its
    content hash is the recorded ``tokenizer_hash``): a checkpoint is data anyone can edit, and the path it names
    may be anywhere. Every reader (export, fill-mask, embed, fine-tuning) asks here.

    Args:
        path: a HF directory, a ``.ckpt`` file or a DeepSpeed checkpoint directory.
        tokenizer: a tokenizer directory the user chose: returned as it is, the recorded one left unread.
        flag: how the caller's user passes a tokenizer (``tokenizer=DIR`` for fine-tuning), named in the errors.
    Raises:
        FileNotFoundError: the path does not exist, or the tokenizer directory it records is missing.
        ValueError: the file is neither a HF directory nor a roberta-pl checkpoint; or its recorded tokenizer is
            not the one it was trained with (or cannot be checked).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or model directory")
    if path.is_dir() and (path / "config.json").exists():
        return load_hf(path), Path(tokenizer) if tokenizer else path
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
    return model.eval(), Path(tokenizer) if tokenizer else _recorded_tokenizer(path, hparams, flag)


def _recorded_tokenizer(ckpt: Path, hparams: dict, flag: str) -> Path | None:
    """The tokenizer directory ``hparams`` records, if its content hash is the recorded one (else a one-line error
    saying to pass ``flag``); None if none is recorded."""
    from data_pipelines.tokenizer import load_tokenizer

    recorded, expected = hparams.get("tokenizer"), hparams.get("tokenizer_hash")
    if not recorded:
        return None
    tok_dir, choose = Path(recorded), f"pass {flag} with the tokenizer it was trained with"
    if not tok_dir.is_dir():
        raise FileNotFoundError(f"{ckpt}: the tokenizer directory it records, {tok_dir}, is missing; {choose}")
    if not expected:
        raise ValueError(f"{ckpt} records tokenizer {tok_dir} but not its hash, so it cannot be checked; {choose}")
    try:
        found = load_tokenizer(tok_dir).hash
    except Exception as e:  # noqa: BLE001 - not a tokenizer at all (no spm.model, or not a SentencePiece model)
        reason = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{ckpt}: the tokenizer directory it records, {tok_dir}, is unreadable ({reason}); "
                         f"{choose}") from None
    if found != expected:
        raise ValueError(f"{ckpt} was trained with tokenizer {expected}, but the directory it records, {tok_dir}, "
                         f"holds tokenizer {found}; {choose}")
    return tok_dir


def load_encoder(path: str | Path, tokenizer: str | Path | None = None, *,
                 flag: str = "--tokenizer") -> tuple[RobertaModel, Path | None]:
    """The bare encoder (eval mode) and its tokenizer directory, for fine-tuning and embeddings.

    Accepts what :func:`load_pretrained` does (``tokenizer`` and ``flag`` as there), and any HF RoBERTa directory
    whatever its head (masked-LM, classifier, or a bare ``RobertaModel``).
    """
    path = Path(path)
    if path.is_dir() and (path / "config.json").exists():
        return load_hf_encoder(path), Path(tokenizer) if tokenizer else path
    model, tok_dir = load_pretrained(path, tokenizer, flag=flag)
    return model.roberta, tok_dir


def export(checkpoint: str | Path, out_dir: str | Path, tokenizer: str | Path | None = None) -> Path:
    """Write ``config.json``, ``model.safetensors`` and the tokenizer files that
    ``transformers.AutoModelForMaskedLM`` / ``AutoTokenizer`` load.

    Args:
        checkpoint: a ``.ckpt`` file, a DeepSpeed checkpoint directory or a HF directory.
        out_dir: output directory.
        tokenizer: tokenizer directory; default: the one recorded in the checkpoint, if it is the one the model was
            trained with (see :func:`load_pretrained`). Only the files :data:`roberta_pl.hf.TOKENIZER_FILES` names
            are copied, and a link among them is refused.
    """
    from roberta_pl.hf import save_hf

    model, tok = load_pretrained(checkpoint, tokenizer)
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
