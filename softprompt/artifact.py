"""Loading a run folder back: the method named in task.json reads its own files (methods/), and
the classifier or generator is assembled around what it puts into the model.

This module sits above the methods, and nothing below imports it: the run description every
module needs (`RunInfo`, `ArtifactError`, the atomic write) is the leaf `run.py`.
"""

from __future__ import annotations

from pathlib import Path

from .backbone import Backbone
from .calibration import prior_of
from .classify import Classifier
from .generate import Generator
from .methods import MethodError, method_class
from .methods.base import load_label_head, load_label_rows
from .run import INFO_FILE, ArtifactError, RunInfo, check_model
from .taskfile import PER_LABEL
from .template import Template
from .verbalizer import Verbalizer


def load_run(run: str | Path, backbone: Backbone | None = None) -> tuple[Classifier | Generator, RunInfo]:
    """A ready classifier or generator from a run folder, on `backbone` (the run's model if None)."""
    info = RunInfo.read(run)
    backbone = backbone or Backbone.load(info.model)
    check_model(info, backbone, run)
    try:
        kind = method_class(info.method)
        prompt = kind.load(Path(run), info, backbone)
    except MethodError as err:
        raise ArtifactError(f"{Path(run) / INFO_FILE}: {err}") from err
    if info.kind == "generation":
        template = Template.parse(info.template, slot="target")
        target_length = (info.generation or {}).get("max_target_length", 256)
        return Generator(backbone, template, prompt, info.max_length, target_length), info
    verbalizer = Verbalizer.from_spec(info.verbalizer or {})
    per_label = info.method_settings.get("label_vectors") == PER_LABEL
    head = load_label_head(run, len(verbalizer.labels), backbone) if per_label else None
    rows = load_label_rows(run, len(verbalizer.all_words()), backbone) if info.label_vectors and not per_label else None
    model = Classifier(
        backbone, Template.parse(info.template), verbalizer, prompt, info.max_length, prior_of(info),
        length_norm=info.label_scores == "mean", label_rows=rows, label_head=head,
    )
    return kind.loaded(model, Path(run), info), info


def load_classifier(run: str | Path, backbone: Backbone | None = None) -> tuple[Classifier, RunInfo]:
    model, info = load_run(run, backbone)
    if not isinstance(model, Classifier):
        raise ArtifactError(f"{run}: a {info.kind} run, not a classifier")
    return model, info
