"""Typed choices for the config schemas: a misspelt choice fails when Hydra composes the config, naming the
allowed values (``Invalid value 'cosin', expected one of [linear, polynomial, cosine, constant]``)."""

from __future__ import annotations

from enum import Enum


class Choice(str, Enum):
    """A config choice. Each member's name is its value, so it compares, hashes, prints and serialises as the
    plain string (``cfg.optim.decay == "cosine"``, ``f"{cfg.optim.decay}"`` is ``cosine``)."""

    def __str__(self) -> str:
        return self.value

    __format__ = str.__format__


def choices(name: str, values) -> type[Choice]:
    """A :class:`Choice` with these values, e.g. generated from a registry so the schema and the code agree."""
    return Choice(name, {v: v for v in values})
