"""The task file (YAML): which model, template, verbalizer, data and training settings.

Example::

    model: default
    template: '{soft:20} Review: {text} Sentiment: {label}'
    verbalizer: {positive: [positive, great], negative: [negative, bad]}
    data: {train: train.jsonl, dev: dev.jsonl, label: label, columns: {text: sentence}}
    init: vocab
    train: {steps: 300, lr: 0.1}

Relative data paths are read from the task file's folder.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .data import DataError, read_text


class TaskError(ValueError):
    """The task file is missing, malformed or inconsistent."""


ACTIVATION_MEMORY_MB = 512  # README, "Memory in training"


class TrainSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    steps: int | None = Field(300, ge=1, description="optimizer steps; wins over epochs")
    epochs: float | None = Field(None, gt=0, description="passes over the training set when steps is unset")
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(
        0.03, gt=0, description="peak learning rate (soft prompts want far larger rates than weights)"
    )
    label_lr: float = Field(
        0.0003, gt=0, description="peak learning rate of learned label vectors (label_vectors: true); 0.003 "
        "moved them too far on SST-2 (README)"
    )
    optimizer: Literal["adamw", "adafactor"] = "adamw"
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup: float = Field(0.05, ge=0, lt=1, description="share of steps spent warming up")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping; null turns it off")
    eval_every: int = Field(50, ge=1, description="validate every k optimizer steps")
    eval_limit: int | None = Field(
        None,
        ge=1,
        description="validation rows at most: a seeded sample, stratified by label, of the validation file "
        "or of train (only that many rows are then held out of training)",
    )
    report_limit: int | None = Field(
        None, ge=1, description="score the final report on at most N dev rows (a seeded, label-stratified sample)"
    )
    eval_batch_size: int = Field(
        16, ge=1, description="rows per evaluation batch (16 measured fastest on 2 CPU cores)"
    )
    calibrate: Literal["auto", "on", "off"] = Field(
        "auto",
        description="contextual calibration of the kept state (classification): auto keeps it when it "
        "raises the validation metric",
    )
    @field_validator("calibrate", mode="before")
    @classmethod
    def _yaml_on_off(cls, value):
        """YAML reads a bare on/off as true/false."""
        return {True: "on", False: "off"}.get(value, value) if isinstance(value, bool) else value

    patience: int = Field(5, ge=1, description="stop after this many validations without improvement")
    metric: str | None = Field(
        None,
        description="validation metric driving early stopping: accuracy | macro_f1 (classification, "
        "default accuracy); bleu | chrf | rouge_l | exact_match | f1 | parse_rate | pass_rate (generation)",
    )
    shots: int | None = Field(None, ge=1, description="few-shot: K training rows per label")
    length_bucketing: bool = Field(True, description="batch rows of similar length (less padding, faster)")
    seed: int = 0
    activation_memory: int = Field(
        ACTIVATION_MEMORY_MB,
        ge=0,
        description="MiB of layer activations a training pass keeps for its backward pass; past it the "
        "remaining decoder layers keep only their input and are recomputed (activation checkpointing: the "
        "same result, slower steps). 0 recomputes every layer. Not part of the run's identity",
    )
    max_length: int = Field(
        512,
        ge=8,
        description="tokens of a row's prompt: soft tokens, fixed text (constants included) and input "
        "fields, which are cut to fit; a generation answer has its own budget, generation.max_target_length",
    )


class DataSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    train: str = Field(
        description="a .jsonl, .csv, .tsv, .parquet or .arrow/.feather file, or a folder written by datasets' "
        "save_to_disk (as are dev, validation and test)"
    )
    dev: str | None = Field(None, description="rows of the final report; never used to choose anything")
    test: str | None = Field(
        None, description="rows that `softprompt compare` reports (a test split no selection ever saw); default: dev"
    )
    validation: str | None = Field(
        None,
        description="rows that choose (validation, early stopping, the kept prompt); default: a seeded "
        "slice of train, stratified by label",
    )
    dev_fraction: float = Field(
        0.1, gt=0, lt=1, description="with no dev file: share of train held out for the final report"
    )
    validation_fraction: float = Field(
        0.1, gt=0, lt=1, description="with no validation file: share of train held out for validation"
    )
    label: str = Field("label", description="column holding the label (classification)")
    target: str = Field("target", description="column holding the answer (generation)")
    tests: str | None = Field(None, description="column holding a test program per row (execution metric)")
    columns: dict[str, str] = Field(default_factory=dict, description="template field -> data column")


class GenerationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    metrics: list[str] = Field(default_factory=lambda: ["bleu", "chrf", "rouge_l"])
    language: str | None = Field(None, description="javascript | python: check that outputs parse")
    max_new_tokens: int = Field(128, ge=1)
    max_target_length: int = Field(
        256, ge=2, description="answer tokens kept for training, end marker included (separate from max_length)"
    )
    num_beams: int = Field(1, ge=1)
    stop: list[str] = Field(default_factory=list, description="cut answers at the first of these")


CLASSIFICATION_METRICS = ("accuracy", "macro_f1")
PER_LABEL = "per_label"  # label_vectors: one vector per label (verbalizer.LabelHead)
GENERATION_METRICS = ("bleu", "chrf", "rouge_l", "exact_match", "f1", "parse_rate", "pass_rate")


class TaskSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = "default"
    template: str
    verbalizer: dict[str, list[str] | str] | list[str] | None = None  # None: labels found in the data
    data: DataSpec
    constants: dict[str, str] = Field(
        default_factory=dict,
        description="template field -> text file whose content fills it in every row (e.g. a policy "
        "document); constant text before the first input field joins the cached shared prefix",
    )
    init: str | None = Field(
        None,
        description='random | vocab | text:"..." | labels | demos | from:RUN; default: demos for classification, '
        "vocab for generation (README, \"The default recipe\")",
    )
    label_scores: Literal["sum", "mean"] = Field(
        "sum",
        description="a label word's score: sum of its tokens' log-probabilities, or their mean (long "
        "label names are then not penalised)",
    )
    label_vectors: bool | Literal["per_label"] = Field(
        False,
        description="true: also train each label word's first-token output row (WARP); per_label: one output "
        "vector per label read at the slot, no label token scored (labels sharing a first token told apart, and "
        "a row costs what two one-token labels cost); false: the model's own rows",
    )

    label_init: Literal["name", "fit"] = Field(
        "name",
        description="where per-label vectors start (label_vectors: per_label): name, the model's reading of "
        "each label's name (step 0 scores as the frozen model); fit, a logistic regression on the training "
        "rows' states at the label slot under the initial prompt (LP-FT: for many labels and few rows)",
    )

    @field_validator("label_vectors", mode="before")
    @classmethod
    def _label_vector_kind(cls, value):
        if isinstance(value, bool) or value == PER_LABEL:
            return value
        raise ValueError(
            f"{value!r} is not one of false, true (learn each label word's first-token row) or "
            f"{PER_LABEL} (one vector per label)"
        )
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    train: TrainSettings = Field(default_factory=TrainSettings)
    base_dir: str = Field(".", exclude=True)

    @property
    def kind(self) -> str:
        """classification when the template has {label}, generation when it has {target}."""
        return "generation" if "{target}" in self.template.replace(" ", "") else "classification"

    @model_validator(mode="after")
    def _inline_constants(self) -> TaskSpec:
        """Write each constant file's text into the template, so the run folder is self-contained."""
        for name, file in self.constants.items():
            path = self.path(file)
            if not path.is_file():
                raise ValueError(f"constants.{name}: file not found: {path}")
            text = read_text(path).strip().replace("{", "{{").replace("}", "}}")
            if "{" + name + "}" not in self.template:
                raise ValueError(f"constants.{name}: the template has no {{{name}}} field")
            self.template = self.template.replace("{" + name + "}", text)
        self.constants = {}
        return self

    @model_validator(mode="after")
    def _defaults_by_kind(self) -> TaskSpec:
        generation = self.kind == "generation"
        allowed = GENERATION_METRICS if generation else CLASSIFICATION_METRICS
        if self.init is None:  # demos measured ahead on classification only; generation keeps vocab
            self.init = "vocab" if generation else "demos"
        if self.train.metric is None:
            self.train.metric = self.generation.metrics[0] if generation else "accuracy"
        if self.train.metric not in allowed:
            raise ValueError(
                f"train.metric {self.train.metric!r} is not one of {', '.join(allowed)} ({self.kind})"
            )
        if generation and self.label_vectors:
            raise ValueError("label_vectors: a generation task has no labels to learn vectors for")
        if generation:
            unknown = [m for m in self.generation.metrics if m not in GENERATION_METRICS]
            if unknown:
                raise ValueError(
                    f"generation.metrics: unknown {unknown}; use {', '.join(GENERATION_METRICS)}"
                )
            if self.train.metric not in self.generation.metrics:
                self.generation.metrics.append(self.train.metric)
        return self

    @field_validator("verbalizer")
    @classmethod
    def _labels_are_text(cls, value):
        if value is None:
            return None
        if isinstance(value, dict):
            return {str(k): v for k, v in value.items()}
        return [str(v) for v in value]

    def path(self, relative: str) -> Path:
        path = Path(relative).expanduser()
        # normpath: error messages and prediction files then name ../shared/x, not examples/../../shared/x
        return Path(os.path.normpath(path if path.is_absolute() else Path(self.base_dir) / path))


def load_task(path: str | Path, overrides: dict | None = None) -> TaskSpec:
    """Read a task file; `overrides` (from CLI flags) replace top-level or `train.` settings."""
    path = Path(path)
    if not path.is_file():
        raise TaskError(f"{path}: task file not found")
    try:
        raw = yaml.safe_load(read_text(path))  # not UTF-8: the message data files get (line, byte, column)
    except DataError as err:
        raise TaskError(str(err)) from err
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise TaskError(f"{path}{line}: not valid YAML ({getattr(err, 'problem', err)})") from err
    if not isinstance(raw, dict):
        raise TaskError(f"{path}: expected a mapping of settings")
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        if key in TrainSettings.model_fields:
            raw.setdefault("train", {})
            raw["train"] = {**(raw["train"] or {}), key: value}
        else:
            raw[key] = value
    raw["base_dir"] = str(path.resolve().parent)
    try:
        return TaskSpec.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(
            (f"field {'.'.join(map(str, e['loc']))}: " if e["loc"] else "")
            + e["msg"].removeprefix("Value error, ")
            for e in err.errors()
        )
        raise TaskError(f"{path}: {problems}") from err
