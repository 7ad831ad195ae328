"""Fine-tune a pretrained model on every task of a suite, for several seeds, and aggregate the scores.

Examples::

    roberta-pl-eval runs/quickstart/checkpoints/last.ckpt suite=local seeds=3 out_dir=runs/eval-local
    roberta-pl-eval runs/quickstart/checkpoints/last.ckpt suite=local init=random out_dir=runs/eval-local-random
    roberta-pl-eval runs/base/hf suite=glue data_dir=/data/glue seeds=5 out_dir=runs/glue 'finetune=[trainer=gpu]'
    roberta-pl-eval runs/base/hf suite=my_suite.yaml out_dir=runs/mine       # your own YAML list of tasks

Outputs in ``out_dir``: ``results.json``, ``results.md``, ``results.png`` and ``tasks/<task>/seed-<seed>/`` (each
run's fine-tuning outputs and ``result.json``). Rerunning the command resumes: finished task-seeds are not run again.
"""

from __future__ import annotations

import sys

from omegaconf import DictConfig

# Hydra's options that take a value (the value is not MODEL).
VALUE_OPTIONS = {"--cfg", "-c", "--package", "-p", "--info", "--config-path", "-cp", "--config-name", "-cn",
                 "--config-dir", "-cd", "--experimental-rerun"}


def model_argument(argv: list[str]) -> list[str]:
    """The first positional argument, MODEL, as the override ``pretrained=MODEL`` (as fine-tuning names it) (Hydra
    takes only overrides). A path on disk with an ``=`` in it (``epoch=0-step=100.ckpt``) is MODEL too, quoted."""
    from pathlib import Path

    for i, arg in enumerate(argv):
        if arg.startswith("-") or (i > 0 and argv[i - 1] in VALUE_OPTIONS):
            continue
        if "=" not in arg:
            return [*argv[:i], f"pretrained={arg}", *argv[i + 1:]]
        if Path(arg).exists() and "'" not in arg:
            return [*argv[:i], f"pretrained='{arg}'", *argv[i + 1:]]
    return argv


def main() -> None:
    import hydra

    from roberta_pl.config import CONF_DIR, check_override_keys
    from roberta_pl.errors import ConfigError
    from roberta_pl.finetune.evaluation.config import EvalConfig, register_configs
    from roberta_pl.finetune.evaluation.evaluate import evaluate
    from roberta_pl.loggers import quiet_notices

    quiet_notices()
    register_configs()
    sys.argv[1:] = model_argument(sys.argv[1:])
    try:
        check_override_keys(sys.argv[1:], EvalConfig)
    except ConfigError as e:
        raise SystemExit(f"roberta-pl-eval: error: {e}") from None

    def task(cfg: DictConfig) -> float | None:  # what a sweeper maximises: the suite's average
        return evaluate(cfg)["average"]

    hydra.main(config_path=str(CONF_DIR), config_name="eval", version_base="1.3")(task)()


if __name__ == "__main__":
    main()
