"""`zero-shot` and `calibrated`: the template without soft tokens, nothing trained.

`calibrated` is zero-shot with contextual calibration (calibration.py): the label prior measured
on content-free inputs is divided out of every prediction, and kept in task.json.
"""

from __future__ import annotations

import torch

from .. import calibration
from ..backbone import Backbone
from .base import Method


class ZeroShot(Method):
    name = "zero-shot"
    summary = "the template without soft tokens, nothing trained"
    trains = False
    soft_tokens = False
    uses_training_rows = False


class Calibrated(ZeroShot):
    name = "calibrated"
    summary = "zero-shot with contextual calibration (label prior from content-free inputs divided out)"
    classification_only = True

    def __init__(self, backbone: Backbone, prior: torch.Tensor) -> None:
        super().__init__(backbone)
        self.prior = prior

    @classmethod
    def create(cls, task, backbone: Backbone) -> Method:
        return cls(backbone, calibration.content_free_prior(task.model))

    def apply(self, model):
        return model.with_prompt(None).calibrated(self.prior)

    def info(self) -> dict:
        return calibration.settings(self.prior)

