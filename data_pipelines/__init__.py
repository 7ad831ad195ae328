"""Data preparation and streaming for roberta-pl.

The flow runs one way: raw text (:mod:`data_pipelines.corpus`) → a SentencePiece tokenizer
(:mod:`data_pipelines.tokenizer`) → WebDataset tar shards of token ids
(:mod:`data_pipelines.shards`) → a stream of packed blocks (:mod:`data_pipelines.stream`,
:mod:`data_pipelines.packing`) → dynamically masked batches (:mod:`data_pipelines.masking`),
handed to Lightning by :class:`data_pipelines.datamodule.MLMDataModule`.

This package never imports ``roberta_pl`` (the model side); see docs/data.md.
"""

from data_pipelines.errors import DataError, SkipReport

__all__ = ["DataError", "SkipReport"]
