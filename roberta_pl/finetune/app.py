"""Fine-tune a pretrained RoBERTa on sequence or token classification.

Examples (Hydra overrides; ``--help`` lists the groups, ``--cfg job`` prints the composed config)::

    roberta-pl-finetune pretrained=runs/quickstart/checkpoints/last.ckpt task=sst2 task.data_dir=/data/SST-2
    roberta-pl-finetune pretrained=/models/roberta-base task=mnli task.data_dir=/data/MNLI trainer=gpu \\
        trainer.precision=bf16-mixed optim.lr=1e-5 optim.layer_decay=0.9 batch_size=32
    roberta-pl-finetune pretrained=runs/x/hf task=token_classification task.train_file=ner/train.conll \\
        task.valid_file=ner/dev.conll
    roberta-pl-finetune -m pretrained=runs/x/hf task=sst2 task.data_dir=... optim.lr=1e-5,2e-5,3e-5   # a sweep

Outputs in ``run_dir`` (default ``runs/finetune-<task>-<init>``): ``checkpoints/best.ckpt`` (best validation
metric), ``predictions/valid.jsonl`` (and ``test.jsonl`` with ``task.test_file``), ``hf/`` (loads in
``transformers.AutoModelFor{Sequence,Token}Classification``), ``summary.json`` and the logger's files.
"""

from __future__ import annotations

from roberta_pl.finetune.config import register_configs
from roberta_pl.finetune.job import STEPS, run  # noqa: F401  (run: fine-tuning from Python)
from roberta_pl.harness import RunSpec, entry_point

SPEC = RunSpec(**STEPS)  # the steps are in roberta_pl/finetune/job.py, which roberta-pl-eval runs too

# What a sweeper optimises: the task's validation metric.
main = entry_point(SPEC, "finetune", register_configs, lambda cfg, summary: summary["metrics"].get(f"val/{cfg.task.metric}"))

if __name__ == "__main__":
    main()
