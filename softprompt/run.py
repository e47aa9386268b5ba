"""The run folder's description, and how its files are written.

A leaf: every module that reads or writes a run folder needs `RunInfo` (task.json), its errors and
the atomic write, and nothing here imports anything of ours above it. Each method reads and writes
its own files (methods/); `artifact.load_run` assembles a usable model from them.

task.json            method, template, verbalizer, base-model fingerprint, settings, metrics
metrics.jsonl        the training log (loss per step, validation results)
learning_curve.png, confusion_matrix.png
checkpoint/          the latest resumable state (removed when training finishes)
the method's files   see each method's `files` (prompt.safetensors, prefix.safetensors, ...)
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import BaseModel, Field

from .data import DataError

if TYPE_CHECKING:
    from .backbone import Backbone

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


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """A temporary path beside `path` to write by any means (safetensors, savefig, text); on success
    it is flushed to disk and renamed over `path`, so a crash or kill leaves the old file or the
    new, never half of one. On an error the temporary file is removed and `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # hidden, and with the real suffix: writers such as savefig choose the format by it
    handle, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(handle)
    tmp = Path(name)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync(path.parent)  # the rename itself survives a power cut only once the folder is on disk


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: str | Path, text: str) -> None:
    """Write a text file atomically (see `atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def check_model(info: RunInfo, backbone: Backbone, run: str | Path) -> None:
    """Refuse a run trained on another model (or on this one after a method changed its weights)."""
    if info.fingerprint != backbone.fingerprint:
        hint = f"load it with --model {info.model}"
        if info.model == "default":  # recorded before runs named their model, when SmolLM2 was the default
            hint = "runs that record 'default' were trained on smollm2-135m, the default then: load it with --model smollm2-135m"
        raise ArtifactError(
            f"{run}: this prompt was trained on model {info.model!r} (fingerprint {info.fingerprint}), "
            f"but the loaded model {backbone.spec!r} has fingerprint {backbone.fingerprint}; {hint}"
        )


