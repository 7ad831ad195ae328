"""Load our masked-LM model from any of the places a trained model lives, and write Lightning checkpoints
atomically (:class:`AtomicCheckpointIO`).

- a HuggingFace directory (``config.json`` + ``model.safetensors``), e.g. what ``roberta-pl-export`` writes;
- a Lightning ``.ckpt`` file written by ``roberta-pl-train``;
- a DeepSpeed ZeRO checkpoint directory, consolidated to fp32 first.

Lightning checkpoints are read with ``torch.load(weights_only=True)``: no pickled code runs.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from roberta_pl.hf import load_hf, load_hf_encoder
from roberta_pl.model import RobertaConfig, RobertaForMaskedLM, RobertaModel
from roberta_pl.models import encoder_of, masked_lm

# -- DeepSpeed ZeRO checkpoint directories -------------------------------------------------------------------------
# DeepSpeed writes each rank's files straight to their final names under a tag directory, and its ``latest`` file
# names the tag. Lightning always uses the tag ``checkpoint``, so each save overwrote the last one in place: a kill
# mid-save left files of two steps. Here (ZeroStrategy.save_checkpoint) every save writes a fresh tag directory
# (``tag-<hex>``); once every rank has finished, rank 0 points ``checkpoint`` at it, a relative symbolic link replaced
# atomically (rename), and removes the older tags. ``latest`` keeps naming ``checkpoint``, so DeepSpeed, Lightning's
# fp32 converter and ds_to_universal all follow the same pointer, and ``<dir>/checkpoint/*.pt`` still lists the
# files. A directory whose ``checkpoint`` does not exist holds no completed save.
ZERO_POINTER = "checkpoint"
ZERO_TAG_PREFIX = "tag-"
_LEGACY_TAG = ZERO_TAG_PREFIX + "legacy"  # a pre-link `checkpoint/` directory, renamed while the link replaces it


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that cannot be read without running pickled code (or at all); one line naming the file."""


def zero_safe_globals() -> list:
    """The non-tensor types DeepSpeed 0.19.8 pickles into ZeRO checkpoint files (found in real ZeRO-2/3 fp32 and
    bf16 files): its loss scalers, the ZeRO stage enum and the bf16 optimizer's fragment addresses. Plain data:
    allowing them lets ``torch.load(weights_only=True)`` read the files; any other global is refused."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_zero_file(file: Path, mmap: bool = True) -> dict:
    """One file of a DeepSpeed checkpoint, read with ``weights_only=True`` (DeepSpeed's own types allowed, see
    :func:`zero_safe_globals`) and memory-mapped; :class:`UnsafeCheckpointError` naming the file otherwise."""
    try:
        with torch.serialization.safe_globals(zero_safe_globals()):
            return torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # UnpicklingError for pickled code, RuntimeError/EOFError for a damaged file
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        why = next((line for line in lines if "unsupported global" in line.lower()), lines[0].split(". ")[0])
        raise UnsafeCheckpointError(f"{file} cannot be loaded safely (weights_only=True, no pickled code runs): "
                                    f"{why[:200]}") from None


def zero_tag_dir(path: Path) -> Path | None:
    """The tag directory of the last completed save in a DeepSpeed checkpoint directory (what ``latest`` names), or
    None if ``path`` is not one or none of its saves completed."""
    latest = path / "latest"
    if not path.is_dir() or not latest.is_file():
        return None
    tag = latest.read_text().strip()
    if not tag or "/" in tag or "\\" in tag or tag in (".", ".."):  # a name inside the directory, nothing else
        return None
    target = path / tag
    if target.is_symlink() and "/" not in (real := os.readlink(target)) and real not in (".", ".."):
        target = path / real  # the save's own directory: what is read stays what was vetted if a save switches the link
    return target if target.is_dir() else None


def vet_zero_checkpoint(path: Path) -> Path:
    """Read every ``.pt`` file of a DeepSpeed checkpoint directory's current save with ``weights_only=True`` (only
    the pickle is read: the tensors are memory-mapped), so that DeepSpeed's and Lightning's loaders, which unpickle
    with ``weights_only=False``, only ever get files without pickled code. Returns the tag directory.

    Raises:
        UnsafeCheckpointError: a file that holds pickled code or is damaged, or no completed save (one line).
    """
    tag = zero_tag_dir(path)
    if tag is None:
        raise UnsafeCheckpointError(f"{path}: not a DeepSpeed checkpoint directory (no `latest` file naming a "
                                    f"completed save in it)")
    for file in sorted(tag.rglob("*.pt")):
        load_zero_file(file)
    return tag


def publish_zero_save(folder: Path, tag: str) -> None:
    """Make the completed save in ``folder/tag`` the directory's checkpoint (rank 0, after every rank wrote its
    files): ``latest`` names ``checkpoint`` (written once, atomically), ``checkpoint`` becomes a link to ``tag``
    (an atomic rename over the previous link), then the older tags are removed. A kill at any moment leaves either
    the previous save or this one, whole; what it leaves behind is removed by :func:`remove_interrupted_saves`."""
    latest = folder / "latest"
    if not latest.is_file() or latest.read_text().strip() != ZERO_POINTER:
        _replace_atomically(latest, ZERO_POINTER.encode())
    pointer = folder / ZERO_POINTER
    if pointer.is_dir() and not pointer.is_symlink():  # written in place by an earlier version: move it aside
        shutil.rmtree(folder / _LEGACY_TAG, ignore_errors=True)
        os.replace(pointer, folder / _LEGACY_TAG)
    link = folder / f".{ZERO_POINTER}.link-{tag}"
    link.unlink(missing_ok=True)
    link.symlink_to(tag)  # relative: the directory can be moved or copied whole
    os.replace(link, pointer)
    _fsync_dir(folder)
    for old in folder.iterdir():
        if old.name.startswith(ZERO_TAG_PREFIX) and old.name != tag and old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)


def fsync_files(files: list[Path]) -> None:
    """Flush files to the disk (a rank's share of a save, before it is published)."""
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory
        pass
    finally:
        os.close(fd)


def _replace_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


_TEMP_FILE = re.compile(r"^\..+\.tmp-\d+$")  # AtomicCheckpointIO's (and _replace_atomically's) temporary files


def remove_interrupted_saves(folder: Path) -> list[Path]:
    """Remove what saves killed half-way left in a checkpoint folder (``<run_dir>/checkpoints``): temporary files
    of single-file saves (``.last.ckpt.tmp-<pid>``, each as big as a checkpoint), DeepSpeed tag directories that
    never became or are no longer a directory's checkpoint, checkpoint directories none of whose saves completed,
    and a world-size conversion's ``.universal``. Call it at the start of a run, on one process, before any save:
    it cannot tell a save in progress from a dead one. Returns what it removed.
    """
    removed: list[Path] = []

    def remove(p: Path) -> None:
        shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
        removed.append(p)

    if not folder.is_dir():
        return removed
    for entry in sorted(folder.iterdir()):
        if _TEMP_FILE.match(entry.name) and (entry.is_file() or entry.is_symlink()):
            remove(entry)
        elif entry.name == ".universal" and entry.is_dir():
            remove(entry)
        elif entry.is_dir() and not entry.is_symlink():
            removed += _repair_zero_dir(entry)
    return removed


def _repair_zero_dir(ckpt: Path) -> list[Path]:
    names = {p.name for p in ckpt.iterdir()}
    if "latest" not in names and not any(n.startswith(ZERO_TAG_PREFIX) for n in names):
        return []  # not a DeepSpeed checkpoint directory of ours
    removed = []
    pointer = ckpt / ZERO_POINTER
    if not (pointer.exists() or pointer.is_symlink()) and (ckpt / _LEGACY_TAG).is_dir():
        os.replace(ckpt / _LEGACY_TAG, pointer)  # killed between moving the old save aside and linking the new one
    current = os.readlink(pointer) if pointer.is_symlink() else None
    for p in sorted(ckpt.iterdir()):
        stale_tag = p.name.startswith(ZERO_TAG_PREFIX) and p.name != current
        if stale_tag or p.name.startswith(f".{ZERO_POINTER}.link-") or _TEMP_FILE.match(p.name):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink(missing_ok=True)
            removed.append(p)
    if zero_tag_dir(ckpt) is None and not any(p.name.startswith(ZERO_TAG_PREFIX) or p.name == ZERO_POINTER
                                              for p in ckpt.iterdir()):
        shutil.rmtree(ckpt)  # no save in it ever completed: only `latest` and DeepSpeed's helper scripts are left
        removed.append(ckpt)
    return removed


def _read_zero_checkpoint(path: Path) -> dict:
    """A DeepSpeed checkpoint directory as one Lightning checkpoint: the client state (rank 0's model-states file)
    and the fp32 weights consolidated from every rank's partition. Every file is vetted first, so DeepSpeed's
    consolidation (which unpickles with ``weights_only=False``) only reads files without pickled code."""
    import contextlib
    import io

    from deepspeed.utils.zero_to_fp32 import (
        get_fp32_state_dict_from_zero_checkpoint,
        get_model_state_file,
    )

    tag = vet_zero_checkpoint(path)
    optim = sorted(tag.glob("*_optim_states.pt"))
    if not optim:
        raise UnsafeCheckpointError(f"{tag}: no optimizer-state files (*_optim_states.pt), so no fp32 weights")
    stage = load_zero_file(optim[0])["optimizer_state_dict"]["zero_stage"]
    client = load_zero_file(Path(get_model_state_file(str(tag), stage)), mmap=False)
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # its progress bars
        weights = get_fp32_state_dict_from_zero_checkpoint(str(path), tag=tag.name)
    # Lightning < 2.1 wrapped the module (`_forward_module.` keys); DeepSpeed's own entries are not Lightning's.
    skip = {"module", "optimizer", "lr_scheduler", "csr_tensor_module_names", "skipped_steps", "global_steps",
            "dp_world_size", "mp_world_size"}
    ckpt = {k: v for k, v in client.items() if k not in skip}
    ckpt["state_dict"] = {k.removeprefix("_forward_module."): v for k, v in weights.items()}
    return ckpt


def _read_lightning_checkpoint(path: Path, mmap: bool = False) -> dict:
    if path.is_dir():  # DeepSpeed: shards of parameters and optimizer state per rank
        return _read_zero_checkpoint(path)
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except (IsADirectoryError, FileNotFoundError):
        raise
    except Exception as e:  # pickled code, or not a torch file at all
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        why = next((line for line in lines if "unsupported global" in line.lower()), lines[0].split(". ")[0])
        raise UnsafeCheckpointError(f"{path} cannot be loaded safely (weights_only=True): {why[:200]}") from None


def _read_hyper_parameters(path: Path) -> dict:
    """The hyper-parameters of a ``.ckpt`` file or DeepSpeed directory, without reading the weights: the file is
    memory-mapped, and of a DeepSpeed directory only rank 0's model-states file is read (every file vetted first)."""
    if not path.is_dir():
        ckpt = _read_lightning_checkpoint(path, mmap=True)
    else:
        tag = vet_zero_checkpoint(path)
        states = sorted(tag.glob("*mp_rank_00_model_states.pt"))
        if not states:
            raise UnsafeCheckpointError(f"{tag}: no model-states file (*mp_rank_00_model_states.pt)")
        ckpt = load_zero_file(states[0])
    hparams = (ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None) or {}
    # A DeepSpeed directory's weights are its ranks' partitions, which load_pretrained consolidates.
    _check_pretraining_checkpoint(path, hparams, path.is_dir() or "state_dict" in ckpt)
    return hparams


def _check_pretraining_checkpoint(path: Path, hparams: dict, has_weights: bool) -> None:
    """Refuse a checkpoint that holds no masked LM: a fine-tuning one (saying where its export is), or none of ours."""
    if "kind" in hparams and "labels" in hparams:  # a roberta-pl-finetune checkpoint: a classifier, no MLM head
        run_hf = path.parent.parent / "hf"
        where = f"roberta-pl-finetune exported it to {run_hf}" if run_hf.is_dir() else "roberta-pl-finetune exports it to <run_dir>/hf"
        raise ValueError(f"{path} is a fine-tuning checkpoint ({hparams['kind']}, labels {', '.join(map(str, hparams['labels']))}), "
                         f"not a masked LM; {where} (transformers' AutoModelFor{'Token' if hparams['kind'] == 'token_classification' else 'Sequence'}"
                         f"Classification loads it)")
    if "model" not in hparams or not has_weights:
        raise ValueError(f"{path}: not a roberta-pl pretraining checkpoint (no model hyper-parameters)")


@dataclass(frozen=True)
class PretrainedInfo:
    """What a pretrained model is, read without its weights (:func:`read_pretrained`).

    Attributes:
        path: the HF directory, ``.ckpt`` file or DeepSpeed directory.
        config: its architecture (``hf_model_type`` included, so an export keeps its type).
        tokenizer: the tokenizer directory to use: the one passed, else the HF directory's own or the checkpoint's
            recorded one (checked); None when it has none.
        tokenizer_hash: the content hash of the tokenizer it was trained with (None: unknown), which a tokenizer
            passed instead must match.
    """

    path: Path
    config: RobertaConfig
    tokenizer: Path | None
    tokenizer_hash: str | None


def read_pretrained(path: str | Path, tokenizer: str | Path | None = None, *,
                    flag: str = "--tokenizer") -> PretrainedInfo:
    """The architecture and tokenizer of what :func:`load_pretrained` loads, without loading its weights.

    Args:
        path: a HF directory (its tokenizer: the tokenizer files beside the model, if any), a ``.ckpt`` file or a
            DeepSpeed checkpoint directory (its tokenizer: the one it records, if its hash is the recorded one).
        tokenizer: a tokenizer directory the user chose: returned as it is (the caller compares its hash with
            ``tokenizer_hash``), the recorded one left unread.
        flag: how the caller's user passes a tokenizer, named in the errors.
    Raises:
        FileNotFoundError, ValueError: as :func:`load_pretrained`.
    """
    from data_pipelines.hf_tokenizer_files import is_hf_tokenizer_dir
    from data_pipelines.tokenizer import MODEL_FILE, load_tokenizer
    from roberta_pl.hf import read_hf_config

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint or model directory")
    chosen = Path(tokenizer) if tokenizer else None
    if path.is_dir() and (path / "config.json").exists():
        own = path if (path / MODEL_FILE).is_file() or is_hf_tokenizer_dir(path) else None  # its tokenizer, if any
        found = load_tokenizer(own).hash if own else None
        return PretrainedInfo(path, read_hf_config(path), chosen or own, found)
    hparams = _read_hyper_parameters(path)
    recorded = chosen or _recorded_tokenizer(path, hparams, flag)
    return PretrainedInfo(path, RobertaConfig(**hparams["model"]), recorded, hparams.get("tokenizer_hash"))


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
    _check_pretraining_checkpoint(path, hparams, "state_dict" in ckpt)
    model = masked_lm(RobertaConfig(**hparams["model"]))
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
    return encoder_of(model), tok_dir


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
