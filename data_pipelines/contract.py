"""The batch contract between the data side and the model: the keys of a batch and the label of a position
that is not predicted.

A leaf of the standard library only, so that both sides read one definition: the model
(:mod:`roberta_pl.model`) may import this module and nothing else of ``data_pipelines``
(tests/unit/test_import_rules.py).
"""

IGNORE_INDEX = -100  # the label of a position that is not predicted (torch.nn.functional.cross_entropy's default)

# A masked-LM batch: LongTensors [B, T] of the masked ids, 1 for real tokens / 0 for padding, and the original id
# where a token is to be predicted (IGNORE_INDEX elsewhere). Stacked batches hold them in this order.
BATCH_KEYS = ("input_ids", "attention_mask", "labels")

# packed_docs batches (data.packing=packed_docs) also carry, after those three, a LongTensor [B, T] of which document of
# its row each token is in (runs of equal ids); the model then restarts positions and attends within each document.
DOCUMENT_IDS = "document_ids"

# Train batches also carry their optimizer step's masked-token count (data_pipelines.loaders.StepWindow).
STEP_WINDOW = "step_window"
