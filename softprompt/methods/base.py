"""The method interface: what is trained and how it enters the frozen model.

A method is a torch Module that owns its trainable tensors and answers five questions: which
template it reads (with soft tokens or without), what the prompted model splices in (soft vectors,
or keys/values in front of everything), whether it changes the base model's weights, what goes into
the run folder, and how a run folder is loaded back. The training loop, checkpoints, resume and
early stopping see only this interface: `trainable()`, `state()`/`load_state()`, `prompt()` and
`save()`. Plain prompt tuning is the simplest method; the others override what differs.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..backbone import Backbone
from ..calibration import CONTENT_FREE
from ..classify import fit_label_head, start_label_head
from ..logistic import FIT_ROWS, missing_labels
from ..run import ArtifactError, atomic_file
from ..taskfile import PER_LABEL, TaskError
from ..template import Template, TemplateError
from ..verbalizer import LabelHead

if TYPE_CHECKING:
    from ..run import RunInfo
    from ..task import Task


# learned label vectors: [C, H] fp32 tensor `label_rows` (first-token rows), or with `label_vectors:
# per_label` [L, H] `label_vectors` and [L] `label_bias` (task.json's method_settings.label_vectors)
LABELS_FILE = "labels.safetensors"


class MethodError(ValueError):
    """The method cannot be used with this task or run."""


class Method(torch.nn.Module):
    """What every method states about itself, so that the loop, compare, auto, export, serve and
    the CLI ask the method instead of testing its name."""

    name: ClassVar[str]
    summary: ClassVar[str]
    trains: ClassVar[bool] = True  # False: no gradient steps (zero-shot, calibrated, few-shot; linear-probe fits)
    fits: ClassVar[bool] = False  # True: fitted once when built, not by steps (linear-probe's head)
    changes_base: ClassVar[bool] = False  # True: the model's own weights change (one copy per task)
    soft_tokens: ClassVar[bool] = True  # False: the template's soft tokens are dropped
    classification_only: ClassVar[bool] = False
    files: ClassVar[tuple[str, ...]] = ()  # what it writes into the run folder (labels.safetensors aside)
    plain_prompt: ClassVar[bool] = False  # its runs hold a plain soft prompt: inspect and PEFT export take them
    uses_training_rows: ClassVar[bool] = True  # False: its result depends on neither training rows nor seed
    task_lr: ClassVar[bool] = False  # True: a task file's train.lr is its rate (else its own `lr`)
    searched_by_auto: ClassVar[bool] = False  # `train --auto` may choose it
    lr: ClassVar[float] = 0.0  # the default learning rate (what the search found best; README)
    lrs: ClassVar[tuple[float, ...]] = ()  # the learning-rate search grid of `softprompt compare`
    # its training time relative to prompt tuning's (search cells on SST-2, 100 steps, default
    # model, 2 CPU cores: README, "Methods"); compare's guess before the method has a cell of its own
    time_factor: ClassVar[float] = 1.0

    @classmethod
    def artifact_files(cls) -> tuple[str, ...]:
        """Every file a run of this method may hold besides task.json: its own, and learned label vectors."""
        return (*cls.files, LABELS_FILE) if cls.learns_label_vectors() else cls.files

    @classmethod
    def not_servable(cls) -> str | None:
        """Why `serve` cannot hold this method's runs, said after "a NAME run ..." (None: it can). A
        server shares one frozen model between tasks and answers through their label words."""
        if cls.changes_base:
            return "changes the model's weights, so it cannot share this server's frozen model: serve it with its own server"
        return None

    @classmethod
    def servable(cls) -> bool:
        return cls.not_servable() is None

    @classmethod
    def note(cls, settings: dict) -> str | None:
        """One line on what this run's method chose (its task.json method_settings), for compare's report."""
        return None

    def __init__(self, backbone: Backbone) -> None:
        super().__init__()
        self.backbone = backbone  # not a Module attribute: the base model's weights are not ours
        self.fit_seconds = 0.0  # spent fitting when built (`fits`); training time, as the loop's steps are
        self.register_parameter("label_rows", None)  # [C, H] learned label vectors (task label_vectors)
        self.label_head: LabelHead | None = None  # one vector per label (label_vectors: per_label)

    # -- building ---------------------------------------------------------------------------
    @classmethod
    def template_for(cls, task: Task) -> tuple[str, dict]:
        """The template text this method trains and is used with, and what it chose in making it
        (recorded in task.json; `demonstration_tokens` there also widens train.max_length)."""
        if cls.soft_tokens:
            return task.spec.template, {}
        return task.template.without_soft().source(), {}

    @classmethod
    def build(cls, task: Task, backbone: Backbone) -> Method:
        """A fresh method, its random init drawn from the task's seed (so a run is reproducible
        and a resumed run starts where its first start did)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(task.spec.train.seed)
            method = cls.create(task, backbone)
        if task.spec.label_vectors == PER_LABEL and cls.learns_label_vectors():
            method.label_head = _start_head(task, method.apply(task.model)).to(backbone.device)
        elif task.spec.label_vectors and cls.learns_label_vectors():
            method.label_rows = torch.nn.Parameter(backbone.output_rows(task.model.choices.first_ids))
        return method

    @classmethod
    def learns_label_vectors(cls) -> bool:
        """Whether `label_vectors` (true or per_label) trains label vectors beside this method's own
        tensors: every method that takes gradient steps. For lora and full, a per-label head is the
        classification head that fine-tuning for classification trains beside the body (PEFT's
        `modules_to_save`); started by `label_init: fit` it makes their step 0 the linear probe
        (LP-FT proper), and a row's cost stops growing with its labels' tokens."""
        return cls.trains

    @classmethod
    def create(cls, task: Task, backbone: Backbone) -> Method:
        """A fresh method for a task already rendered with `template_for`'s template."""
        return cls(backbone)

    # -- what the loop and the model see ----------------------------------------------------
    def prompt(self):
        """What `PromptedLM` splices (an object with `vectors`, `length`, `prefix_kv()`), or None."""
        return None

    def apply(self, model):
        """The task's classifier or generator with this method in it (its label vectors too)."""
        model = model.with_prompt(self.prompt())
        return model if self.label_head is None else model.with_label_head(self.label_head)

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def param_groups(self, lr: float, label_lr: float) -> list[dict]:
        """Optimizer groups: the method's tensors, and learned label vectors at their own rate
        (`scale` multiplies the scheduled rate: output rows move the logits far more per step)."""
        own = [p for name, p in self.trainable().items() if not name.startswith(("label_rows", "label_head."))]
        groups = [{"params": own, "scale": 1.0}] if own else []
        labels = [p for p in (self.label_rows, self.label_head) if p is not None]
        if labels:
            params = [p for t in labels for p in ([t] if isinstance(t, torch.Tensor) else t.parameters())]
            groups.append({"params": params, "scale": label_lr / lr})
        return groups

    def state(self) -> dict[str, torch.Tensor]:
        """The trainable tensors by name, copied to the CPU (a checkpoint or the kept state)."""
        return {name: p.detach().cpu().clone() for name, p in self.trainable().items()}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, p in self.trainable().items():
                p.copy_(tensors[name].to(p.device, p.dtype))

    @property
    def checkpoint_every_step(self) -> bool:
        """Small states are checkpointed after every step; a whole model's only at validations."""
        return not self.changes_base

    # -- the run folder -----------------------------------------------------------------------
    def write(self, run: Path) -> int:
        """Write the artifact, learned label vectors included; returns the parameters it holds."""
        saved = self.save(run)
        if self.label_head is not None:
            tensors = self.label_head.tensors()
        elif self.label_rows is not None:
            tensors = {"label_rows": self.label_rows.detach().cpu().contiguous()}
        else:
            return saved
        with atomic_file(run / LABELS_FILE) as tmp:
            save_file(tensors, str(tmp))
        return saved + sum(t.numel() for t in tensors.values())

    def save(self, run: Path) -> int:
        """Write the artifact into the run folder; returns how many parameters it holds."""
        return 0

    def info(self) -> dict:
        """Fields of task.json's method_settings this method sets (per-label vectors say so)."""
        return {"label_vectors": PER_LABEL} if self.label_head is not None else {}

    @classmethod
    def load(cls, run: Path, info: RunInfo, backbone: Backbone):
        """What a run folder of this method puts into the model: the prompt for `PromptedLM`
        (or None); methods that change the base model change `backbone` here."""
        return None

    @classmethod
    def loaded(cls, model, run: Path, info: RunInfo):
        """The classifier or generator assembled from a run, as this method's runs answer: as it
        is for most; the linear probe puts its own head on it."""
        return model


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


def load_label_head(run: str | Path, labels: int, backbone: Backbone) -> LabelHead:
    """A run's per-label vectors, refused unless finite [labels, hidden_size] vectors and [labels] biases."""
    path = Path(run) / LABELS_FILE
    try:
        tensors = load_file(str(path))
        vectors, bias = tensors["label_vectors"], tensors["label_bias"]
    except FileNotFoundError as err:
        raise ArtifactError(f"{path}: file not found (task.json says the run has one vector per label)") from err
    except (SafetensorError, KeyError, OSError) as err:
        raise ArtifactError(f"{path}: not a per-label vector file (label_vectors, label_bias): {err}") from err
    shapes = (tuple(vectors.shape), tuple(bias.shape))
    if shapes != ((labels, backbone.hidden_size), (labels,)) or not (torch.isfinite(vectors).all() and torch.isfinite(bias).all()):
        raise ArtifactError(
            f"{path}: expected finite label vectors [{labels}, {backbone.hidden_size}] and biases [{labels}], "
            f"got {[list(s) for s in shapes]}"
        )
    return LabelHead(vectors, bias).to(backbone.device)


def _start_head(task: Task, model) -> LabelHead:
    """A per-label head for `model` (the task's classifier with the method's initial prompt): read
    from the names (`label_init: name`) or fitted to the training rows (`fit`, on a seeded,
    label-stratified sample of at most FIT_ROWS)."""
    content_free = _content_free(task)  # also refuses input after the slot, for either start
    if task.spec.label_init == "name":
        return start_label_head(model, content_free)
    rows = task.rows["train"].sample(FIT_ROWS, task.spec.train.seed, by_label=True)
    missing = missing_labels(rows.labels, model.labels)
    if missing:
        raise TaskError(
            f"label_init: fit fits each label's vector to its training rows: {', '.join(map(repr, missing))} "
            "has none (add training rows of every label, or use label_init: name)"
        )
    return fit_label_head(model, rows)


def _content_free(task: Task):
    """The content-free rows ("N/A", "", "[MASK]" in every field) a per-label head starts from;
    refused when the template puts input after the label slot, where a slot's state cannot read it."""
    model = task.model
    if model.template.fields_after_slot:
        raise TaskError(
            "label_vectors: per_label reads each label at its slot, so the input must come before {label}; "
            f"this template puts input after it: {model.template.text!r} (use label_vectors: true or false)"
        )
    rows = []
    for text in CONTENT_FREE:
        row = {name: text for name in model.template.fields}
        try:
            model.encode([row])
        except TemplateError:
            continue
        rows.append(row)
    return model.encode(rows)


def parameters_of(tensors: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() for t in tensors.values())


def soft_span(template: Template) -> None:
    """Refuse templates whose soft tokens are not one run before the first input field."""
    kinds = [s.kind for s in template.segments]
    first_field = min(i for i, k in enumerate(kinds) if k in ("field", "slot"))
    soft = [i for i, k in enumerate(kinds) if k == "soft"]
    if len(soft) != 1 or soft[0] > first_field:
        raise MethodError(
            f"prefix tuning puts its keys and values in the shared prefix, so the template's soft tokens must be "
            f"one {{soft:N}} before the first input field: {template.text!r}"
        )
