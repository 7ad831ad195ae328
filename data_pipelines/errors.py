"""The one error type for bad data, and the ledger of what ``on_error="skip"`` left out.

Every reader and writer in this package either raises :class:`DataError` with a one-line
message that names the file (and line or sample), or, when asked to skip, records the loss in a
:class:`SkipReport` and logs a counted warning. Nothing is dropped silently.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

log = logging.getLogger("data_pipelines")

OnError = Literal["raise", "skip"]

# Keep a handful of examples per reason so the manifest stays small on a dirty 10 GB corpus.
_MAX_EXAMPLES = 5


class DataError(ValueError):
    """A user-facing data problem; ``str(err)`` is one line naming the file and what is wrong."""


def check_on_error(on_error: str) -> OnError:
    """Validate an ``on_error`` argument.

    Args:
        on_error: ``"raise"`` or ``"skip"``.

    Returns:
        The same value, typed.
    """
    if on_error not in ("raise", "skip"):
        raise DataError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    return on_error  # type: ignore[return-value]


@dataclass
class SkipReport:
    """Counts of skipped inputs by reason, with a few examples each.

    Attributes:
        counts: reason → number of skipped items (documents, files or shards).
        examples: reason → up to five ``"file:line: detail"`` strings.
    """

    counts: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def handle(self, on_error: OnError, reason: str, where: str, detail: str = "", fix: str | None = None) -> None:
        """Raise a :class:`DataError`, or count and log the skip.

        Args:
            on_error: ``"raise"`` to raise, ``"skip"`` to record and carry on.
            reason: short stable tag, e.g. ``"invalid_utf8"``; the manifest groups by it.
            where: the file (and ``:line``) or shard the problem is in.
            detail: extra words for the message.
            fix: what would fix it, when skipping cannot (default: fix the input or skip it).
        """
        message = f"{where}: {reason.replace('_', ' ')}" + (f" ({detail})" if detail else "")
        if on_error == "raise":
            raise DataError(message + " — " + (fix or "fix the input, or skip bad input with --on-error skip "
                                                      "(roberta-pl-data) or data.on_error=skip (training)"))
        self.counts[reason] += 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < _MAX_EXAMPLES:
            examples.append(message)
        log.warning("skipped #%d (%s): %s", self.counts[reason], reason, message)

    @property
    def total(self) -> int:
        """Number of skipped items over all reasons."""
        return sum(self.counts.values())

    def to_dict(self) -> dict:
        """JSON-ready form for the manifest: ``{"total", "counts", "examples"}``."""
        return {"total": self.total, "counts": dict(sorted(self.counts.items())), "examples": self.examples}
