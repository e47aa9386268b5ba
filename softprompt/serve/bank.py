"""The task bank: one frozen backbone, many tuned prompts, and the prefix cache they share.

A task is a run folder loaded onto the bank's backbone. Its constant prefix (soft tokens and fixed
text before the first input field, a constant document included) is encoded once and its key/value
states are reused by every request of that task (`prefix_cache.PrefixCache`, keyed by content).
Rows of different tasks are answered in one forward pass (`classify`, `start_decoding`). The task
table changes while requests are served (loading, unloading): it is read and written under the
bank's lock only, and readers get a copy.

    bank = TaskBank(Backbone.load())
    bank.load("sentiment", "runs/sentiment"); bank.load("intent", "runs/intent")
    bank.classify([("sentiment", {"text": "ótimo"}), ("intent", {"frase": "cancele meu pedido"})])
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass
from pathlib import Path

import torch

from ..artifact import load_run
from ..backbone import Backbone
from ..classify import Classifier, RowToScore, label_answers, label_scores
from ..generate import DecodeConfig, Decoding, Generator, RowToDecode
from ..methods import MethodError, method_class
from ..run import ArtifactError, RunInfo
from ..splice import Prefix
from ..template import RenderedRows
from .prefix_cache import PrefixCache, content_key

TASK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
RUN_FILES = ("learning_curve.png", "confusion_matrix.png")  # figures the page may show


class TaskNotFound(KeyError):
    """No task of that name is loaded."""


class BankError(ValueError):
    """A task cannot be loaded (bad name, wrong model, bad artifact)."""


class NotAllowed(BankError):
    """The run folder lies outside the roots the server may load from."""


@dataclass
class ServedTask:
    """A loaded run: its model (classifier or generator), what it says about itself, and the digest
    of its prompt that keys its prefix cache."""

    name: str
    path: Path
    info: RunInfo
    model: Classifier | Generator
    digest: str  # sha256 of the model fingerprint and the prompt's bytes
    size_bytes: int  # the prompt's (or prefix's) file on disk

    @property
    def kind(self) -> str:
        return self.info.kind

    @property
    def labels(self) -> list[str] | None:
        return self.model.labels if isinstance(self.model, Classifier) else None

    def decode_config(self, **overrides) -> DecodeConfig:
        """The run's own decoding settings (as `predict` uses them), with request overrides."""
        gen = self.info.generation or {}
        base = dict(max_new_tokens=gen.get("max_new_tokens", 128), num_beams=gen.get("num_beams", 1), stop=gen.get("stop", []))
        base.update({k: v for k, v in overrides.items() if v is not None})
        return DecodeConfig(**base)

    def describe(self) -> dict:
        """What GET /v1/tasks says of the task."""
        metrics = self.info.metrics or {}
        return {
            "name": self.name,
            "kind": self.kind,
            "labels": self.labels,
            "template": self.info.template,
            "fields": self.model.template.fields,
            "soft_tokens": self.info.soft_tokens,
            "max_length": self.info.max_length,
            "model": self.info.model,
            "size_bytes": self.size_bytes,
            "metrics": {k: metrics[k] for k in ("dev", "dev_zero_shot", "validation", "best_step", "steps") if k in metrics},
            "generation": self.info.generation if self.kind == "generation" else None,
            "files": [f for f in RUN_FILES if (self.path / f).is_file()],
        }


@dataclass
class Prepared:
    """A task's rows rendered to ids, with their prefix (cached by content)."""

    task: ServedTask
    encoded: RenderedRows  # its `cut`: input tokens cut per row to fit the run's max_length
    prefix: Prefix

    def prompt_tokens(self, row: int) -> int:
        """Tokens the model reads for a row: prefix, the row's own, and any after the label slot."""
        return self.prefix.length + len(self.encoded.bodies[row]) + len(self.encoded.afters[row])


class TaskBank:
    """Many runs on one backbone. Loading and unloading are safe while requests are served: a
    request holds the `ServedTask` it resolved, so unloading only stops new requests."""

    def __init__(self, backbone: Backbone, cache_mb: float = 512, allow: list[Path] | None = None) -> None:
        self.backbone = backbone
        self.cache = PrefixCache(int(cache_mb * 2**20))
        self.allow = [Path(p).resolve() for p in (allow or [Path.cwd()])]
        self._tasks: dict[str, ServedTask] = {}
        self.lock = threading.Lock()  # guards _tasks

    @property
    def tasks(self) -> dict[str, ServedTask]:
        """A copy of the task table, taken under the lock: safe to iterate while a load writes it."""
        with self.lock:
            return dict(self._tasks)

    # -- tasks ---------------------------------------------------------------------------------
    def load(self, name: str, path: str | Path) -> ServedTask:
        """Load (or replace) task `name` from run folder `path`; refuses with a message that says why."""
        if not TASK_NAME.fullmatch(name):  # match() would let "$" pass a trailing newline
            raise BankError(f"task name {name!r}: use letters, digits, '_', '-' and '.', starting with a letter or digit")
        folder = self._allowed(Path(path))
        try:
            info = RunInfo.read(folder)
            kind = method_class(info.method)
        except (ArtifactError, MethodError) as err:
            raise BankError(str(err)) from err
        if not kind.servable():
            raise BankError(f"{path}: a {info.method!r} run {kind.not_servable()}")
        try:
            model, info = load_run(folder, self.backbone)
        except (ArtifactError, ValueError) as err:
            raise BankError(str(err)) from err
        prompt = model.lm.prompt
        digest = hashlib.sha256(self.backbone.fingerprint.encode())
        for key, tensor in sorted((prompt.tensors() if prompt is not None else {}).items()):
            digest.update(key.encode())
            digest.update(tensor.float().numpy().tobytes())
        size = sum((folder / f).stat().st_size for f in kind.artifact_files() if (folder / f).is_file())
        task = ServedTask(name, folder, info, model, digest.hexdigest(), size)
        with self.lock:
            self._tasks[name] = task
        return task

    def unload(self, name: str) -> None:
        with self.lock:
            if self._tasks.pop(name, None) is None:
                raise TaskNotFound(name)

    def get(self, name: str) -> ServedTask:
        with self.lock:
            task = self._tasks.get(name)
        if task is None:
            raise TaskNotFound(name)
        return task

    def _allowed(self, path: Path) -> Path:
        """The run folder, resolved (symlinks followed), if it lies inside an allowed root."""
        resolved = path.expanduser().resolve()
        if not any(resolved == root or root in resolved.parents for root in self.allow):
            roots = ", ".join(map(str, self.allow))
            raise NotAllowed(f"{path}: outside the allowed roots ({roots}); start the server with --allow to add one")
        return resolved

    # -- rows ------------------------------------------------------------------------------------
    def prepare(self, task: ServedTask, rows: list[dict[str, str]]) -> Prepared:
        """Render rows through the task's template; the prefix comes from the cache."""
        encoded = task.model.encode(rows).encoded
        return Prepared(task, encoded, self.prefix(task, encoded.prefix))

    def prefix(self, task: ServedTask, prefix_ids: list[int]) -> Prefix:
        """From the cache (which keeps nothing when its bound is 0)."""
        return self.cache.get(content_key(task.digest, prefix_ids), lambda: task.model.lm.run_prefix(prefix_ids))

    @torch.inference_mode()
    def classify_prepared(self, batch: list[Prepared]) -> list[torch.Tensor]:
        """Label probabilities of every row of every prepared request, as one batch."""
        return [torch.softmax(s.float(), -1).cpu() for s in label_scores(_rows_to_score(batch))]

    @torch.inference_mode()
    def answer_prepared(self, batch: list[Prepared]) -> list[int]:
        """The best label's index of every row of every prepared request, as one batch: the pruned
        search, which leaves unscored the labels that cannot win (`classify.label_answers`)."""
        return [top[0] for top in label_answers(_rows_to_score(batch))]

    def classify(self, items: list[tuple[str, dict[str, str]]]) -> list[dict]:
        """(task, row) pairs, possibly of different tasks -> label and probabilities per row."""
        prepared = [self.prepare(self.get(name), [row]) for name, row in items]
        out = []
        for p, probs in zip(prepared, self.classify_prepared(prepared)):
            labels = p.task.labels or []
            out.append({"label": labels[int(probs.argmax())], "probabilities": dict(zip(labels, map(float, probs)))})
        return out

    @torch.inference_mode()
    def start_decoding(self, batch: list[tuple[Prepared, DecodeConfig]]) -> Decoding:
        """One `Decoding` over every row of every prepared request (each with its own settings)."""
        return Decoding(self._gen_rows(batch))

    @torch.inference_mode()
    def join_decoding(self, decoding: Decoding, batch: list[tuple[Prepared, DecodeConfig]]) -> None:
        """The rows of more prepared requests join a running decoding."""
        decoding.add(self._gen_rows(batch))

    @staticmethod
    def _gen_rows(batch: list[tuple[Prepared, DecodeConfig]]) -> list[RowToDecode]:
        return [RowToDecode(p.task.model, p.prefix, body, config) for p, config in batch for body in p.encoded.bodies]

    @torch.inference_mode()
    def generate(self, items: list[tuple[str, dict[str, str]]], **overrides) -> list[str]:
        """(task, row) pairs, possibly of different tasks -> each row's greedy (or sampled) answer."""
        tasks = [self.get(name) for name, _ in items]
        batch = [(self.prepare(task, [row]), task.decode_config(**overrides)) for task, (_, row) in zip(tasks, items)]
        decoding = self.start_decoding(batch)
        while not decoding.done:
            decoding.step()
        return [decoding.text(r) for r in range(len(items))]


def _rows_to_score(batch: list[Prepared]) -> list[RowToScore]:
    return [
        RowToScore(p.task.model, p.prefix, body, after)
        for p in batch
        for body, after in zip(p.encoded.bodies, p.encoded.afters)
    ]
