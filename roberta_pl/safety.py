"""Where a config may name code to run: Hydra ``_target_`` values.

``hydra.utils.instantiate`` imports and calls whatever a ``_target_`` names, so a YAML file is code. The rule:
a ``_target_`` in the composed config is accepted only if

1. one of the project's own config files (``conf/**/*.yaml``) names it, or
2. the user's command-line overrides name it explicitly (``'trainer.callbacks=[{_target_: my.Callback}]'``,
   ``trainer.callbacks.0._target_=my.Callback``).

Anything else, e.g. a ``_target_`` that arrives through an extra ``--config-dir``/search path or an
``experiment=`` file outside the project, is refused before anything is instantiated: such a file can
still set values, but naming code to import needs the user's explicit say on the command line.
Hydra's own node (launchers, sweepers) is not part of the task config and is not checked.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from roberta_pl.config import CONF_DIR
from roberta_pl.errors import ConfigError


def _targets(node: Any, path: str = "") -> Iterator[tuple[str, str]]:
    """``(dotted key, value)`` of every ``_target_`` in a nested config, list or plain container."""
    if isinstance(node, (DictConfig, ListConfig)) and node._is_none():  # an Optional[...] field set to None
        return
    if isinstance(node, (DictConfig, dict)):
        items = node.items_ex(resolve=False) if isinstance(node, DictConfig) else node.items()
        for key, value in items:
            where = f"{path}.{key}" if path else str(key)
            if key == "_target_":
                yield where, str(value)
            else:
                yield from _targets(value, where)
    elif isinstance(node, (ListConfig, list, tuple)):
        for i, value in enumerate(node):
            yield from _targets(value, f"{path}.{i}" if path else str(i))


@functools.lru_cache(maxsize=4)
def project_targets(conf_dir: Path = CONF_DIR) -> frozenset[str]:
    """Every ``_target_`` value the project's own config files name."""
    found = set()
    for path in sorted(conf_dir.rglob("*.yaml")):
        found.update(value for _, value in _targets(OmegaConf.load(path)))
    return frozenset(found)


def override_targets(overrides: Sequence[str]) -> frozenset[str]:
    """Every ``_target_`` value named by command-line overrides (parsed with Hydra's own grammar)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    found = set()
    for override in OverridesParser.create().parse_overrides(list(overrides)):
        if override.is_delete():
            continue
        key = override.key_or_group
        value = override.value()
        if key == "_target_" or key.endswith("._target_"):
            found.add(str(value))
        else:
            found.update(v for _, v in _targets(value))
    return frozenset(found)


def command_line_overrides() -> list[str]:
    """The task overrides Hydra recorded for this run (``[]`` outside a ``@hydra.main`` app)."""
    from hydra.core.hydra_config import HydraConfig

    return list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []


def check_hydra_targets(cfg: DictConfig, overrides: Sequence[str] | None = None, conf_dir: Path = CONF_DIR) -> None:
    """Refuse a composed config whose ``_target_``s come neither from ``conf_dir`` nor from the overrides.

    Args:
        cfg: the composed task config (without Hydra's own ``hydra`` node).
        overrides: the user's command-line overrides; ``None`` takes the ones Hydra recorded for this run.
        conf_dir: the application's config directory (the fine-tuning app passes its own).

    Raises:
        ConfigError: one line naming the config key and the refused value.
    """
    allowed = project_targets(Path(conf_dir)) | override_targets(command_line_overrides() if overrides is None else overrides)
    for where, target in _targets(cfg):
        if where.startswith("hydra."):
            continue
        if target not in allowed:
            raise ConfigError(
                f"{where}={target}: this _target_ comes from neither roberta-pl's conf/ nor a command-line override, "
                f"so it is not imported; to run it, name it on the command line ({where}={target})")
