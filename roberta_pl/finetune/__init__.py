"""Fine-tuning: sequence classification/regression and token classification on a pretrained encoder.

``roberta-pl-finetune`` is :func:`roberta_pl.finetune.app.main`; the pieces are the task schemas
(:mod:`.config`), example encoding and batches (:mod:`.data`) and the LightningModule (:mod:`.module`).
"""
