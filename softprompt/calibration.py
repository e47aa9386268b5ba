"""Contextual calibration (Zhao et al. 2021), in one place: the model's bias towards each label is
measured on content-free inputs ("N/A", "", "[MASK]") put through the same template, and divided
out of every prediction (`Classifier.calibrated`, inside `label_scores`, so eval, predict and serve
all apply it). The prior is kept in task.json's `method_settings.calibration`.

Two users: the `calibrated` method (zero-shot with the prior, methods/zero_shot.py), and training's
`train.calibrate` setting, which calibrates the kept state (`auto`: only when that raises the
validation metric, as measured by `choose`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .template import TemplateError

if TYPE_CHECKING:
    from .classify import Classifier
    from .run import RunInfo

CONTENT_FREE = ("N/A", "", "[MASK]")
SETTING = "calibration"  # the key of the prior in task.json's method_settings
ROUNDED_AWAY = 5e-7  # what a 0 in a prior written to 6 decimals (before the exact record) stood for


def content_free_prior(classifier: Classifier) -> torch.Tensor:
    """[L] mean label probabilities over the content-free inputs (every field set to each), less
    those the template leaves nothing to read from ("" in `{text} {label}` on a model without BOS)."""
    rows = [{name: text for name in classifier.template.fields} for text in CONTENT_FREE]
    probs = classifier.predict_proba(classifier.encode([row for row in rows if _readable(classifier, row)]))
    return probs.mean(0)


def _readable(classifier: Classifier, row: dict[str, str]) -> bool:
    try:
        classifier.encode([row])
    except TemplateError:
        return False
    return True


def settings(prior: torch.Tensor) -> dict:
    """What a calibrated run records in task.json's method_settings: every probability exactly (a
    float32 is exact as a JSON double), since with many labels some are far below 1e-6 and a
    rounded 0 would make its label's calibrated score infinite."""
    return {SETTING: [float(p) for p in prior]}


def prior_of(info: RunInfo) -> torch.Tensor | None:
    """The prior a run was calibrated with, or None."""
    prior = info.method_settings.get(SETTING)
    if prior is None:
        return None
    prior = torch.tensor(prior, dtype=torch.float32)
    return torch.where(prior > 0, prior, torch.tensor(ROUNDED_AWAY))


def is_calibrated(info: RunInfo) -> bool:
    return SETTING in info.method_settings


def choose(
    classifier: Classifier, setting: str, kept_score: float, score: Callable[[Classifier], float]
) -> tuple[Classifier, dict, float | None]:
    """`train.calibrate` applied to the kept state: "on" calibrates, "auto" only when the
    calibrated classifier's validation score (`score`) beats `kept_score`. Returns the classifier
    to use, the method settings to record, and the calibrated score where it was measured."""
    if setting == "off":
        return classifier, {}, None
    prior = content_free_prior(classifier)
    calibrated = classifier.calibrated(prior)
    measured = score(calibrated) if setting == "auto" else None
    if measured is not None and measured <= kept_score:
        return classifier, {}, measured
    return calibrated, settings(prior), measured
