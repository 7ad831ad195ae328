"""Data preparation and streaming for roberta-pl.

The flow runs one way: raw text (:mod:`data_pipelines.corpus`) → a SentencePiece tokenizer
(:mod:`data_pipelines.tokenizer`, its HF files by :mod:`data_pipelines.spm_to_hf`) or an existing model's
(:mod:`data_pipelines.hf_tokenizer`, its directory read by :mod:`data_pipelines.hf_tokenizer_files`) → WebDataset
tar shards of token ids (:mod:`data_pipelines.shards` writes them, its tasks in :mod:`data_pipelines.shard_tasks`;
their samples in :mod:`data_pipelines.shard_format`; the directory's records in :mod:`data_pipelines.manifest`) → a
stream of packed blocks (:mod:`data_pipelines.stream`, planned per epoch by :mod:`data_pipelines.epochs`;
:mod:`data_pipelines.packing`) → dynamically masked batches (:mod:`data_pipelines.masking`), handed to Lightning by
:class:`data_pipelines.datamodule.MLMDataModule` through its loaders (:mod:`data_pipelines.loaders`). A batch's keys
and the label of a position that is not predicted are the contract with the model (:mod:`data_pipelines.contract`,
the one module the model imports).

This package never imports ``roberta_pl`` (the model side); see docs/data.md.
"""

from data_pipelines.errors import DataError, SkipReport

__all__ = ["DataError", "SkipReport"]
