"""`prompt`: N trainable vectors in the embedding space (Lester et al. 2021), saved as they are."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError

from ..backbone import Backbone
from ..run import ArtifactError, RunInfo
from ..soft_prompt import PROMPT_FILE, SoftPrompt
from .base import Method


class PromptTuning(Method):
    name = "prompt"
    summary = "soft prompt: N vectors spliced into the input"
    files = (PROMPT_FILE,)
    plain_prompt = True
    task_lr = True
    searched_by_auto = True
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
    def load(cls, run: Path, info: RunInfo, backbone: Backbone) -> SoftPrompt:
        return load_prompt(run, info, backbone)


def load_prompt(run: str | Path, info: RunInfo, backbone: Backbone) -> SoftPrompt:
    """The run's prompt, refused unless it is a finite [soft_tokens, hidden_size] matrix: a
    downloaded or damaged file must fail here, with its name, not as a shape error mid-request."""
    path = Path(run) / PROMPT_FILE
    try:
        prompt = SoftPrompt.load(run)
    except FileNotFoundError as err:
        raise ArtifactError(f"{path}: file not found") from err
    except (KeyError, OSError, ValueError, RuntimeError, SafetensorError) as err:
        raise ArtifactError(f"{path}: not a softprompt prompt file (a safetensors file with a tensor 'prompt'): {err}") from err
    expected = (info.soft_tokens, backbone.hidden_size)
    if tuple(prompt.vectors.shape) != expected:
        raise ArtifactError(
            f"{path}: the prompt is {list(prompt.vectors.shape)}, but this run needs {list(expected)} "
            f"({info.soft_tokens} soft tokens of the model's {backbone.hidden_size} dimensions)"
        )
    if not torch.isfinite(prompt.vectors).all():
        raise ArtifactError(f"{path}: the prompt holds non-finite values (NaN or infinity)")
    return prompt.to(backbone.device)
