"""Downstream evaluation: every task of a suite fine-tuned for several seeds, aggregated (``roberta-pl-eval``)."""
