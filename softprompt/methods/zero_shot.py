"""`zero-shot` and `calibrated`: the template without soft tokens, nothing trained.

`calibrated` is contextual calibration (Zhao et al. 2021): the model's bias towards each label is
measured on content-free inputs ("N/A", "", "[MASK]") put through the same template, and divided
out of every prediction. The prior is stored in task.json, so eval, predict and serve apply it.
"""

from __future__ import annotations

import torch

from ..backbone import Backbone
from .base import Method

CONTENT_FREE = ("N/A", "", "[MASK]")


class ZeroShot(Method):
    name = "zero-shot"
    summary = "the template without soft tokens, nothing trained"
    trains = False
    soft_tokens = False


class Calibrated(ZeroShot):
    name = "calibrated"
    summary = "zero-shot with contextual calibration (label prior from content-free inputs divided out)"
    classification_only = True

    def __init__(self, backbone: Backbone, prior: torch.Tensor) -> None:
        super().__init__(backbone)
        self.prior = prior

    @classmethod
    def create(cls, task, backbone: Backbone) -> Method:
        return cls(backbone, content_free_prior(task.model))

    def apply(self, model):
        return model.with_prompt(None).calibrated(self.prior)

    def info(self) -> dict:
        return {"calibration": [round(float(p), 6) for p in self.prior]}


def content_free_prior(classifier) -> torch.Tensor:
    """[L] mean label probabilities over the content-free inputs (every field set to each)."""
    rows = [{name: text for name in classifier.template.fields} for text in CONTENT_FREE]
    probs = classifier.predict_proba(classifier.encode(rows))
    return probs.mean(0)
