"""`p-tuning`: the soft prompt produced by an encoder over trainable input vectors (Liu et al.
2021, "GPT Understands, Too"). We use PEFT's default encoder, an MLP (H -> H -> H -> H with ReLUs),
rather than the paper's LSTM: it trains the same way and costs a fraction of the time on a CPU.
Folded into plain vectors when saved, so its runs are ordinary prompts.

The encoder's output at its random start is subtracted as a constant, and the init prompt added:
training starts exactly from the init prompt (a random encoder's output reads as noise, below
the template alone on SST-2 16-shot), and every gradient is the plain encoder's.
"""

from __future__ import annotations

import torch

from ..backbone import Backbone
from ..soft_prompt import SoftPrompt
from .prompt_tuning import PromptTuning


class PTuning(PromptTuning):
    name = "p-tuning"
    summary = "soft prompt produced by an MLP encoder, folded when saved"
    task_lr = False
    searched_by_auto = False
    time_factor = 0.95
    lr = 1e-3
    lrs = (3e-4, 1e-3, 3e-3)

    def __init__(self, backbone: Backbone, start: SoftPrompt) -> None:
        super().__init__(backbone, start)
        width = start.vectors.shape[1]
        self.encoder = torch.nn.Sequential(
            torch.nn.Linear(width, width),
            torch.nn.ReLU(),
            torch.nn.Linear(width, width),
            torch.nn.ReLU(),
            torch.nn.Linear(width, width),
        ).to(backbone.device)
        with torch.no_grad():  # drawn from the task's seed in `build`: a resumed run computes it again
            self.register_buffer("offset", start.vectors.to(backbone.device) - self.encoder(self.start.vectors), persistent=False)

    @property
    def vectors(self) -> torch.Tensor:
        return self.encoder(self.start.vectors) + self.offset
