"""`full`: every weight of the model trained (full fine-tuning), on the same data pipeline and loss.
The run holds a whole model (model.safetensors), so nothing is shared between tasks. Its state is
the whole model, so it is checkpointed at validation steps rather than after every step (a resumed
run still ends exactly where an uninterrupted one would; it only redoes the steps since).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_model, save_model

from ..backbone import Backbone
from ..run import ArtifactError, atomic_file
from .base import Method

WEIGHTS = "model.safetensors"


class FullFineTuning(Method):
    name = "full"
    summary = "all weights of the model"
    changes_base = True
    soft_tokens = False
    files = (WEIGHTS,)
    time_factor = 1.8
    lr = 3e-5
    lrs = (1e-5, 3e-5, 1e-4)

    def __init__(self, backbone: Backbone) -> None:
        super().__init__(backbone)
        backbone.model.requires_grad_(True)
        backbone.mark_changed("full fine-tuning (training)")

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {**dict(self.backbone.model.named_parameters()), **super().trainable()}  # label vectors too

    def save(self, run: Path) -> int:
        with atomic_file(Path(run) / WEIGHTS) as tmp:
            save_model(self.backbone.model, str(tmp), metadata={"format": "pt"})
        return sum(p.numel() for p in self.backbone.model.parameters())

    @classmethod
    def load(cls, run: Path, info, backbone: Backbone):
        path = Path(run) / WEIGHTS
        backbone.mark_changed(f"full {path}")  # even a load that fails half-way has changed weights
        try:
            missing, unexpected = load_model(backbone.model, str(path), strict=False)
        except (FileNotFoundError, OSError, ValueError, RuntimeError) as err:
            raise ArtifactError(f"{path}: not the weights of this model: {err}") from err
        if unexpected or [m for m in missing if "lm_head" not in m]:
            raise ArtifactError(f"{path}: the weights do not match the model ({len(missing)} missing, {len(unexpected)} unexpected)")
        return None
