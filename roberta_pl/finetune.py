"""roberta-pl-finetune: fine-tuning for sequence and token classification (planned).

The fine-tuning capability (task/ config groups, GLUE-style presets, HF classification exports) is tracked
as its own issue; until it lands this entry point only explains that, so scripts fail loudly rather than
silently doing nothing.
"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(
        prog="roberta-pl-finetune",
        description="Fine-tune a roberta-pl checkpoint or HuggingFace RoBERTa directory on sequence or token "
                    "classification. Not available yet: this release ships pretraining, export and fill-mask.",
    )
    p.parse_known_args(argv)
    sys.exit("roberta-pl-finetune: fine-tuning is not implemented in this release yet "
             "(export your model with roberta-pl-export and fine-tune it with transformers meanwhile)")


if __name__ == "__main__":
    main()
