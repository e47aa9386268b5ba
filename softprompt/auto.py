"""`softprompt train --auto`: pick the recipe on the validation rows, within a time budget.

The search is coordinate ascent over a few choices that decide most of prompt tuning's result:
the learning rate, the init, learned label vectors, the method (plain or residual) and the prompt
length. Each stage tries the alternatives of one choice with the others at their best so far, on
short runs: the first quarter of the final run's own schedule, so the final run starts exactly as
the winning trial did (a compressed schedule decays faster and favoured rates that then diverged
over the full run: measured on the Portuguese example, README); a trial's score is its best validation score, calibrated or
not (every trial checks contextual calibration). Ties keep the earlier candidate, the task file's
own setting first. Then the winner is trained fully into the run folder, and task.json records
what was tried and why the winner won.

The budget covers the trials and the final run together. Before anything runs, two training
steps and a few validation rows are timed; a budget that cannot hold the final run and the first
stage is refused up front with the time the task needs. A stage that would not fit is skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from .backbone import Backbone
from .calibration import is_calibrated
from .methods import DEFAULT_METHOD, METHODS, method_class
from .run import RunInfo
from .taskfile import TaskSpec

DEFAULT_BUDGET_S = 20 * 60
PROBE_STEPS, PROBE_ROWS = 2, 16
SEARCHED_METHODS = tuple(name for name, m in METHODS.items() if m.searched_by_auto)
_SOFT = re.compile(r"\{soft:(\d+)\}")


class AutoError(ValueError):
    """The search cannot run as asked (a budget too small, a method it does not search)."""


@dataclass(frozen=True)
class Recipe:
    method: str
    lr: float
    init: str
    label_vectors: bool
    soft: int | None  # soft tokens of the template's one {soft:N}; None: the template's as written

    def describe(self) -> str:
        parts = [self.method, f"lr {self.lr:g}", f"init {self.init}"]
        parts += ["learned label vectors"] if self.label_vectors else []
        parts += [f"{self.soft} soft tokens"] if self.soft is not None else []
        return ", ".join(parts)


@dataclass
class Costs:
    """Seconds per training step and per validation row, and the rows a run scores."""

    step_s: float
    row_s: float
    validation_rows: int
    report_rows: int
    scale: float = 1.0  # measured trial time / estimated, updated as trials finish

    def run_s(self, steps: int, eval_every: int, report: bool, zero_shot: bool) -> float:
        passes = steps // eval_every + 2 + int(zero_shot)  # + step 0 and the calibration check
        rows = passes * self.validation_rows + (self.report_rows * (1 + int(zero_shot)) if report else 0)
        return self.scale * (steps * self.step_s + rows * self.row_s)


@dataclass
class Search:
    """What was tried, in order, with the validation score each trial reached."""

    trials: list[dict] = field(default_factory=list)
    measured: set[str] = field(default_factory=set)
    best: Recipe | None = None
    best_score: float = float("-inf")
    skipped: list[str] = field(default_factory=list)

    def add(self, stage: str, recipe: Recipe, score: float, calibrated: bool, seconds: float) -> None:
        self.measured.add(recipe.describe())
        self.trials.append({
            "stage": stage, "recipe": recipe.describe(), "validation": round(score, 4),
            "calibrated": calibrated, "seconds": round(seconds, 1),
        })
        if score > self.best_score:  # a tie keeps the earlier candidate
            self.best, self.best_score = recipe, score

    def record(self, start: Recipe) -> dict:
        if self.best is None:
            return {"tried": [], "skipped": self.skipped, "chosen": start.describe(),
                    "why": "every stage would have passed the budget: the task's own recipe"}
        return {
            "tried": self.trials,
            "skipped": self.skipped,
            "chosen": self.best.describe(),
            "why": f"best validation score of the trials ({self.best_score:.4f}); ties keep the earlier candidate",
        }


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


@dataclass
class Schedule:
    """The final run's and a trial's length and expected seconds, and the budget they share."""

    steps: int
    trial_steps: int
    final_s: float
    trial_s: float
    budget_s: float
    began: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.began)


def run_auto(
    spec: TaskSpec,
    out: Path,
    backbone: Backbone,
    console: Console,
    budget_s: float | None = None,
    fixed: frozenset[str] = frozenset(),
    *,
    baselines: bool = True,
    method: str = DEFAULT_METHOD,
    report: bool = True,
) -> RunInfo:
    """Search the recipe (leaving the settings named in `fixed` as the task has them), then train
    the winner into `out`; returns its RunInfo, with the search in `auto`."""
    from .train import train  # local import: train imports what this module builds on

    start = Recipe(method, spec.train.lr, str(spec.init), spec.label_vectors, None)
    stages = plan_stages(spec, start, fixed)
    if not stages:
        raise AutoError("--auto has nothing left to search: every choice it makes is fixed by the flags or the task")
    costs, train_rows = probe(spec, backbone, start)
    schedule = plan_schedule(spec, costs, train_rows, DEFAULT_BUDGET_S if budget_s is None else budget_s,
                             first_stage=len(stages[0][1]), report=report, baselines=baselines)
    console.print(
        f"auto: a trial of {schedule.trial_steps} steps takes about {minutes(schedule.trial_s)}, the final run of "
        f"{schedule.steps} about {minutes(schedule.final_s)}; budget {minutes(schedule.budget_s)}"
    )
    search = Search()
    trials_dir = out.parent / f".{out.name}.auto-trials"
    shutil.rmtree(trials_dir, ignore_errors=True)
    try:
        for k, (name, candidates) in enumerate(stages):
            later = sum(len(c) for _, c in stages[k + 1 :])
            _run_stage(name, candidates, later, spec=spec, backbone=backbone, console=console, start=start,
                       search=search, costs=costs, schedule=schedule, trials_dir=trials_dir)
    finally:
        shutil.rmtree(trials_dir, ignore_errors=True)
    best = search.best or start
    console.print(f"auto: chose {best.describe()} (validation {search.best_score:.3f}); training it for {schedule.steps} steps")
    info = train(
        variant(spec, best, schedule.steps, spec.train.eval_every), out, backbone, console=console,
        method=best.method, baselines=baselines, report=report,
    )
    info.auto = {**search.record(start), "seconds": round(time.perf_counter() - schedule.began, 1), "budget_s": schedule.budget_s}
    info.write(out)
    return info


def plan_schedule(
    spec: TaskSpec, costs: Costs, train_rows: int, budget_s: float, *, first_stage: int, report: bool, baselines: bool
) -> Schedule:
    """Trials are the first quarter of the final run (at least 30 steps); refused when the final
    run and the first stage's `first_stage` trials would not fit the budget."""
    from .train import total_steps

    steps = total_steps(spec.train, train_rows)
    trial_steps = max(min(steps, 30), steps // 4)
    final_s = costs.run_s(steps, spec.train.eval_every, report, baselines)
    trial_s = costs.run_s(trial_steps, trial_steps, report=False, zero_shot=False)
    need = final_s + first_stage * trial_s
    if need > budget_s:
        raise AutoError(
            f"--budget {minutes(budget_s)} is too small for this task: the final run takes about {minutes(final_s)} "
            f"and the first search stage ({first_stage} trials) about {minutes(need - final_s)}; give --budget "
            f"{int(need // 60) + 1}m or more, or train without --auto"
        )
    return Schedule(steps, trial_steps, final_s, trial_s, budget_s)


def _run_stage(
    name: str, candidates: list[dict], later: int, *, spec: TaskSpec, backbone: Backbone, console: Console,
    start: Recipe, search: Search, costs: Costs, schedule: Schedule, trials_dir: Path,
) -> None:
    """One stage's trials (its recipes built on the best so far, less those measured), or none when
    they and the final run would pass the budget; `later`: trials of the stages after it."""
    from .train import train

    recipes = [_apply(search.best or start, changes) for changes in candidates]
    recipes = [r for r in dict.fromkeys(recipes) if r.describe() not in search.measured]
    stage_s = len(recipes) * schedule.trial_s * costs.scale
    if stage_s + schedule.final_s * costs.scale > schedule.left():
        search.skipped.append(name)
        console.print(f"auto: skipped {name}: its {len(recipes)} trials (about {minutes(stage_s)}) would pass the budget")
        return
    for j, recipe in enumerate(recipes):
        began_trial = time.perf_counter()
        with open(os.devnull, "w") as sink:
            info = train(
                variant(spec, recipe, schedule.steps, schedule.trial_steps), trials_dir / f"trial{len(search.trials) + 1}",
                backbone, console=Console(file=sink), method=recipe.method, baselines=False, report=False,
                stop_after=schedule.trial_steps,
            )
        took = time.perf_counter() - began_trial
        costs.scale = 0.5 * costs.scale + 0.5 * took / max(schedule.trial_s, 1e-9)  # measured / probed
        search.add(name, recipe, _score(info, spec.train.metric), is_calibrated(info), took)
        remaining = len(recipes) - j - 1 + later
        left = min((remaining * schedule.trial_s + schedule.final_s) * costs.scale, schedule.left())
        console.print(
            f"auto: trial {len(search.trials)} ({name}) {recipe.describe()}: validation {spec.train.metric} "
            f"{search.trials[-1]['validation']:.3f} in {minutes(took)}; best {search.best_score:.3f}; "
            f"at most {minutes(max(left, 0))} left"
        )


def plan_stages(spec: TaskSpec, start: Recipe, fixed: frozenset[str]) -> list[tuple[str, list[dict]]]:
    """The stages of the search, each a choice and its candidates, the task's own setting first
    (settings the user fixed left out)."""
    classification = spec.kind == "classification"
    lrs = [start.lr] + [lr for lr in method_class(start.method).lrs if lr != start.lr]
    inits = dict.fromkeys([start.init, "vocab", *(["labels"] if classification else []), "demos"])
    methods = [m for m in SEARCHED_METHODS if m != start.method]
    stages = [
        ("lr", [{"lr": lr} for lr in lrs]),
        ("init", [{"init": init} for init in inits]),
        ("label vectors", [{"label_vectors": v} for v in (start.label_vectors, not start.label_vectors)] if classification else []),
        ("method", [{"method": m, **({} if "lr" in fixed else {"lr": method_class(m).lr})} for m in methods] if "method" not in fixed else []),
    ]
    counts = [int(n) for n in _SOFT.findall(spec.template)]
    if len(counts) == 1 and counts[0] >= 2 and not start.init.startswith("from:"):  # a from:RUN prompt has its length
        stages.append(("prompt length", [{"soft": n} for n in (counts[0] // 2, counts[0] * 2)]))
    names = {"lr": "lr", "init": "init", "label vectors": "label_vectors", "method": "method", "prompt length": "soft"}
    return [(name, c) for name, c in stages if c and names[name] not in fixed]


def _apply(recipe: Recipe, changes: dict) -> Recipe:
    return Recipe(**{**recipe.__dict__, **changes})


def variant(spec: TaskSpec, recipe: Recipe, steps: int, eval_every: int) -> TaskSpec:
    """The task as `recipe` trains it, for `steps` steps."""
    changed = spec.model_copy(deep=True)
    changed.train.lr, changed.init, changed.label_vectors = recipe.lr, recipe.init, recipe.label_vectors
    changed.train.steps, changed.train.epochs = steps, None
    changed.train.eval_every = min(eval_every, steps)
    if recipe.soft is not None:
        changed.template = _SOFT.sub(f"{{soft:{recipe.soft}}}", changed.template)
    return changed


def _score(info: RunInfo, metric: str) -> float:
    """A trial's validation score: its kept state's, or the calibrated one where that is higher."""
    validation = info.metrics["validation"]
    return max(validation["kept"][metric], validation.get("calibrated", {}).get(metric, float("-inf")))


def probe(spec: TaskSpec, backbone: Backbone, recipe: Recipe) -> tuple[Costs, int]:
    """Time two training steps and a few validation rows of the task, for the estimates; also
    returns the number of training rows (for `epochs`)."""
    from .train import _task_for  # local import, as in run_auto

    kind = method_class(recipe.method)
    task, _ = _task_for(variant(spec, recipe, PROBE_STEPS, PROBE_STEPS), kind, backbone)
    method = kind.build(task, backbone)
    task.use_method(method)
    batch = list(range(min(spec.train.batch_size, len(task.rows["train"]))))
    began = time.perf_counter()
    for _ in range(PROBE_STEPS):
        task.loss(batch).backward()
    step_s = (time.perf_counter() - began) / PROBE_STEPS * spec.train.grad_accum
    rows = task.splits.validation[:PROBE_ROWS]
    began = time.perf_counter()
    if task.kind == "classification":
        with torch.no_grad():
            task.model.predict_proba(task.model.encode([e.fields for e in rows]), spec.train.eval_batch_size)
    else:
        task.model.generate(task.encode(task.model, rows, False), task.decode, spec.train.eval_batch_size)
    row_s = (time.perf_counter() - began) / max(1, len(rows))
    return Costs(step_s, row_s, len(task.rows["validation"]), len(task.rows["dev"])), len(task.rows["train"])
