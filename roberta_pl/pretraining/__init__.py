"""Pretraining: the masked-LM LightningModule (:mod:`.module`), its data (:mod:`.data`), the Trainer it runs on
(:mod:`.trainer`), the checks before a run (:mod:`.checks`), its outputs (:mod:`.outputs`) and the
``roberta-pl-train`` entry point (:mod:`.app`)."""
