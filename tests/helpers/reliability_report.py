"""The fault table of ``docs/reliability.md``, filled in by the reliability tests as they pass.

Each test that injects a fault calls the ``reliability`` fixture with what it observed. At the end of a
session in which every fault below was recorded, ``build/reliability.md`` is written from those records (a
test run never rewrites a tracked file); ``make reliability-doc`` copies it over the committed
``docs/reliability.md`` on purpose. The text holds no timings, pids or temporary paths, so refreshing it
gives no diff unless a result changed; a session that ran only some of the tests writes nothing.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "build" / "reliability.md"  # what a full test run writes
COMMITTED = ROOT / "docs" / "reliability.md"  # what the README links; `make reliability-doc` refreshes it

# (id, fault) in the order of the table.
FAULTS = [
    ("kill_resume", "SIGKILL of `roberta-pl-train` at 3 random steps (seeded), rerun with `resume=auto` each time"),
    ("kill_during_save", "SIGKILL while `last.ckpt` is being written"),
    ("kill_random_moments", "SIGKILL at 4 seeded random moments (any point of a step, one right after a resume), "
                            "gradient accumulation 2"),
    ("kill_random_moments_ddp", "SIGKILL of the whole process group of a 2-rank DDP run at 2 seeded random moments, "
                                "accumulation 2"),
    ("kill_random_moments_zero3", "SIGKILL of a 2-rank DeepSpeed ZeRO-3 run (CPU, gloo) at 2 seeded random moments, "
                                  "accumulation 2"),
    ("zero_kill_inside_save", "SIGKILL of a 2-rank DeepSpeed ZeRO-2 run (CPU, gloo) inside a checkpoint save, between "
                              "two ranks' files"),
    ("world_size_zero3", "resume of a 2-rank ZeRO-3 checkpoint on 1 rank and back on 2 (and bf16 ZeRO-2, 2 -> 1)"),
    ("sigterm_job", "SIGTERM to every process of a run (trainer and DataLoader worker), as a requeue or `scancel` sends"),
    ("sigusr1_stop", "SIGUSR1 (Slurm's pre-timeout warning) in the middle of an accumulation window"),
    ("corrupt_skip", "5 bad train shards at once (truncated tar, random bytes, bad array, other tokenizer, "
                     "missing file), `data.on_error=skip`"),
    ("corrupt_raise_truncated", "truncated tar, `data.on_error=raise`"),
    ("corrupt_raise_random_bytes", "4 KiB of random bytes inside a shard, `data.on_error=raise`"),
    ("corrupt_raise_bad_array", "a sample with token ids outside the vocabulary, `data.on_error=raise`"),
    ("corrupt_raise_other_tokenizer", "a shard written with another tokenizer (hash mismatch), `data.on_error=raise`"),
    ("corrupt_raise_missing", "a shard listed in the manifest but missing, `data.on_error=raise`"),
    ("nonfinite_stop", "NaN loss at step 3, `trainer.nonfinite_loss=stop` (default)"),
    ("nonfinite_skip", "inf loss at step 3, `trainer.nonfinite_loss=skip`"),
    ("nonfinite_ddp", "inf loss on DDP rank 1 only at step 3 (2 gloo processes), `trainer.nonfinite_loss=skip`"),
    ("rendezvous_timeout", "rank 0 of a 2-rank DDP job whose other rank never starts (`ROBERTA_PL_RENDEZVOUS_TIMEOUT=3`)"),
    ("rendezvous_timeout_deepspeed", "the same with DeepSpeed ZeRO-2 (`trainer=deepspeed_zero2`)"),
    ("budget_clock_skew", "a time-budgeted 2-rank DDP run whose ranks' clocks disagree (rank 1's runs 200x fast), "
                          "so one rank alone would fix `max_steps` early"),
    ("nonfinite_zero", "NaN loss on one rank of a 2-rank DeepSpeed ZeRO-2 run (CPU) inside an accumulation window of "
                       "2, `nonfinite_loss=stop`; and `nonfinite_loss=skip` with DeepSpeed in fp32"),
    ("fp16_collapse", "fp16 (`16-mixed`, real GradScaler) with every step overflowing"),
    ("unwritable_dir", "`run_dir` in a read-only directory"),
    ("full_dir", "`run_dir` that cannot hold a checkpoint (file-size limit, `ulimit -f 256`)"),
    ("resume_other_model", "resume from a checkpoint of another model size"),
    ("resume_other_tokenizer", "resume from a checkpoint made with another tokenizer"),
    ("malicious_checkpoint", "a checkpoint whose pickle runs code when unpickled"),
    ("zero_payload_model_states", "a DeepSpeed ZeRO-3 checkpoint directory whose `mp_rank_00_model_states.pt` holds a "
                                  "pickle payload"),
    ("zero_payload_optim_states", "a DeepSpeed ZeRO-3 checkpoint directory whose rank-0 optimizer-states file holds a "
                                  "pickle payload"),
    ("resume_not_a_checkpoint", "`resume=` pointing at a directory or a file that is not a checkpoint"),
    ("export_foreign_tokenizer_dir", "a checkpoint whose hyper-parameters name a foreign tokenizer directory (holding "
                                     "a 0600 `id_rsa`) that is not the tokenizer it was trained with"),
    ("export_tokenizer_symlink", "a tokenizer file, in the recorded or `--tokenizer` directory, that is a link out "
                                 "of its directory, next to an `id_rsa`"),
    ("export_dir_planted_link", "links planted in the export directory, one under a name the export writes and one "
                                "not, pointing at a 0600 file"),
    ("manifest_path_escape", "a `manifest.json` naming its first train shard by an absolute path to a real shard "
                             "outside the shard directory"),
    ("shards_without_paths", "`data=shards` with neither `data.train_shards` nor `data.tokenizer` set"),
    ("binary_input_file", "a 200 KB file of NUL bytes named `.txt` beside real text, through tokenizer training and "
                          "shard writing (raise, and skip)"),
    ("kill_orphan_workers", "SIGKILL of the trainer alone while its 2 DataLoader workers are blocked writing batches"),
    ("shard_pickle_member", "a shard holding a `.pyd` (pickle) sample"),
    ("external_target", "a `_target_` from a `--config-dir` experiment file, not on the command line"),
    ("override_target", "the same `_target_` named explicitly on the command line"),
]

_PATH = re.compile(r"(?<![\w.])/(?:[^\s:;,'\"()`]+/)+")


def scrub(text: str) -> str:
    """Drop directories from absolute paths (``/tmp/.../run/last.ckpt`` -> ``last.ckpt``) and squash spaces."""
    return " ".join(_PATH.sub("", text).split())


def render(rows: dict[str, dict[str, str]]) -> str:
    lines = [
        "# Reliability: faults tried and what happened",
        "",
        "Generated by the reliability tests (`tests/integration/test_reliability*.py`, rows recorded through the",
        "`reliability` fixture, rendered by `tests/helpers/reliability_report.py` into `build/reliability.md` whenever a",
        "test session runs all of them) and copied here by `make reliability-doc`; do not edit by hand. Every",
        "row is a real run on CPU: real Lightning Trainers, real tar shards, real subprocesses killed with",
        "SIGKILL. Error texts are quoted with directories stripped from paths.",
        "",
        "| fault | what happened | what was kept |",
        "|---|---|---|",
    ]
    for key, fault in FAULTS:
        row = rows[key]
        cells = [fault, row["happened"], row["kept"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_if_complete(rows: dict[str, dict[str, str]]) -> bool:
    """Write ``build/reliability.md`` when every fault has a row. Returns whether it did."""
    if not all(key in rows for key, _ in FAULTS):
        return False
    text = render(rows)
    if not DOC.exists() or DOC.read_text() != text:
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(text)
    return True
