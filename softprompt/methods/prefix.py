"""`prefix`: trainable keys and values at every layer in front of the input (prefix tuning, Li &
Liang 2021; P-tuning v2). The template's soft tokens mark where they sit, which must be the shared
prefix, so at inference they simply are the start of the task's prefix cache.

They start as the keys and values the frozen model computes for the init prompt's vectors at those
positions (a prefix of real activations, which Li & Liang found far better than noise), and are
trained directly, with no reparameterisation. Saved as prefix.safetensors (`keys.L`, `values.L`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from ..backbone import Backbone, KeyValues
from ..run import ArtifactError, atomic_file
from ..splice import PromptedLM
from ..template import soft_id
from .base import Method, soft_span

PREFIX_FILE = "prefix.safetensors"


class PrefixKV(torch.nn.Module):
    """Per layer, keys and values [1, heads, N, head_dim] for N positions starting at `first`."""

    def __init__(self, kv: KeyValues, first: int) -> None:
        super().__init__()
        self.keys = torch.nn.ParameterList([torch.nn.Parameter(k.detach().clone()) for k, _ in kv])
        self.values = torch.nn.ParameterList([torch.nn.Parameter(v.detach().clone()) for _, v in kv])
        self.first = first

    @property
    def length(self) -> int:
        return self.keys[0].shape[2]

    def prefix_kv(self) -> KeyValues:
        return list(zip(self.keys, self.values))

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {f"keys.{i}": k.detach().cpu().contiguous() for i, k in enumerate(self.keys)}
        out.update({f"values.{i}": v.detach().cpu().contiguous() for i, v in enumerate(self.values)})
        return out


class PrefixTuning(Method):
    name = "prefix"
    summary = "keys and values at every layer, the start of the prefix cache"
    files = (PREFIX_FILE,)
    time_factor = 0.85
    lr = 0.01
    lrs = (0.003, 0.01, 0.03)

    def __init__(self, backbone: Backbone, kv: PrefixKV) -> None:
        super().__init__(backbone)
        self.kv = kv

    @classmethod
    def create(cls, task, backbone: Backbone) -> Method:
        soft_span(task.template)
        prefix = task.rows["train"].prefix
        first = prefix.index(soft_id(0))
        start = task.start_prompt(backbone)
        lm = PromptedLM(backbone, start.to(backbone.device), start.length)
        with torch.no_grad():  # the prefix up to the soft span's end (a BOS before it is seen too)
            states = lm.run_prefix(prefix[: first + start.length])
        kv = [(k[:, :, first:].float(), v[:, :, first:].float()) for k, v in states.kv]
        return cls(backbone, PrefixKV(kv, first))

    def prompt(self):
        return self.kv

    def save(self, run: Path) -> int:
        tensors = self.kv.tensors()
        with atomic_file(Path(run) / PREFIX_FILE) as tmp:
            save_file(tensors, str(tmp), metadata={"first": str(self.kv.first)})
        return sum(t.numel() for t in tensors.values())

    @classmethod
    def load(cls, run: Path, info, backbone: Backbone) -> PrefixKV:
        path = Path(run) / PREFIX_FILE
        try:
            tensors = load_file(str(path))
            with safe_open(str(path), "pt") as handle:  # the header's metadata: where the prefix starts
                first = int((handle.metadata() or {}).get("first", 0))
            layers = backbone.model.config.get_text_config().num_hidden_layers
            kv = [(tensors[f"keys.{i}"], tensors[f"values.{i}"]) for i in range(layers)]
        except FileNotFoundError as err:
            raise ArtifactError(f"{path}: file not found") from err
        except (KeyError, OSError, ValueError, SafetensorError) as err:
            raise ArtifactError(f"{path}: not a softprompt prefix file (keys.L/values.L for every layer): {err}") from err
        if any(k.shape[2] != info.soft_tokens or not torch.isfinite(k).all() or not torch.isfinite(v).all() for k, v in kv):
            raise ArtifactError(f"{path}: the prefix must be {info.soft_tokens} finite positions at every layer")
        return PrefixKV([(k.to(backbone.device), v.to(backbone.device)) for k, v in kv], first)

