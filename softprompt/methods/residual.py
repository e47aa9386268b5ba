"""`residual`: the soft prompt through a shared bottleneck MLP with a skip connection (Residual
Prompt Tuning, Razdaibiedina et al. 2023), which they found trains faster and steadier than the
vectors alone. Folded into plain vectors when saved, so its runs are ordinary prompts.

The up-projection starts at zero, so training starts exactly from the init prompt. The paper puts a
LayerNorm after the MLP; we leave it out: on a zero-initialised output it divides by a near-zero
spread and blows the first gradients up.
"""

from __future__ import annotations

import torch

from ..backbone import Backbone
from ..soft_prompt import SoftPrompt
from .prompt_tuning import PromptTuning

BOTTLENECK = 128


class Residual(PromptTuning):
    name = "residual"
    summary = "soft prompt + shared MLP with a skip connection, folded when saved"
    task_lr = False
    time_factor = 0.9
    lr = 0.01
    lrs = (0.003, 0.01, 0.03)  # the MLP's weights want smaller steps than bare vectors

    def __init__(self, backbone: Backbone, start: SoftPrompt, bottleneck: int = BOTTLENECK) -> None:
        super().__init__(backbone, start)
        width = start.vectors.shape[1]
        self.down = torch.nn.Linear(width, bottleneck).to(backbone.device)
        self.up = torch.nn.Linear(bottleneck, width).to(backbone.device)
        torch.nn.init.zeros_(self.up.weight)
        torch.nn.init.zeros_(self.up.bias)

    @property
    def vectors(self) -> torch.Tensor:
        base = self.start.vectors
        return base + self.up(torch.relu(self.down(base)))
