"""Typed schema of ``conf/eval.yaml`` (``roberta-pl-eval``)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from roberta_pl.finetune.config import Init


@dataclass
class EvalConfig:
    pretrained: Optional[str] = None  # MODEL: a roberta-pl .ckpt, a DeepSpeed checkpoint dir or a HF RoBERTa dir (what fine-tuning takes)
    tokenizer: Optional[str] = None  # default: the model's own (as fine-tuning's tokenizer=)
    suite: str = "local"  # glue, local (conf/suites/<name>.yaml) or the path of your own suite YAML
    data_dir: Optional[str] = None  # glue: the GLUE directory (CoLA/, SST-2/, MRPC/, QQP/, STS-B/, MNLI/, QNLI/, RTE/)
    seeds: int = 3  # runs per task, with seeds seed, seed + 1, ...
    seed: int = 1234  # the base seed
    out_dir: str = "runs/eval-${model_name:${pretrained}}-${init}"  # results.json, results.md, results.png and one directory per task and seed
    init: Init = Init.pretrained  # random: the same architecture from scratch, for the no-pretraining baseline
    tasks: list[str] = field(default_factory=list)  # run only these tasks of the suite (default: all)
    seed_index: Optional[int] = None  # run only this seed (0 .. seeds-1): one job of a parallel multirun
    finetune: list[str] = field(default_factory=list)  # fine-tuning overrides for every run: [trainer=gpu,batch_size=16]


def model_name(model: str | None) -> str:
    """A short name for MODEL in the default out_dir: its last two path parts without ``checkpoints`` and the file
    suffix (``runs/base/checkpoints/last.ckpt`` -> ``base-last``, ``runs/base/hf`` -> ``base-hf``)."""
    if model is None:
        return "none"
    parts = [p for p in Path(model).resolve().parts[1:] if p != "checkpoints"]
    return "-".join([*parts[-2:-1], Path(parts[-1]).stem if parts else "root"]) if parts else "root"


def register_configs() -> None:
    ConfigStore.instance().store(name="eval_schema", node=EvalConfig)
    if not OmegaConf.has_resolver("model_name"):
        OmegaConf.register_new_resolver("model_name", model_name)
