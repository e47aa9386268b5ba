"""`lora`: low-rank updates of the attention's query and value projections through PEFT (Hu et al.
2021), on the same model, data pipeline and loss. The base weights stay as they are, but every
forward pass goes through the adapters, so a LoRA run cannot share a server's frozen model with
other tasks the way prompts do. Saved in PEFT's own adapter format (adapter_config.json +
adapter_model.safetensors), so PEFT loads it too. Rank 8, alpha 16, no dropout (the model runs in
eval mode, as for every method here).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.utils import CONFIG_NAME, SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file, save_file

from ..backbone import Backbone
from ..run import ArtifactError, atomic_file
from .base import Method

# PEFT's own file names (adapter_model.safetensors, adapter_config.json), for lora runs and PEFT export
ADAPTER_WEIGHTS, ADAPTER_CONFIG = SAFETENSORS_WEIGHTS_NAME, CONFIG_NAME
RANK, ALPHA, TARGETS = 8, 16, ("q_proj", "v_proj")


def lora_config() -> LoraConfig:
    return LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(TARGETS), bias="none")


class LoRA(Method):
    name = "lora"
    summary = f"rank-{RANK} updates of the attention {'/'.join(TARGETS)} projections (PEFT)"
    changes_base = True
    soft_tokens = False
    files = (ADAPTER_WEIGHTS, ADAPTER_CONFIG)
    time_factor = 0.95
    lr = 1e-3
    lrs = (3e-4, 1e-3, 3e-3)

    def __init__(self, backbone: Backbone) -> None:
        super().__init__(backbone)
        _inject(backbone)
        backbone.mark_changed("lora (training)")
        for name, p in backbone.model.named_parameters():
            p.requires_grad_("lora_" in name)

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        adapters = {name: p for name, p in self.backbone.model.named_parameters() if p.requires_grad}
        return {**adapters, **super().trainable()}  # and learned label vectors, when the task has them

    def save(self, run: Path) -> int:
        tensors = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.backbone.model).items()}
        with atomic_file(Path(run) / ADAPTER_WEIGHTS) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "pt"})
        config = lora_config()
        config.base_model_name_or_path = self.backbone.spec
        with tempfile.TemporaryDirectory(dir=run) as folder, atomic_file(Path(run) / ADAPTER_CONFIG) as tmp:
            config.save_pretrained(folder)  # PEFT's own writer, then moved in whole
            tmp.write_bytes((Path(folder) / ADAPTER_CONFIG).read_bytes())
        return sum(t.numel() for t in tensors.values())

    @classmethod
    def load(cls, run: Path, info, backbone: Backbone):
        path = Path(run) / ADAPTER_WEIGHTS
        try:
            tensors = load_file(str(path))
        except (FileNotFoundError, OSError, ValueError) as err:
            raise ArtifactError(f"{path}: not a LoRA adapter file: {err}") from err
        _inject(backbone)
        backbone.mark_changed(f"lora {path}")
        result = set_peft_model_state_dict(backbone.model, tensors)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing:
            raise ArtifactError(f"{path}: the adapter lacks {len(missing)} LoRA tensors, e.g. {missing[0]}")
        backbone.model.requires_grad_(False)
        return None


def _inject(backbone: Backbone) -> None:
    """Put zero-initialised adapters into the backbone's model, in place. They are kept in fp32
    whatever the body runs in (bf16 on CUDA), as soft prompts are: PEFT casts each layer's input
    to its adapter's dtype and the result back."""
    inject_adapter_in_model(lora_config(), backbone.model)
    for name, p in backbone.model.named_parameters():
        if "lora_" in name:
            p.data = p.data.to(backbone.device, torch.float32)
