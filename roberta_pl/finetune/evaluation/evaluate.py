"""One evaluation: check the model and the suite, run what has not finished, write the results."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from roberta_pl.errors import ConfigError
from roberta_pl.finetune.evaluation.fingerprint import check_out_dir, eval_fingerprint
from roberta_pl.finetune.evaluation.results import aggregate, markdown, write_results
from roberta_pl.finetune.evaluation.runner import PROG, run_suite, seed_list
from roberta_pl.finetune.evaluation.suites import check_finetune_overrides, load_suite


def check_model(model: str | None, tokenizer: str | None) -> None:
    """Refuse a MODEL that fine-tuning could not start from, in one line, before any run."""
    from roberta_pl.checkpoints import load_encoder

    if model is None:
        raise ConfigError("MODEL is required: roberta-pl-eval MODEL suite=NAME (a .ckpt, a DeepSpeed checkpoint "
                          "directory or a HuggingFace RoBERTa directory)")
    if not Path(model).exists():
        raise ConfigError(f"MODEL={model}: no such file or directory")
    try:
        load_encoder(model, tokenizer, flag="tokenizer=DIR")
    except ConfigError:
        raise
    except (OSError, KeyError, ValueError, RuntimeError) as e:
        raise ConfigError(f"MODEL={model}: not a model fine-tuning can start from (a .ckpt, a DeepSpeed checkpoint "
                          f"directory or a HuggingFace RoBERTa directory): {' '.join(str(e).split())}") from None


def evaluate(cfg: DictConfig, out_dir: Path | None = None) -> dict:
    """Run the suite ``cfg.suite`` on ``cfg.pretrained`` (the schema: :class:`~roberta_pl.finetune.evaluation.config.EvalConfig`)
    into ``out_dir`` (default ``cfg.out_dir``); errors a user can fix end it with one line. Returns the contents of
    ``results.json``."""
    from roberta_pl.harness import run_scope

    out_dir = Path(out_dir if out_dir is not None else cfg.out_dir).resolve()  # results name absolute paths
    with run_scope(PROG):
        tasks = load_suite(cfg.suite, cfg.data_dir, out_dir)
        seeds = seed_list(cfg)
        check_finetune_overrides(cfg.finetune, "finetune")
        check_model(cfg.pretrained, cfg.tokenizer)
        fingerprint = eval_fingerprint(cfg, out_dir)
        check_out_dir(out_dir, fingerprint)  # an out_dir holds one model's results (eval.json)
        print(f"{PROG}: suite {cfg.suite}: {', '.join(t.name for t in tasks)}; seeds {', '.join(map(str, seeds))}; "
              f"{cfg.init} init from {cfg.pretrained}; results in {out_dir}", flush=True)
        results = run_suite(cfg, tasks, out_dir, fingerprint)
        meta = {"suite": str(cfg.suite), "model": str(cfg.pretrained), "init": str(cfg.init)}
        summary = aggregate(tasks, results, [cfg.seed + s for s in range(cfg.seeds)], meta)
        written = write_results(out_dir, summary)
        print(markdown(summary), end="")
        print(f"{PROG}: wrote {', '.join(str(p) for p in written)}", flush=True)
        return summary
