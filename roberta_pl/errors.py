"""The errors a run reports as one line (``roberta-pl-…: error: …``) instead of a traceback."""


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the field and value."""


class TrainingFault(RuntimeError):
    """A fault the run detected and stopped on; ``str(err)`` is one line naming the step."""
