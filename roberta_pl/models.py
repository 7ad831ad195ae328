"""The one place that turns a :class:`~roberta_pl.model.RobertaConfig` into a model of its ``architecture``.

Every job builds through these (pretraining, fine-tuning, checks, planning, HF import, checkpoints), so adding an
architecture is one entry here. The classes share their forward contracts: a masked LM returns
:class:`~roberta_pl.model.MaskedLMOutput`, a classifier its logits.
"""

from __future__ import annotations

from torch import nn

from roberta_pl.model import (
    RobertaConfig,
    RobertaForMaskedLM,
    RobertaForSequenceClassification,
    RobertaForTokenClassification,
    RobertaModel,
)
from roberta_pl.modernbert import (
    ModernBertForMaskedLM,
    ModernBertForSequenceClassification,
    ModernBertForTokenClassification,
    ModernBertModel,
)

# architecture -> (encoder, masked LM, sequence classifier, token classifier, the attribute heads keep the encoder in)
_CLASSES = {
    "roberta": (RobertaModel, RobertaForMaskedLM, RobertaForSequenceClassification, RobertaForTokenClassification,
                "roberta"),
    "modernbert": (ModernBertModel, ModernBertForMaskedLM, ModernBertForSequenceClassification,
                   ModernBertForTokenClassification, "model"),
}


def encoder(config: RobertaConfig) -> nn.Module:
    """The bare encoder: ``(input_ids, attention_mask=None)`` → hidden states ``[B, T, H]``."""
    return _CLASSES[config.architecture][0](config)


def masked_lm(config: RobertaConfig) -> nn.Module:
    """Encoder + sparse MLM head: ``(input_ids, attention_mask=None, labels=None)`` → ``MaskedLMOutput``."""
    return _CLASSES[config.architecture][1](config)


def sequence_classifier(config: RobertaConfig, num_labels: int) -> nn.Module:
    """Encoder + sentence head: ``[B, T]`` ids → ``[B, num_labels]`` logits."""
    return _CLASSES[config.architecture][2](config, num_labels)


def token_classifier(config: RobertaConfig, num_labels: int) -> nn.Module:
    """Encoder + per-token head: ``[B, T]`` ids → ``[B, T, num_labels]`` logits."""
    return _CLASSES[config.architecture][3](config, num_labels)


def encoder_of(model: nn.Module) -> nn.Module:
    """The encoder inside a masked LM or classifier built here (``model.roberta`` or ``model.model``)."""
    return getattr(model, encoder_prefix(model.config))


def encoder_prefix(config: RobertaConfig) -> str:
    """The attribute (and state-dict prefix) the heads keep the encoder under: ``roberta`` or ``model``."""
    return _CLASSES[config.architecture][4]
