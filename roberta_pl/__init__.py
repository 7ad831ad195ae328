"""roberta-pl: pretrain RoBERTa encoders with masked-language modelling on Lightning, Hydra and WebDataset."""

from roberta_pl.model import (
    MaskedLMOutput,
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaModel,
)

__all__ = ["MaskedLMOutput", "RobertaConfig", "RobertaForMaskedLM", "RobertaModel"]
__version__ = "0.1.0"
