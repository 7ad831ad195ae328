"""Command-line entry points (export, fill-mask). Training entry points live in train.py / finetune.py."""
