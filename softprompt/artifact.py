"""The run folder: what a trained prompt needs to be used again.

prompt.safetensors   the soft prompt (fp32, tensor `prompt`); prompt, residual and p-tuning runs
prefix.safetensors   prefix runs: keys and values per layer
adapter_model.safetensors + adapter_config.json   lora runs (PEFT's format)
model.safetensors    full fine-tuning runs: the whole model
labels.safetensors   learned label vectors (task label_vectors: true), [words, hidden] fp32
task.json            method, template, verbalizer, base-model fingerprint, settings, metrics
metrics.jsonl        the training log (loss per step, validation results)
learning_curve.png, confusion_matrix.png
checkpoint/          the latest resumable state (removed when training finishes)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from pydantic import BaseModel, Field
from safetensors import SafetensorError
from safetensors.torch import load_file

from .backbone import Backbone
from .classify import Classifier
from .data import DataError
from .generate import Generator
from .methods.base import LABELS_FILE
from .prompt import PROMPT_FILE, SoftPrompt
from .template import Template
from .verbalizer import Verbalizer

INFO_FILE = "task.json"
FORMAT_VERSION = 1


class ArtifactError(ValueError):
    """A run folder is missing, malformed or belongs to another model."""


class RunInfo(BaseModel):
    format: int = FORMAT_VERSION
    kind: str = "classification"
    method: str = "prompt"  # what was trained (methods.METHODS); "prompt": a soft prompt on the unchanged model
    method_settings: dict = Field(default_factory=dict)  # what the method chose (demonstrations, calibration prior)
    model: str
    fingerprint: str
    template: str
    verbalizer: dict[str, list[str]] | None = None  # classification
    label_column: str = "label"
    generation: dict | None = None  # generation: metrics, language, decoding settings
    target_column: str = "target"
    tests_column: str | None = None
    columns: dict[str, str] = Field(default_factory=dict)
    soft_tokens: int
    max_length: int
    init: str
    label_scores: str = "sum"  # classification: a word's score, the sum or the mean of its tokens'
    label_vectors: bool = False  # classification: labels.safetensors holds learned label vectors
    training: dict = Field(default_factory=dict)
    metrics: dict = Field(default_factory=dict)
    auto: dict | None = None  # `train --auto`: what the search tried, skipped and chose, and why
    # imported PEFT prompts: how the adapter was matched to the base model ("fingerprint",
    # "same path", "same name") or "unverified: ..." when nothing recorded could be checked
    base_model_check: str | None = None

    @classmethod
    def read(cls, run: str | Path) -> RunInfo:
        path = Path(run) / INFO_FILE
        if not path.is_file():
            raise ArtifactError(f"{run}: not a run folder (no {INFO_FILE})")
        try:
            return cls.model_validate_json(path.read_text(encoding="utf-8"))
        except ValueError as err:
            raise ArtifactError(f"{path}: not a valid run description ({err})") from err

    def remap(self, pairs: list[str] | None, fields: list[str]) -> None:
        """Apply FIELD=COLUMN overrides to the column names, for a file whose columns are named
        unlike the training data's (e.g. py2js/exec.jsonl's `python`). FIELD is a template field
        or one of target, label, tests."""
        for pair in pairs or []:
            name, sep, column = (part.strip() for part in pair.partition("="))
            if not sep or not name or not column:
                raise DataError(f"--column {pair!r}: expected FIELD=COLUMN")
            if name in ("target", "label", "tests"):
                setattr(self, f"{name}_column", column)
            elif name in fields:
                self.columns = {**self.columns, name: column}
            else:
                raise DataError(
                    f"--column {pair!r}: {name!r} is not a template field ({', '.join(fields)}) "
                    "nor target, label or tests"
                )

    def write(self, run: str | Path) -> None:
        write_atomic(Path(run) / INFO_FILE, self.model_dump_json(indent=2))


def write_atomic(path: Path, text: str) -> None:
    """Write a file so that a crash leaves either the old or the new content, never half."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(handle, "w", encoding="utf-8") as out:
        out.write(text)
    os.replace(tmp, path)


def check_model(info: RunInfo, backbone: Backbone, run: str | Path) -> None:
    if info.fingerprint != backbone.fingerprint:
        raise ArtifactError(
            f"{run}: this prompt was trained on model {info.model!r} (fingerprint {info.fingerprint}), "
            f"but the loaded model {backbone.spec!r} has fingerprint {backbone.fingerprint}; "
            f"load it with --model {info.model}"
        )


def load_run(run: str | Path, backbone: Backbone | None = None) -> tuple[Classifier | Generator, RunInfo]:
    """A ready classifier or generator from a run folder, on `backbone` (the run's model if None)."""
    info = RunInfo.read(run)
    backbone = backbone or Backbone.load(info.model)
    check_model(info, backbone, run)
    from .methods import MethodError, method_class  # local import: the methods load their own files

    try:
        prompt = method_class(info.method).load(Path(run), info, backbone)
    except MethodError as err:
        raise ArtifactError(f"{Path(run) / INFO_FILE}: {err}") from err
    if info.kind == "generation":
        template = Template.parse(info.template, slot="target")
        target_length = (info.generation or {}).get("max_target_length", 256)
        return Generator(backbone, template, prompt, info.max_length, target_length), info
    verbalizer = Verbalizer.from_spec(info.verbalizer or {})
    prior = info.method_settings.get("calibration")
    prior = torch.tensor(prior) if prior is not None else None
    rows = load_label_rows(run, len(verbalizer.all_words()), backbone) if info.label_vectors else None
    model = Classifier(
        backbone, Template.parse(info.template), verbalizer, prompt, info.max_length, prior,
        length_norm=info.label_scores == "mean", label_rows=rows,
    )
    return model, info


def load_label_rows(run: str | Path, choices: int, backbone: Backbone) -> torch.Tensor:
    """A run's learned label vectors, refused unless a finite [choices, hidden_size] matrix."""
    path = Path(run) / LABELS_FILE
    try:
        rows = load_file(str(path))["label_rows"]
    except FileNotFoundError as err:
        raise ArtifactError(f"{path}: file not found (task.json says the run has learned label vectors)") from err
    except (SafetensorError, KeyError, OSError) as err:
        raise ArtifactError(f"{path}: not a label-vector file ({err})") from err
    if tuple(rows.shape) != (choices, backbone.hidden_size) or not torch.isfinite(rows).all():
        raise ArtifactError(
            f"{path}: expected finite label vectors of shape [{choices}, {backbone.hidden_size}], got {list(rows.shape)}"
        )
    return rows.float().to(backbone.device)


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


def load_classifier(run: str | Path, backbone: Backbone | None = None) -> tuple[Classifier, RunInfo]:
    model, info = load_run(run, backbone)
    if not isinstance(model, Classifier):
        raise ArtifactError(f"{run}: a {info.kind} run, not a classifier")
    return model, info
