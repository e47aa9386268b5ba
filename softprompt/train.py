"""Training: the loop, validation, early stopping, checkpoints, exact resume, for any method.

What is trained is the method's business (methods/: a soft prompt by default); the loop only asks
it for its trainable tensors, their state, and to save itself. After every optimizer step (and its
validation, when one is due) the whole training state goes atomically into checkpoint/: the
method's tensors, the best state so far, the optimizer state and the counters (a method that trains
a whole model is checkpointed at validation steps only). The checkpoint is the only state: on
resume metrics.jsonl is cut back to its step and the kept artifact is restored from it, so a run
stopped at any moment (Ctrl-C or kill -9) and resumed ends exactly where the uninterrupted run
would. A resume whose task file, method or flags would change the result is refused with a list of
what changed. Under a launcher (torchrun, accelerate launch) N processes run this same loop, each on
its share of every batch, and only the main one writes (distributed.py).
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from array import array
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file

from . import calibration, plots
from .backbone import Backbone, model_name
from .data import fingerprint as data_fingerprint
from .distributed import processes
from .doctor import diagnose
from .methods import DEFAULT_METHOD, Method, method_class
from .run import INFO_FILE, RunInfo, atomic_file, write_atomic
from .task import Task, make_task, summarize
from .taskfile import TaskError, TaskSpec, TrainSettings

CHECKPOINT = "checkpoint"
METRICS_FILE = "metrics.jsonl"
SPLITS_FILE = "splits.json"


# -- batches --------------------------------------------------------------------------------
def batch_plan(
    lengths: Sequence[int], batch_size: int, seed: int, epoch: int, bucket: bool = True
) -> np.ndarray:
    """One epoch of batches: shuffled, then (with `bucket`) sorted by length within windows of 32
    batches so each batch holds rows of similar length (little padding), then the batches shuffled
    again. [batches, batch_size] row positions, a batch per line, the one short batch padded with -1.

    Arrays, not a list per batch: 5 million rows plan in 20 MB (int32). Python's shuffle on an array draws
    exactly what it draws on a list of the same length, so the plan is the one lists gave."""
    rng = random.Random(seed * 1_000_003 + epoch)
    n = len(lengths)
    kind = "i" if n < 2**31 else "q"  # int32 positions while they fit
    order = array(kind, range(n))
    rng.shuffle(order)  # as on a list (a Python loop either way), without a Python int per row
    window = batch_size * 32 if bucket else batch_size
    rows = np.full(-(-n // batch_size) * batch_size, -1, kind)  # the short batch padded
    rows[:n] = np.frombuffer(order, kind)
    del order
    key = np.asarray(lengths)[rows[:n]]
    for start in range(0, n, window):  # a stable sort, as sorted() was: ties keep the shuffled order
        part = slice(start, min(start + window, n))
        rows[part] = rows[part][np.argsort(key[part], kind="stable")]
    del key
    shuffled = array(kind, range(len(rows) // batch_size))
    rng.shuffle(shuffled)  # the permutation shuffling the list of batches made
    return rows.reshape(-1, batch_size)[np.frombuffer(shuffled, kind)]


def micro_batches(lengths: Sequence[int], settings: TrainSettings, skip: int) -> Iterator[list[int]]:
    """Endless stream of micro-batches across epochs, skipping the first `skip` (for resume)."""
    per_epoch = -(-len(lengths) // settings.batch_size)
    epoch, first = divmod(skip, per_epoch)  # an epoch's plan depends on its number alone
    while True:
        plan = batch_plan(lengths, settings.batch_size, settings.seed, epoch, settings.length_bucketing)
        for batch in plan[first:]:
            yield batch[batch >= 0].tolist()
        epoch, first = epoch + 1, 0


# -- optimisation ---------------------------------------------------------------------------
def lr_at(step: int, total: int, settings: TrainSettings) -> float:
    """Learning rate for optimizer step `step` (0-based). A plain function of the step, so a
    resumed run needs no scheduler state."""
    warmup = int(total * settings.warmup)
    if step < warmup:
        return settings.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    if settings.schedule == "linear":
        return settings.lr * max(0.0, 1.0 - progress)
    if settings.schedule == "cosine":
        return settings.lr * 0.5 * (1.0 + math.cos(math.pi * progress))
    return settings.lr


def make_optimizer(params: list[torch.nn.Parameter] | list[dict], settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params,
            lr=settings.lr,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
            weight_decay=settings.weight_decay,
        )
    # fused: one kernel over all tensors instead of a loop of small ops per tensor; for `full` on
    # Gemma 3 270M (268M parameters) a step of the optimizer went from 2-3.6 s to 0.25 s on 2 cores
    return torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay, fused=True)


def total_steps(settings: TrainSettings, n_train: int) -> int:
    if settings.steps:
        return settings.steps
    per_epoch = math.ceil(n_train / settings.batch_size / settings.grad_accum)
    return max(1, math.ceil((settings.epochs or 1) * per_epoch))


# -- what decides a run's result --------------------------------------------------------------
def run_identity(spec: TaskSpec, backbone: Backbone, method: str = DEFAULT_METHOD) -> dict:
    """Everything that decides the result: the method, the model's weights, the task file's
    settings (the template with its constants inlined, verbalizer, init, data, decoding, training)
    and the bytes of every data file. A resumed run must match it exactly."""
    files = {"train": spec.data.train, "dev": spec.data.dev, "validation": spec.data.validation}
    digests = {role: data_fingerprint(spec.path(path)) for role, path in files.items() if path}
    return {
        "method": method,
        "model_fingerprint": backbone.fingerprint,
        **spec.model_dump(exclude={"model": True, "train": {"activation_memory"}}),  # memory changes no result
        "data_bytes": digests,
    }


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def identity_changes(saved: dict, now: dict) -> list[str]:
    """'setting: saved -> now' for every setting that differs. A setting newer than the saved
    checkpoint counts as unchanged while it has its default (the run was made under that default)."""
    old, new = _flatten(saved), _flatten(now)
    defaults = _flatten({**TaskSpec.model_construct().model_dump(exclude={"model"}), "train": TrainSettings().model_dump()})
    return [
        f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
        for k in sorted(old.keys() | new.keys())
        if old.get(k) != new.get(k) and not (k not in old and k in defaults and new.get(k) == defaults[k])
    ]


def _refuse_changed_resume(run: Path, saved: dict, now: dict) -> None:
    changes = identity_changes(saved, now)
    if not changes:
        return
    hint = ""
    if any(c.startswith(("train.steps", "train.epochs")) for c in changes):
        hint = (
            " The number of steps sets the learning rate of every step (warmup and decay), so a run resumed "
            "with other steps would match no uninterrupted run: finish this run as it was started, then train "
            f"further in a new run with --init from:{run} --steps N."
        )
    raise TaskError(f"cannot resume {run}: the result would change ({'; '.join(changes)}).{hint}")


# -- checkpoints ----------------------------------------------------------------------------
@dataclass
class TrainState:
    step: int = 0  # optimizer steps done, each with its validation when one was due
    best: float = -1.0  # best validation score so far
    best_step: int = 0
    bad_evals: int = 0  # validations since the best one
    stopped_early: bool = False
    examples: int = 0
    train_seconds: float = 0.0
    baseline: dict = field(default_factory=dict)  # validation at step 0: zero-shot and initial prompt
    # zero-shot prompting on the report rows, scored before training: a method that changes the
    # model's weights (lora, full) would otherwise be scored zero-shot on its tuned weights
    dev_zero_shot: dict | None = None
    saved_parameters: int = 0  # parameters in the kept artifact, as its last save wrote it


@dataclass
class Checkpoint:
    params: dict[str, torch.Tensor]  # the method's trainable tensors at this step
    best: dict[str, torch.Tensor]  # the best state so far, the one the run keeps
    optimizer: dict
    state: TrainState
    identity: dict


def save_checkpoint(run: Path, checkpoint: Checkpoint) -> None:
    """Write checkpoint/ atomically: build it beside, then swap it in with renames."""
    tensors = {f"param.{k}": v.detach().cpu().contiguous() for k, v in checkpoint.params.items()}
    tensors.update({f"best.{k}": v.detach().cpu().contiguous() for k, v in checkpoint.best.items()})
    scalars: dict[str, dict] = {}
    for index, entry in checkpoint.optimizer.get("state", {}).items():
        for key, value in entry.items():
            if torch.is_tensor(value):
                tensors[f"opt.{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    tmp = run / f".{CHECKPOINT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    with atomic_file(tmp / "state.safetensors") as path:
        save_file(tensors, str(path))
    meta = {
        "state": asdict(checkpoint.state),
        "optimizer_scalars": scalars,
        "param_groups": checkpoint.optimizer.get("param_groups", []),
        "identity": checkpoint.identity,
    }
    write_atomic(tmp / "state.json", json.dumps(meta))
    final, old = run / CHECKPOINT, run / f".{CHECKPOINT}.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def find_checkpoint(run: Path) -> Path | None:
    folder = run / CHECKPOINT
    if not folder.is_dir() and (run / f".{CHECKPOINT}.old").is_dir():
        folder = run / f".{CHECKPOINT}.old"  # stopped between the two renames
    return folder if folder.is_dir() else None


def load_checkpoint(folder: Path) -> Checkpoint:
    tensors = load_file(str(folder / "state.safetensors"))
    meta = json.loads((folder / "state.json").read_text())
    params = {k[len("param.") :]: v for k, v in tensors.items() if k.startswith("param.")}
    best = {k[len("best.") :]: v for k, v in tensors.items() if k.startswith("best.")}
    opt_state: dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            index, _, key = name[len("opt.") :].partition(".")
            opt_state.setdefault(int(index), {})[key] = value
    for index, entry in meta["optimizer_scalars"].items():
        opt_state.setdefault(int(index), {}).update(entry)
    optimizer = {"state": opt_state, "param_groups": meta["param_groups"]}
    return Checkpoint(params, best, optimizer, TrainState(**meta["state"]), meta["identity"])


# -- the log ----------------------------------------------------------------------------------
class Log:
    """metrics.jsonl, appended as training goes and kept in memory for the plots.

    On resume it is cut back to the checkpoint's step: lines of a step the checkpoint does not
    hold, and a half-written last line (a kill during an append), are dropped and written again.
    Only the main process of several writes it; the others keep the history alone."""

    def __init__(self, run: Path, up_to_step: int | None) -> None:
        self.path = run / METRICS_FILE
        self.writes = processes().is_main
        self.history: list[dict] = []
        if up_to_step is not None and self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(entry, dict) and entry.get("step", math.inf) <= up_to_step:
                    self.history.append(entry)
        if self.writes:
            write_atomic(self.path, "".join(json.dumps(h) + "\n" for h in self.history))

    def add(self, **entry) -> None:
        self.history.append(entry)
        if not self.writes:
            return
        with self.path.open("a", encoding="utf-8") as out:
            out.write(json.dumps(entry) + "\n")


# -- the loop -------------------------------------------------------------------------------
COLUMNS = (
    TextColumn("[bold]{task.description}"),
    BarColumn(),
    MofNCompleteColumn(),
    TimeRemainingColumn(),
    TextColumn("{task.fields[info]}"),
)


@contextmanager
def _phase(progress: Progress, what: str, total: int) -> Iterator[Callable[[int], None]]:
    """A bar for one long phase (validation, final scoring) of `total` rows, of which this process
    scores its share; removed when the phase ends."""
    bar = progress.add_task(what, total=len(processes().share(range(total))), info="")
    try:
        yield lambda n: progress.advance(bar, n)
    finally:
        progress.remove_task(bar)


@dataclass
class _Opened:
    """A run folder ready to train: its task, method, checkpoint (fresh or resumed), optimizer and log."""

    run: Path
    task: Task
    settings: dict  # what the method chose in making the task (e.g. its demonstrations)
    kind: type[Method]
    trainer: Method
    checkpoint: Checkpoint
    fresh: bool
    optimizer: torch.optim.Optimizer | None
    steps: int
    log: Log


class TaskCache:
    """Tasks built once (data read, validated and encoded) and shared by the runs of a search.

    The runs of `train --auto` differ in what only the loop reads (the learning rate, init, label
    vectors, steps, validation interval), so they share one task per template and method; each run
    gets it under its own spec (Task.with_spec)."""

    VARIED = {"init": True, "label_vectors": True, "train": {"lr", "steps", "epochs", "eval_every"}}

    def __init__(self) -> None:
        self._built: dict[str, tuple[Task, dict]] = {}

    def get(self, spec: TaskSpec, kind: type[Method], backbone: Backbone) -> tuple[Task, dict]:
        key = json.dumps([kind.name, backbone.fingerprint, spec.model_dump(mode="json", exclude=self.VARIED)], sort_keys=True)
        if key not in self._built:
            self._built[key] = _task_for(spec, kind, backbone)
        task, settings = self._built[key]
        return task.with_spec(spec), settings


def _open(
    spec: TaskSpec, run: Path, backbone: Backbone | None, method: str, resume: bool, console: Console,
    tasks: TaskCache | None, *, warn: bool = True,
) -> _Opened:
    """Read the task, then start the run folder afresh or load its checkpoint (refusing a resume
    that would change the result). `warn`: print the task doctor's cheap checks (a search's trials
    leave them to the final run, which prints them once)."""
    kind = method_class(method)
    found = _resumable(run, resume)
    backbone = backbone or _load_backbone(spec, console)
    backbone.activation_budget = spec.train.activation_memory * 2**20
    # reads and validates all data before anything is written
    task, settings = tasks.get(spec, kind, backbone) if tasks else _task_for(spec, kind, backbone)
    task.require_tools()  # before anything is written
    identity = run_identity(task.spec, backbone, kind.name)  # the model as it is before the method changes it
    trainer = kind.build(task, backbone)
    if spec.label_vectors and not kind.learns_label_vectors():
        console.print(f"[yellow]note: label_vectors is ignored by method {method!r} (it takes no gradient steps)")
    checkpoint, fresh = _starting_point(run, trainer, identity, found, console)
    if warn:
        _warn_task(task, backbone, console, kind.trains)
    procs = processes()
    procs.wait()  # every process has chosen fresh or resumed before the main one writes
    if procs.is_main:
        write_atomic(run / SPLITS_FILE, json.dumps(task.splits.record()))
    if not fresh and procs.is_main:  # the kept artifact as of the checkpoint, not a later step's
        trainer.load_state(checkpoint.best)
        checkpoint.state.saved_parameters = trainer.write(run)
    trainer.load_state(checkpoint.params)
    task.use_method(trainer)
    optimizer = _optimizer_for(trainer, task.spec.train, None if fresh else checkpoint.optimizer)
    steps = total_steps(task.spec.train, len(task.rows["train"])) if kind.trains else 0
    log = Log(run, None if fresh else checkpoint.state.step)
    return _Opened(run, task, settings, kind, trainer, checkpoint, fresh, optimizer, steps, log)


def train(
    spec: TaskSpec,
    out: str | Path,
    backbone: Backbone | None = None,
    *,
    resume: bool = False,
    console: Console | None = None,
    on_step: Callable[[int], None] | None = None,
    method: str = DEFAULT_METHOD,
    baselines: bool = True,
    report: bool = True,
    tasks: TaskCache | None = None,
) -> RunInfo:
    """Train `method` (methods.METHODS) for the task (classification or generation) and write the
    run folder `out`. `on_step(step)` is called after each step. `baselines=False` skips zero-shot
    prompting (compare scores it once, as a method); `report=False` skips scoring the dev rows (a
    learning-rate search only needs validation). A resumed run scores the baselines its start
    left out (a search's trial continued into the final run). A method that changes the model's
    weights changes `backbone`'s. Under a launcher every process calls it (distributed.py)."""
    console = processes().shown(console or Console(stderr=True))
    opened = _open(spec, Path(out), backbone, method, resume, console, tasks)
    run, task, kind, checkpoint = opened.run, opened.task, opened.kind, opened.checkpoint
    zero_shot = baselines and kind.trains
    try:
        with Progress(*COLUMNS, console=console) as progress:
            if opened.fresh or not kind.changes_base:  # resumed: the base model is still the one baselines are of
                _baselines(run, task, checkpoint, opened.log, progress, console, zero_shot=zero_shot, dev=zero_shot and report)
            if opened.fresh:  # the step-0 checkpoint (an untrained method is a baseline itself)
                _commit(run, checkpoint, opened.trainer, opened.optimizer, best_changed=True, save=True)
            _loop(run, task, checkpoint, opened.trainer, opened.optimizer, steps=opened.steps, log=opened.log,
                  progress=progress, on_step=on_step)
            info = _finish(run, task, checkpoint, opened.trainer, settings=opened.settings, log=opened.log,
                           progress=progress, report=report)
    except KeyboardInterrupt:
        console.print(f"[yellow]interrupted; continue with --resume (from step {_saved_step(run)})")
        raise
    console.print(f"{_outcome(info, kind)}; saved to {run}")
    return info


def train_prefix(
    spec: TaskSpec,
    out: str | Path,
    backbone: Backbone,
    *,
    until: int,
    console: Console,
    method: str = DEFAULT_METHOD,
    tasks: TaskCache | None = None,
) -> TrainState:
    """The first `until` steps of the run `train` would make in `out`, started there or continued
    from an earlier prefix; no baselines, no report, no task.json: the folder stays resumable. A
    search trial is the start of the run it predicts (not a compressed copy with a faster decay),
    so the trial that wins is continued into the final run instead of being trained again. It
    validates at step `until` besides the run's own interval. Returns the training state (its
    `best` is the best validation score up to `until`)."""
    run, console = Path(out), processes().shown(console)
    opened = _open(spec, run, backbone, method, find_checkpoint(run) is not None, console, tasks, warn=False)
    checkpoint = opened.checkpoint
    with Progress(*COLUMNS, console=console) as progress:
        if opened.fresh:
            _baselines(run, opened.task, checkpoint, opened.log, progress, console, zero_shot=False, dev=False)
            _commit(run, checkpoint, opened.trainer, opened.optimizer, best_changed=True, save=True)
        _loop(run, opened.task, checkpoint, opened.trainer, opened.optimizer, steps=opened.steps, log=opened.log,
              progress=progress, on_step=None, stop_after=until)
    return checkpoint.state


def _load_backbone(spec: TaskSpec, console: Console) -> Backbone:
    procs = processes()
    with console.status(f"loading model {spec.model} ..."):
        backbone = Backbone.load(spec.model, device=str(procs.device))
    console.print(f"model {spec.model} loaded in {backbone.load_seconds:.1f}s")
    if procs.count > 1:
        console.print(f"training on {procs.describe()}: each takes its share of every batch")
    return backbone


def _optimizer_for(trainer: Method, settings: TrainSettings, saved: dict | None) -> torch.optim.Optimizer | None:
    """The optimizer over the method's parameter groups (None when it trains nothing), its state
    restored from a checkpoint's `saved` when resuming."""
    if not trainer.trains:
        return None
    optimizer = make_optimizer(trainer.param_groups(settings.lr, settings.label_lr), settings)
    if saved is not None:
        optimizer.load_state_dict(saved)
    return optimizer


def _outcome(info: RunInfo, kind: type[Method]) -> str:
    """The line that ends training: what was kept, and its score on the dev rows (or validation)."""
    metrics = info.metrics
    kept = f"kept the state of step {metrics['best_step']}" if kind.trains else f"{kind.name}: nothing to train"
    if kind.fits:
        kept = f"{kind.name}: fitted in {metrics['train_seconds']:.1f}s, no gradient steps"
    if fell_back := metrics["validation"].get("fell_back"):
        metric = info.training["metric"]
        kept = (
            f"kept the template alone (zero-shot prompting): training's best state (step {fell_back['trained_step']}, "
            f"validation {metric} {fell_back['trained'][metric]:.3f}) scored under it ({fell_back['zero_shot'][metric]:.3f}), "
            "so the run answers as zero-shot"
        )
    if "dev" not in metrics:
        return f"{kept}; validation {info.training['metric']} {metrics['validation']['kept'][info.training['metric']]:.3f}{_short_of_zero_shot(info, kind)}"
    zero = f" (zero-shot: {_describe(metrics['dev_zero_shot'])})" if "dev_zero_shot" in metrics else ""
    return f"{kept}; on {metrics['rows']['dev']} dev rows: {_describe(summarize(metrics['dev']))}{zero}{_short_of_zero_shot(info, kind)}"


def _short_of_zero_shot(info: RunInfo, kind: type[Method]) -> str:
    """What the end line adds when training did not beat zero-shot prompting on the validation rows
    (the kept state, calibrated where calibration was kept): the template alone does as well."""
    metric, validation = info.training["metric"], info.metrics["validation"]
    zero = validation.get("zero_shot", {}).get(metric)
    if not kind.trains or zero is None or "fell_back" in validation:
        return ""
    kept = validation["kept"][metric]
    if calibration.prior_of(info) is not None and "calibrated" in validation:
        kept = validation["calibrated"][metric]
    if kept > zero:
        return ""
    return (
        f"; training did not beat zero-shot on the validation rows ({metric} {kept:.3f}, zero-shot {zero:.3f}): "
        "the template alone does as well"
    )


def _task_for(spec: TaskSpec, kind: type[Method], backbone: Backbone) -> tuple[Task, dict]:
    """The task rendered with the method's template (soft tokens dropped, demonstrations added),
    and what the method chose in making it."""
    task = make_task(spec, backbone)
    if kind.classification_only and task.kind != "classification":
        raise TaskError(f"method {kind.name!r} is for classification tasks; {spec.template!r} is {task.kind}")
    template, settings = kind.template_for(task)
    if template == spec.template and not settings:
        return task, settings
    changed = spec.model_copy(deep=True)
    changed.template = template
    changed.train.max_length += settings.get("demonstration_tokens", 0)
    return make_task(changed, backbone), settings


def _resumable(run: Path, resume: bool) -> Path | None:
    """The checkpoint folder to resume from (None: start afresh), after refusing what cannot be done."""
    found = find_checkpoint(run)
    if not resume and (found or (run / INFO_FILE).exists()):
        raise TaskError(f"{run} already holds a run: pass --resume to continue it, or choose another --out")
    if resume and found is None and (run / INFO_FILE).exists():
        raise TaskError(f"{run} is finished: there is nothing to resume")
    return found if resume else None


def _starting_point(
    run: Path, trainer: Method, identity: dict, found: Path | None, console: Console
) -> tuple[Checkpoint, bool]:
    """The checkpoint to continue (refused when the task, method or model changed), or a fresh start
    from the method's initial state; True when fresh. Creates the run folder."""
    if found is not None:
        checkpoint = load_checkpoint(found)
        _refuse_changed_resume(run, checkpoint.identity, identity)
        console.print(f"resuming {run} after step {checkpoint.state.step}")
        return checkpoint, False
    if run.exists() and any(run.iterdir()):
        console.print(f"{run} has no checkpoint yet: starting from the beginning")
    run.mkdir(parents=True, exist_ok=True)
    start = trainer.state()
    return Checkpoint(start, dict(start), {}, TrainState(train_seconds=trainer.fit_seconds), identity), True


def _saved_step(run: Path) -> int:
    found = find_checkpoint(run)
    return json.loads((found / "state.json").read_text())["state"]["step"] if found else 0


def _baselines(
    run: Path, task: Task, checkpoint: Checkpoint, log: Log, progress: Progress, console: Console, *,
    zero_shot: bool, dev: bool,
) -> None:
    """The step-0 scores the run does not hold yet: zero-shot prompting on the validation rows
    (unless `zero_shot` is False) and on the report rows when `dev`, while the model is still the
    base model (they choose nothing: they are only reported at the end), and the untrained method
    on the validation rows. A fresh run scores them all; a resumed one what its start left out (a
    search trial, started without baselines, continued into the final run)."""
    n = len(task.rows["validation"])
    state = checkpoint.state
    scored: dict[str, dict] = {}
    if zero_shot and "zero_shot" not in state.baseline:
        with _phase(progress, "zero-shot (validation rows)", n) as advance:
            scored["zero_shot"] = task.zero_shot("validation", advance)
    if dev and state.dev_zero_shot is None:
        with _phase(progress, "zero-shot (dev rows)", len(task.rows["dev"])) as advance, processes().folder(run) as folder:
            state.dev_zero_shot = task.dev_zero_shot(folder, advance)
    if "initial_prompt" not in state.baseline:
        with _phase(progress, "initial state (validation rows)", n) as advance:
            scored["initial_prompt"] = task.validate(advance)
        state.best = scored["initial_prompt"][task.spec.train.metric]
    state.baseline.update(scored)
    for name, result in scored.items():
        log.add(step=0, split="validation", variant=name, **result)
        console.print(f"{name.replace('_', ' ')} on {n} validation rows: {_describe(result)}")


def _loop(
    run: Path,
    task: Task,
    checkpoint: Checkpoint,
    trainer: Method,
    optimizer: torch.optim.Optimizer | None,
    *,
    steps: int,
    log: Log,
    progress: Progress,
    on_step: Callable[[int], None] | None,
    stop_after: int | None = None,
) -> None:
    settings, state = task.spec.train, checkpoint.state
    until = steps if stop_after is None else min(steps, stop_after)
    if optimizer is None or state.step >= until:
        return
    stream = micro_batches(task.lengths(), settings, state.step * settings.grad_accum)
    metric = settings.metric
    params = list(trainer.trainable().values())
    last = state.baseline.get("initial_prompt", {}).get(metric, float("nan"))
    bar = progress.add_task("training", total=until, completed=state.step, info=f"validation {metric} {last:.3f}")
    with processes().trained(params, task.loss) as module:  # its backward passes average the gradients
        while state.step < until and not state.stopped_early:
            started = time.perf_counter()
            for group in optimizer.param_groups:
                group["lr"] = lr_at(state.step, steps, settings) * group.get("scale", 1.0)
            optimizer.zero_grad(set_to_none=True)
            loss_sum, seen = _accumulate(task, module, stream, settings.grad_accum)
            if settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
            optimizer.step()
            state.step += 1
            state.examples += seen
            state.train_seconds += time.perf_counter() - started
            log.add(step=state.step, loss=loss_sum, lr=optimizer.param_groups[0]["lr"])
            best_changed, validated = False, state.step % settings.eval_every == 0 or state.step in (steps, until)
            if validated:
                with _phase(progress, "validating", len(task.rows["validation"])) as advance:
                    result = task.validate(advance)
                log.add(step=state.step, split="validation", **result)
                last = result[metric]
                best_changed = _judge(state, result[metric], settings.patience)
            committed = time.perf_counter()
            save = trainer.checkpoint_every_step or validated
            _commit(run, checkpoint, trainer, optimizer, best_changed, save)
            state.train_seconds += time.perf_counter() - committed  # checkpointing is part of training's cost
            progress.update(bar, completed=state.step, info=f"loss {loss_sum:.3f}  validation {metric} {last:.3f}")
            if on_step is not None:
                on_step(state.step)
    if state.stopped_early:
        progress.console.print(f"early stop at step {state.step}: no gain in {settings.patience} validations")


def _accumulate(task: Task, module: torch.nn.Module, stream: Iterator[list[int]], accum: int) -> tuple[float, int]:
    """One step's gradients from `accum` micro-batches: each process runs its share of each, its
    loss weighted so that the average over the processes is the batch's mean, and the gradients
    are averaged across the processes at the last one. Returns the step's loss (the mean over all
    rows, as one process computes it) and the rows it read."""
    procs = processes()
    loss_sum, seen = 0.0, 0
    for micro in range(accum):
        batch = next(stream)
        mine = procs.share(batch)
        with procs.accumulating(module, sync=micro == accum - 1):
            loss = module(mine) * procs.weight(task.loss_terms, mine, batch) / accum
            procs.backward(loss)
        loss_sum += float(loss.detach())
        seen += len(batch)
    return procs.mean(loss_sum), seen


def _judge(state: TrainState, score: float, patience: int) -> bool:
    """Record a validation score; True when it is the best so far (the prompt to keep)."""
    if score > state.best:
        state.best, state.best_step, state.bad_evals = score, state.step, 0
        return True
    state.bad_evals += 1
    state.stopped_early = state.bad_evals >= patience
    return False


def _commit(
    run: Path,
    checkpoint: Checkpoint,
    trainer: Method,
    optimizer: torch.optim.Optimizer | None,
    best_changed: bool,
    save: bool,
) -> None:
    """The step is done: checkpoint first (the truth), then the kept artifact beside it. A step
    that is not saved (a whole model between validations) is redone on resume."""
    if best_changed:
        checkpoint.best = trainer.state()
    if not processes().is_main:
        return  # the others keep the best state (they score it at the end) and write nothing
    if save:
        checkpoint.params = trainer.state()
        checkpoint.optimizer = optimizer.state_dict() if optimizer is not None else {}
        save_checkpoint(run, checkpoint)
    if best_changed:
        checkpoint.state.saved_parameters = trainer.write(run)


def _calibrate(task: Task, state: TrainState, progress: Progress) -> tuple[dict, dict]:
    """`train.calibrate` on the kept state (classification; calibration.choose decides). Returns
    the method settings it sets (the prior) and the validation score it measured."""
    setting, metric = task.spec.train.calibrate, task.spec.train.metric
    if task.kind != "classification":
        return {}, {}

    def score(calibrated) -> float:
        with _phase(progress, "calibration (validation rows)", len(task.rows["validation"])) as advance:
            return task.score(calibrated, "validation", advance)[metric]

    task.model, recorded, measured = calibration.choose(task.model, setting, state.best, score)
    if measured is None:
        return recorded, {}
    progress.console.print(
        f"calibration: validation {metric} {measured:.3f} calibrated, {state.best:.3f} as is: "
        + ("kept" if recorded else "not kept")
    )
    return recorded, {"calibrated": {metric: measured}}


def _fallback(state: TrainState, trainer: Method, metric: str, calibrated: dict) -> dict:
    """{"fell_back": ...} when the run keeps the template alone: training's kept state (calibrated
    where calibration was kept) scored under zero-shot prompting on the validation rows, so a run
    never leaves a user worse off there than no training. Empty otherwise; for methods that change
    the model's weights (lora, full: without label vectors their step 0 is the template alone, a
    candidate; with them, falling back would need the unchanged weights back); for those that take
    no gradient steps (linear-probe's fit among them); and when zero-shot was not scored
    (--no-zero-shot)."""
    zero = state.baseline.get("zero_shot", {}).get(metric)
    kept = calibrated.get("calibrated", {}).get(metric, state.best)
    if zero is None or not trainer.trains or trainer.changes_base or kept >= zero:
        return {}
    return {"fell_back": {"trained": {metric: kept}, "trained_step": state.best_step, "zero_shot": {metric: zero}}}


def _kept_score(state: TrainState, fallback: dict, metric: str) -> float:
    """The validation score of what the run keeps: its best state's, or zero-shot's after a fallback."""
    return fallback["fell_back"]["zero_shot"][metric] if fallback else state.best


def _describe(result: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())


def _warn_task(task: Task, backbone: Backbone, console: Console, trains: bool) -> None:
    """The task doctor's cheap checks (cut inputs and answers among them), each with its fix."""
    for finding in diagnose(task, backbone, zero_shot=False, trains=trains):
        console.print(finding.console_line(), highlight=False, soft_wrap=True)


def _finish(
    run: Path,
    task: Task,
    checkpoint: Checkpoint,
    trainer: Method,
    *,
    settings: dict,
    log: Log,
    progress: Progress,
    report: bool,
) -> RunInfo:
    """Score the kept state on the report rows (unless `report` is False); write task.json and figures."""
    state, spec = checkpoint.state, task.spec
    trainer.load_state(checkpoint.best)
    task.use_method(trainer)
    calibrated, check = _calibrate(task, state, progress) if trainer.trains else ({}, {})
    fallback = _fallback(state, trainer, spec.train.metric, check if calibrated else {})
    if fallback:
        task.model, calibrated = task.model.with_prompt(None), {}  # the template alone, as zero-shot scored it
        if processes().is_main:
            for name in trainer.artifact_files():  # the trained state's files (prompt, prefix, label vectors)
                (run / name).unlink(missing_ok=True)
    results: dict = {}
    scored = time.perf_counter()
    if report:
        with _phase(progress, "scoring dev rows (kept state)", len(task.rows["dev"])) as advance, processes().folder(run) as folder:
            results = task.final(folder, advance)
        if state.dev_zero_shot is not None:
            results["dev_zero_shot"] = state.dev_zero_shot
    eval_seconds = time.perf_counter() - scored
    info = RunInfo(
        kind=task.kind,
        method="zero-shot" if fallback else trainer.name,
        method_settings={**settings, **calibrated, **({"fell_back_from": trainer.name} if fallback else trainer.info())},
        label_scores=spec.label_scores,
        label_vectors=not fallback and (trainer.label_rows is not None or trainer.label_head is not None),
        model=model_name(trainer.backbone.spec),  # the model trained on, by name (not `default`: the default may change)
        fingerprint=checkpoint.identity["model_fingerprint"],  # the model the run started from
        template=task.template.without_soft().source() if fallback else spec.template,
        columns=spec.data.columns,
        soft_tokens=0 if fallback else task.template.soft_tokens,
        max_length=spec.train.max_length,
        init=str(spec.init),
        training=spec.train.model_dump(),
        **task.describe(),
    )
    info.metrics = {
        **results,
        "validation": {**state.baseline, "kept": {spec.train.metric: _kept_score(state, fallback, spec.train.metric)}, **check, **fallback},
        "best_step": state.best_step,
        "steps": state.step,
        "stopped_early": state.stopped_early,
        "train_seconds": round(state.train_seconds, 2),
        "train_examples": state.examples,
        "train_examples_per_s": round(state.examples / max(state.train_seconds, 1e-9), 2),
        "processes": processes().count,  # that trained it (each its share of every batch)
        "eval_examples_per_s": round(len(task.rows["dev"]) / eval_seconds, 2) if report else None,
        "trainable_parameters": sum(p.numel() for p in trainer.trainable().values()),
        "saved_parameters": 0 if fallback else state.saved_parameters,  # the kept artifact is on disk since its step
        "rows": {role: len(getattr(task.splits, role)) for role in ("train", "validation", "dev")},
        "cut_rows": {role: summary.rows for role, summary in task.cuts()},
    }
    if processes().is_main:
        info.write(run)
        plots.learning_curve(log.history, spec.train.metric, run / "learning_curve.png")
        shutil.rmtree(run / CHECKPOINT, ignore_errors=True)
    return info
