"""`linear-probe`: logistic regression on the frozen model's features; no soft tokens, no label words.

Each row is rendered through the template without its soft tokens and without a label, the frozen
model reads it once, and the final hidden state of the row's last token (the position where the
label would be read; the row's end when input follows the slot) is its feature vector. A
scikit-learn `LogisticRegression` on the training rows' standardized features is the head, folded
into a weight [labels, hidden] and a bias [labels]: p(label | row) = softmax(W x + b). It is
SetFit's head without SetFit's contrastive fine-tuning of the encoder, costs one forward pass per
training row and a second of fitting, and tells a user whether prompt tuning earns its keep on
their data.

It is fitted once, by scikit-learn, when the method is built, so the gradient loop has nothing to do
(`trains` False, `fits` True); the validation rows only report it. Nothing about it is searched.

Pooling: the last token, not the mean over the row's own tokens. Chosen on validation rows only
(SST-2, 16 rows per label, default model, seeds 0-2, each seed's 300 validation rows): the last
token scored 73.7 / 69.0 / 76.7 (mean 73.1), the mean over tokens 67.7 / 68.0 / 72.3 (69.3), both
concatenated at most 72.8. Standardizing the features beat raw, centred and L2-normalised ones (72.9 at
best), and C = 1 (scikit-learn's default) was the best of 0.01-100 (71.9-73.1, flat).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..backbone import Backbone
from ..classify import ClassificationRows, Classifier
from ..logistic import FIT_ROWS, C, fit_logistic, missing_labels
from ..run import ArtifactError, RunInfo, atomic_file
from .base import Method, MethodError

PROBE_FILE = "probe.safetensors"  # tensors `weight` [labels, hidden] and `bias` [labels], fp32
POOLINGS = ("last", "mean")  # the row's last token; the mean over the row's own tokens
POOLING = "last"  # chosen on validation rows (module docstring)


@dataclass
class ProbeHead:
    weight: torch.Tensor  # [L, H]
    bias: torch.Tensor  # [L]
    pooling: str

    def probabilities(self, features: torch.Tensor) -> torch.Tensor:
        return torch.softmax(features @ self.weight.T + self.bias, dim=-1)


@torch.inference_mode()
def pooled_features(
    classifier: Classifier, rows: ClassificationRows, pooling: str = POOLING, batch_size: int = 16, progress=None
) -> torch.Tensor:
    """[N, H] fp32 features of the rows as `classifier`'s template renders them: the frozen model's
    final hidden states over each row's own tokens (its input and the template text around it, the
    label left out), after the shared prefix, pooled by `pooling`. No soft prompt is spliced."""
    if pooling not in POOLINGS:
        raise MethodError(f"pooling {pooling!r}: use one of {', '.join(POOLINGS)}")
    encoded = rows.encoded
    prefix = classifier.prefix(encoded)
    features = torch.zeros(len(rows), classifier.backbone.hidden_size)
    for index in classifier.batches(rows, batch_size):
        out = classifier.lm.run_rows(prefix, [encoded.bodies[i] + encoded.afters[i] for i in index])
        hidden = out.hidden.float()
        lengths = out.lengths.to(hidden.device)
        if pooling == "last":
            pooled = hidden[torch.arange(len(index), device=hidden.device), lengths - 1]
        else:
            mask = out.mask.to(hidden.device).unsqueeze(-1).float()
            pooled = (hidden * mask).sum(1) / lengths.unsqueeze(-1)
        features[index] = pooled.cpu()
        if progress is not None:
            progress(len(index))
    return features


def fit_head(features: torch.Tensor, labels: torch.Tensor, names: list[str], pooling: str) -> ProbeHead:
    """The logistic-regression head on these features (logistic.py), refused when a label has no row."""
    missing = missing_labels(labels, names)
    if missing:
        raise MethodError(
            f"linear-probe fits one weight vector per label from its training rows: {', '.join(map(repr, missing))} "
            "has none (add training rows of every label, or raise --shots)"
        )
    return ProbeHead(*fit_logistic(features, labels, len(names)), pooling)


class ProbeClassifier(Classifier):
    """A classifier of the template that answers with the probe's head on pooled features instead
    of the label words: every answer path (`predict_proba`, `top_labels`, `predict`) is the head's.
    What it derives (`with_prompt(None)`, the zero-shot baseline) is the plain classifier of the
    same template."""

    def __init__(self, base: Classifier, head: ProbeHead) -> None:
        super().__init__(base.backbone, base.template, base.verbalizer, None, base.max_length, length_norm=base.length_norm)
        self.head = head

    @torch.inference_mode()
    def predict_proba(self, rows: ClassificationRows, batch_size: int = 16, progress=None) -> torch.Tensor:
        return self.head.probabilities(pooled_features(self, rows, self.head.pooling, batch_size, progress))

    def top_labels(self, rows: ClassificationRows, k: int, batch_size: int = 16, progress=None) -> torch.Tensor:
        """[N, k] the k most probable labels, best first, ties to the lower index (as Classifier's)."""
        probs = self.predict_proba(rows, batch_size, progress)
        return probs.sort(dim=-1, descending=True, stable=True).indices[:, : min(k, len(self.labels))]

    def predict(self, rows: ClassificationRows, batch_size: int = 16, progress=None) -> torch.Tensor:
        return self.top_labels(rows, 1, batch_size, progress)[:, 0]

    def loss(self, rows: ClassificationRows, index: list[int]) -> torch.Tensor:
        raise MethodError("linear-probe is fitted by scikit-learn when built: it has no training loss")


class LinearProbe(Method):
    name = "linear-probe"
    summary = "logistic regression (scikit-learn) on the frozen model's last hidden state, no soft tokens"
    trains = False
    fits = True
    soft_tokens = False
    classification_only = True
    files = (PROBE_FILE,)
    # compare's guess before it has a cell of its own: its SST-2 cells (16 per label, default model,
    # 2 cores) took 77-92 s, about a zero-shot cell (77 s); a prompt-tuning cell adds its steps
    time_factor = 0.3

    def __init__(self, backbone: Backbone, head: ProbeHead, fit_seconds: float = 0.0) -> None:
        super().__init__(backbone)
        self.weight = torch.nn.Parameter(head.weight.clone())
        self.bias = torch.nn.Parameter(head.bias.clone())
        self.pooling = head.pooling
        self.fit_seconds = fit_seconds

    @classmethod
    def create(cls, task, backbone: Backbone) -> Method:
        """Fitted now, on the training rows' features (task.model is the template without soft tokens):
        on a seeded, label-stratified sample of FIT_ROWS of a larger set (a forward pass per row of
        millions would take days, and the features of all of them would not fit in memory)."""
        started = time.perf_counter()
        rows = task.rows["train"].sample(FIT_ROWS, task.spec.train.seed, by_label=True)
        features = pooled_features(task.model, rows, POOLING, task.spec.train.eval_batch_size)
        head = fit_head(features, rows.labels, task.model.labels, POOLING)
        return cls(backbone, head, time.perf_counter() - started)

    def head(self) -> ProbeHead:
        return ProbeHead(self.weight.detach(), self.bias.detach(), self.pooling)

    def apply(self, model):
        return ProbeClassifier(model.with_prompt(None), self.head())

    def save(self, run: Path) -> int:
        tensors = {"weight": self.weight.detach().cpu().contiguous(), "bias": self.bias.detach().cpu().contiguous()}
        with atomic_file(run / PROBE_FILE) as tmp:
            save_file(tensors, str(tmp))
        return sum(t.numel() for t in tensors.values())

    def info(self) -> dict:
        return {"pooling": self.pooling, "C": C, "fit_seconds": round(self.fit_seconds, 2)}

    @classmethod
    def note(cls, settings: dict) -> str | None:
        pooling = settings.get("pooling", POOLING)
        where = "the last token's hidden state" if pooling == "last" else "the mean hidden state of the row's tokens"
        return f"logistic regression (C={settings.get('C', C):g}) on {where}"  # its time is in the table

    @classmethod
    def not_servable(cls) -> str | None:
        return (
            "answers with its own logistic-regression head on the model's hidden states, which the server's "
            "batched label-word scoring does not run: use `softprompt predict` or `softprompt eval` on it"
        )

    @classmethod
    def loaded(cls, model, run: Path, info: RunInfo):
        return ProbeClassifier(model, load_head(run, info, model))


def load_head(run: str | Path, info: RunInfo, model: Classifier) -> ProbeHead:
    """The run's head, refused unless finite tensors of [labels, hidden] and [labels] with a known pooling."""
    path = Path(run) / PROBE_FILE
    try:
        tensors = load_file(str(path))
        weight, bias = tensors["weight"], tensors["bias"]
    except FileNotFoundError as err:
        raise ArtifactError(f"{path}: file not found") from err
    except (KeyError, OSError, SafetensorError) as err:
        raise ArtifactError(f"{path}: not a linear-probe file (safetensors with tensors 'weight' and 'bias'): {err}") from err
    expected = (len(model.labels), model.backbone.hidden_size)
    if tuple(weight.shape) != expected or tuple(bias.shape) != expected[:1]:
        raise ArtifactError(
            f"{path}: weight {list(weight.shape)} and bias {list(bias.shape)}, but this run needs {list(expected)} "
            f"and [{expected[0]}] ({expected[0]} labels of the model's {expected[1]} dimensions)"
        )
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise ArtifactError(f"{path}: the head holds non-finite values (NaN or infinity)")
    pooling = info.method_settings.get("pooling")
    if pooling not in POOLINGS:
        raise ArtifactError(f"{Path(run) / 'task.json'}: method_settings.pooling is {pooling!r}, expected one of {', '.join(POOLINGS)}")
    return ProbeHead(weight.float(), bias.float(), pooling)
