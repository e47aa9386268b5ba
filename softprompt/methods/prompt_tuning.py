"""`prompt`: N trainable vectors in the embedding space (Lester et al. 2021), saved as they are."""

from __future__ import annotations

from pathlib import Path

import torch

from ..backbone import Backbone
from ..prompt import SoftPrompt
from .base import Method


class PromptTuning(Method):
    name = "prompt"
    summary = "soft prompt: N vectors spliced into the input"
    lr = 0.03
    lrs = (0.03, 0.1, 0.3)

    def __init__(self, backbone: Backbone, start: SoftPrompt) -> None:
        super().__init__(backbone)
        self.start = start.to(backbone.device)

    @classmethod
    def create(cls, task, backbone: Backbone) -> Method:
        start = task.start_prompt(backbone)
        return cls(backbone, start)

    @property
    def length(self) -> int:
        return self.start.length

    @property
    def vectors(self) -> torch.Tensor:
        """The soft tokens' embeddings, [N, H]: what the model reads."""
        return self.start.vectors

    def prefix_kv(self):
        return None

    def prompt(self):
        return self

    def folded(self) -> SoftPrompt:
        """The plain prompt this method amounts to (what is saved, served and exported)."""
        with torch.no_grad():
            return SoftPrompt(self.vectors.detach().cpu())

    def tensors(self) -> dict[str, torch.Tensor]:
        return self.folded().tensors()

    def save(self, run: Path) -> int:
        folded = self.folded()
        folded.save(run)
        return folded.vectors.numel()

    @classmethod
    def load(cls, run: Path, info, backbone: Backbone):
        from ..artifact import load_prompt  # local import: artifact loads runs through the methods

        return load_prompt(run, info, backbone)
