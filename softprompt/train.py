"""Training a soft prompt: the loop, validation, early stopping, checkpoints, resume.

Only the soft prompt's vectors get gradients. Validation runs every `eval_every` steps; the best
prompt is written to the run folder as soon as it appears, so even an interrupted run leaves a
usable artifact. A checkpoint (prompt + optimizer state, safetensors + JSON) is written atomically
at each validation and on Ctrl-C; `resume=True` continues from it and, with the same seed, ends
where an uninterrupted run would.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import load_file, save_file

from . import plots
from .artifact import INFO_FILE, RunInfo
from .backbone import Backbone
from .prompt import SoftPrompt, init_prompt
from .task import TaskError, TaskSpec, TrainSettings
from .tasks import make_task, summarize

CHECKPOINT = "checkpoint"
METRICS_FILE = "metrics.jsonl"


# -- batches --------------------------------------------------------------------------------
def batch_plan(
    lengths: list[int], batch_size: int, seed: int, epoch: int, bucket: bool = True
) -> list[list[int]]:
    """One epoch of batches: shuffled, then (with `bucket`) sorted by length within windows of 32
    batches so each batch holds rows of similar length (little padding), then the batches shuffled again."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 32 if bucket else batch_size
    batches = []
    for start in range(0, len(order), window):
        part = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


def micro_batches(lengths: list[int], settings: TrainSettings, skip: int):
    """Endless stream of micro-batches across epochs, skipping the first `skip` (for resume)."""
    epoch, seen = 0, 0
    while True:
        for batch in batch_plan(
            lengths, settings.batch_size, settings.seed, epoch, settings.length_bucketing
        ):
            if seen >= skip:
                yield batch
            seen += 1
        epoch += 1


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


def make_optimizer(prompt: SoftPrompt, settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            prompt.parameters(),
            lr=settings.lr,
            scale_parameter=False,
            relative_step=False,
            warmup_init=False,
            weight_decay=settings.weight_decay,
        )
    return torch.optim.AdamW(prompt.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)


def total_steps(settings: TrainSettings, n_train: int) -> int:
    if settings.steps:
        return settings.steps
    per_epoch = math.ceil(n_train / settings.batch_size / settings.grad_accum)
    return max(1, math.ceil((settings.epochs or 1) * per_epoch))


# -- checkpoints ----------------------------------------------------------------------------
@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    micro: int = 0  # micro-batches consumed
    best: float = -1.0
    best_step: int = 0
    bad_evals: int = 0
    examples: int = 0
    train_seconds: float = 0.0
    baseline: dict = field(default_factory=dict)  # zero-shot and initial-prompt results


def save_checkpoint(
    run: Path, prompt: SoftPrompt, optimizer: torch.optim.Optimizer, state: TrainState
) -> None:
    """Write checkpoint/ atomically: build it beside, then swap it in with renames."""
    opt = optimizer.state_dict()
    tensors = {"prompt": prompt.vectors.detach().cpu().contiguous()}
    scalars = {}
    for key, value in opt["state"].get(0, {}).items():
        if torch.is_tensor(value):
            tensors[f"opt.{key}"] = value.detach().cpu().contiguous()
        else:
            scalars[key] = value
    tmp = run / f".{CHECKPOINT}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / "state.safetensors"))
    meta = {"state": asdict(state), "optimizer_scalars": scalars, "param_groups": opt["param_groups"]}
    (tmp / "state.json").write_text(json.dumps(meta))
    final, old = run / CHECKPOINT, run / f".{CHECKPOINT}.old"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(run: Path) -> tuple[torch.Tensor, dict, TrainState]:
    folder = run / CHECKPOINT
    if not folder.is_dir() and (run / f".{CHECKPOINT}.old").is_dir():
        folder = run / f".{CHECKPOINT}.old"  # crashed between the two renames
    if not folder.is_dir():
        raise TaskError(f"{run}: nothing to resume (no {CHECKPOINT}/ folder)")
    tensors = load_file(str(folder / "state.safetensors"))
    meta = json.loads((folder / "state.json").read_text())
    opt_state = {k[len("opt.") :]: v for k, v in tensors.items() if k.startswith("opt.")}
    opt_state.update(meta["optimizer_scalars"])
    optimizer = {"state": {0: opt_state} if opt_state else {}, "param_groups": meta["param_groups"]}
    return tensors["prompt"], optimizer, TrainState(**meta["state"])


# -- the loop -------------------------------------------------------------------------------
class Log:
    """Appends to metrics.jsonl and keeps the history in memory for the plots."""

    def __init__(self, run: Path, keep_until: int | None) -> None:
        self.path = run / METRICS_FILE
        self.history: list[dict] = []
        if keep_until is not None and self.path.exists():
            lines = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
            self.history = [h for h in lines if h["step"] <= keep_until]
        self.path.write_text("".join(json.dumps(h) + "\n" for h in self.history))

    def add(self, **entry) -> None:
        self.history.append(entry)
        with self.path.open("a") as out:
            out.write(json.dumps(entry) + "\n")


def train(
    spec: TaskSpec,
    out: str | Path,
    backbone: Backbone | None = None,
    resume: bool = False,
    console: Console | None = None,
    on_step: Callable[[int], None] | None = None,
) -> RunInfo:
    """Train a soft prompt for the task (classification or generation) and write the run folder `out`."""
    console = console or Console(stderr=True)
    run = Path(out)
    if not resume and ((run / INFO_FILE).exists() or (run / CHECKPOINT).exists()):
        raise TaskError(f"{run} already holds a run: pass --resume to continue it, or choose another --out")
    settings = spec.train
    if backbone is None:
        with console.status(f"loading model {spec.model} ..."):
            backbone = Backbone.load(spec.model)
        console.print(f"model {spec.model} loaded in {backbone.load_seconds:.1f}s")
    task = make_task(spec, backbone)  # reads and validates all data before anything is written
    for name, count in (
        ("train", task.train_rows.encoded.truncated),
        ("dev", task.dev_rows.encoded.truncated),
    ):
        if count:
            console.print(f"[yellow]{count} {name} rows were cut to fit {settings.max_length} tokens")

    state, opt_state = TrainState(), None
    if resume:
        vectors, opt_state, state = load_checkpoint(run)
        prompt = SoftPrompt(vectors)
        console.print(f"resuming {run} at step {state.step}")
    else:
        prompt = init_prompt(
            str(spec.init), task.template.soft_tokens, backbone, task.init_words, settings.seed
        )
    prompt = prompt.to(backbone.device)
    task.model.lm.prompt = prompt
    run.mkdir(parents=True, exist_ok=True)
    log = Log(run, state.step if resume else None)
    info = RunInfo(
        kind=task.kind,
        model=spec.model,
        fingerprint=backbone.fingerprint,
        template=spec.template,
        columns=spec.data.columns,
        soft_tokens=task.template.soft_tokens,
        max_length=settings.max_length,
        init=str(spec.init),
        training=settings.model_dump(),
        **task.describe(),
    )
    if not resume:
        state.baseline = {"zero_shot": task.zero_shot(), "initial_prompt": task.validate()}
        for name, result in state.baseline.items():
            log.add(step=0, split="dev", variant=name, **result)
            console.print(f"{name.replace('_', ' ')}: {_describe(result)}")
        state.best = state.baseline["initial_prompt"][settings.metric]
        prompt.save(run)

    optimizer = make_optimizer(prompt, settings)
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)
    steps = total_steps(settings, len(task.train_rows))
    stream = micro_batches(task.lengths(), settings, state.micro)
    last_eval = state.baseline.get("initial_prompt", {}).get(settings.metric, float("nan"))
    columns = [
        TextColumn("[bold]training"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        TextColumn("loss {task.fields[loss]:.3f}  dev {task.fields[metric]} {task.fields[dev]:.3f}"),
    ]
    stopped_early = False
    try:
        with Progress(*columns, console=console) as progress:
            bar = progress.add_task(
                "train",
                total=steps,
                completed=state.step,
                loss=float("nan"),
                dev=last_eval,
                metric=settings.metric,
            )
            while state.step < steps:
                started = time.perf_counter()
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(state.step, steps, settings)
                optimizer.zero_grad(set_to_none=True)
                loss_sum = 0.0
                for _ in range(settings.grad_accum):
                    index = next(stream)
                    loss = task.loss(index) / settings.grad_accum
                    loss.backward()
                    loss_sum += float(loss.detach())
                    state.micro += 1
                    state.examples += len(index)
                if settings.max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(prompt.parameters(), settings.max_grad_norm)
                optimizer.step()
                state.step += 1
                state.train_seconds += time.perf_counter() - started
                log.add(step=state.step, loss=loss_sum, lr=optimizer.param_groups[0]["lr"])
                progress.update(bar, completed=state.step, loss=loss_sum)
                if state.step % settings.eval_every == 0 or state.step == steps:
                    result = task.validate()
                    log.add(step=state.step, split="dev", **result)
                    progress.update(bar, dev=result[settings.metric])
                    if result[settings.metric] > state.best:
                        state.best, state.best_step, state.bad_evals = result[settings.metric], state.step, 0
                        prompt.save(run)
                    else:
                        state.bad_evals += 1
                    save_checkpoint(run, prompt, optimizer, state)
                    if state.bad_evals >= settings.patience:
                        stopped_early = True
                        console.print(
                            f"early stop at step {state.step}: no gain in {settings.patience} validations"
                        )
                        break
                if on_step is not None:
                    on_step(state.step)
    except KeyboardInterrupt:
        save_checkpoint(run, prompt, optimizer, state)
        console.print(f"[yellow]interrupted at step {state.step}; continue with --resume")
        raise
    return _finish(run, info, task, state, log, stopped_early, console)


def _describe(result: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in result.items())


def _finish(
    run: Path, info: RunInfo, task, state: TrainState, log: Log, stopped_early: bool, console: Console
) -> RunInfo:
    """Reload the best prompt, score it on the dev set, write figures and task.json."""
    task.model.lm.prompt = SoftPrompt.load(run).to(task.model.backbone.device)
    report = task.final(run)
    info.metrics = {
        **state.baseline,
        "dev": report,
        "best_step": state.best_step,
        "steps": state.step,
        "stopped_early": stopped_early,
        "train_seconds": round(state.train_seconds, 2),
        "train_examples_per_s": round(state.examples / max(state.train_seconds, 1e-9), 2),
        "truncated_dev_rows": task.dev_rows.encoded.truncated,
    }
    info.write(run)
    plots.learning_curve(log.history, task.spec.train.metric, run / "learning_curve.png")
    shutil.rmtree(run / CHECKPOINT, ignore_errors=True)
    console.print(f"best prompt from step {state.best_step}: {_describe(summarize(report))}; saved to {run}")
    return info
