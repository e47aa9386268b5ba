"""`softprompt train --auto`: pick the recipe on the validation rows, within a time budget.

The search is coordinate ascent over a few choices that decide most of prompt tuning's result:
the learning rate, the init, learned label vectors, the method (plain or residual) and the prompt
length. Each stage tries the alternatives of one choice with the others at their best so far.

A trial is the start of the final run itself: the same schedule, stopped early (a compressed
schedule decays faster and favoured rates that then diverged over the full run: measured on the
Portuguese example, README). Within a stage the trials race by successive halving: every new
candidate trains the first half of a trial (an eighth of the run), the better half of the stage's
candidates (the best so far counted among them, at no cost: it has gone further already) goes on to
a full trial (a quarter of the run, at least 30 steps), and the best there wins the stage. A change
must beat the recipe it would replace (the best so far; at the first stage the task file's own) by
more than a standard error of that recipe's validation score: on a few dozen validation rows a
one-row lead is noise. Ties keep the earlier candidate. A trial's score is its best validation
score so far; contextual calibration is checked once, on the final run. The trials of a search
share the loaded model and one read-and-encoded task (train.TaskCache), and the winning trial is
continued into the final run rather than trained again, so its steps are never paid twice.
task.json records what was tried, how far, and why the winner won.

The budget covers the trials and the final run together. Before anything runs, two training
steps and a few validation rows are timed; a budget that cannot hold the final run and the first
stage is refused up front with the time the task needs. A stage that would not fit is skipped.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console

from .backbone import Backbone
from .methods import DEFAULT_METHOD, METHODS, method_class
from .run import RunInfo
from .taskfile import GENERATION_METRICS, TaskSpec

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

    def race_s(self, new: int, pool: int, half_steps: int, trial_steps: int, eval_every: int) -> float:
        """A stage's seconds: `new` candidates train `half_steps`, then at most half the `pool` goes on
        to `trial_steps`."""
        return new * self.run_s(0, half_steps, eval_every) + math.ceil(pool / 2) * self.run_s(half_steps, trial_steps, eval_every)

    def run_s(self, start: int, end: int, eval_every: int, *, finish: bool = False, report: bool = False,
              zero_shot: bool = False) -> float:
        """Steps `start`+1 to `end` with their validations (step 0's too when starting, the stop's);
        `finish`: and the end of a run (the calibration check, zero-shot, the report rows)."""
        passes = end // eval_every - start // eval_every + 1 + int(start == 0)
        passes += (1 + int(zero_shot)) if finish else 0
        rows = passes * self.validation_rows
        rows += self.report_rows * (1 + int(zero_shot)) if finish and report else 0
        return self.scale * ((end - start) * self.step_s + rows * self.row_s)


@dataclass
class Trial:
    """One candidate recipe, trained as far as the race took it, in a folder of its own."""

    stage: str
    recipe: Recipe
    folder: Path
    scores: dict[int, float] = field(default_factory=dict)  # steps trained -> best validation score up to there
    seconds: float = 0.0
    done: bool = False  # stopped early or at the end of its schedule: going further changes nothing

    def score(self, steps: int) -> float:
        """Best validation score within its first `steps` steps (all it has, when it stopped sooner)."""
        reached = [s for s in self.scores if s <= steps]
        return self.scores[max(reached)]

    def record(self) -> dict:
        steps = max(self.scores)
        return {"stage": self.stage, "recipe": self.recipe.describe(), "steps": steps,
                "validation": round(self.scores[steps], 4),
                "validation_by_steps": {str(k): round(v, 4) for k, v in sorted(self.scores.items())},
                "seconds": round(self.seconds, 1)}


@dataclass
class Search:
    """What was tried, in order, and the best recipe so far (its trial is the one to continue)."""

    trials: list[Trial] = field(default_factory=list)
    best: Trial | None = None
    skipped: list[str] = field(default_factory=list)

    def measured(self) -> set[str]:
        return {t.recipe.describe() for t in self.trials}

    def record(self, start: Recipe, trial_steps: int) -> dict:
        if self.best is None:
            return {"tried": [], "skipped": self.skipped, "chosen": start.describe(),
                    "why": "every stage would have passed the budget: the task's own recipe"}
        return {
            "tried": [t.record() for t in self.trials],
            "skipped": self.skipped,
            "chosen": self.best.recipe.describe(),
            "why": f"best validation score at {trial_steps} steps ({self.best.score(trial_steps):.4f}) of the trials "
                   "that got that far, a change counted only where it beat the recipe it replaced by more than a standard "
                   "error of that recipe's score; ties keep the earlier candidate; the final run continued its trial",
        }


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


@dataclass
class Schedule:
    """The final run's length, a trial's and its first half's, the final run's expected seconds
    from a full trial on, and the budget they share."""

    steps: int
    trial_steps: int
    half_steps: int
    final_s: float
    budget_s: float
    began: float = field(default_factory=time.perf_counter)

    def left(self) -> float:
        return self.budget_s - (time.perf_counter() - self.began)


@dataclass
class _Context:
    """What every stage of one search uses."""

    spec: TaskSpec
    backbone: Backbone
    console: Console
    start: Recipe
    search: Search
    costs: Costs
    schedule: Schedule
    trials_dir: Path
    tasks: object  # train.TaskCache (imported late: train imports what this module builds on)

    def run_spec(self, recipe: Recipe) -> TaskSpec:
        """The spec of the run `recipe` makes: a trial and the final run it is continued into share
        it exactly (a resume refuses any difference)."""
        return variant(self.spec, recipe, self.schedule.steps, self.spec.train.eval_every)


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
    from .train import TaskCache, train  # local import: train imports what this module builds on

    start = Recipe(method, spec.train.lr, str(spec.init), spec.label_vectors, None)
    stages = plan_stages(spec, start, fixed)
    if not stages:
        raise AutoError("--auto has nothing left to search: every choice it makes is fixed by the flags or the task")
    tasks = TaskCache()
    costs, train_rows = probe(spec, backbone, start, tasks)
    schedule = plan_schedule(spec, costs, train_rows, DEFAULT_BUDGET_S if budget_s is None else budget_s,
                             first_stage=len(stages[0][1]), report=report, baselines=baselines)
    console.print(
        f"auto: trials of {schedule.half_steps} steps, the better half going on to {schedule.trial_steps}; the final "
        f"run of {schedule.steps} continues the winner, about {minutes(schedule.final_s)} more; budget {minutes(schedule.budget_s)}"
    )
    trials_dir = out.parent / f".{out.name}.auto-trials"
    shutil.rmtree(trials_dir, ignore_errors=True)
    context = _Context(spec, backbone, console, start, Search(), costs, schedule, trials_dir, tasks)
    try:
        for name, candidates in stages:
            _run_stage(name, candidates, context)
        best = context.search.best
        chosen = best.recipe if best else start
        if best is not None:  # the winning trial goes on to be the final run
            if out.is_dir() and not any(out.iterdir()):
                out.rmdir()
            out.parent.mkdir(parents=True, exist_ok=True)
            best.folder.rename(out)
            console.print(f"auto: chose {best.recipe.describe()} (validation {best.score(schedule.trial_steps):.3f}); "
                          f"continuing its trial to {schedule.steps} steps")
        else:
            console.print(f"auto: every stage passed the budget; training {start.describe()} for {schedule.steps} steps")
        info = train(context.run_spec(chosen), out, backbone, console=console, method=chosen.method, baselines=baselines, report=report,
                     resume=best is not None, tasks=tasks)
    finally:
        shutil.rmtree(trials_dir, ignore_errors=True)
    info.auto = {**context.search.record(start, schedule.trial_steps),
                 "seconds": round(time.perf_counter() - schedule.began, 1), "budget_s": schedule.budget_s}
    info.write(out)
    return info


def plan_schedule(
    spec: TaskSpec, costs: Costs, train_rows: int, budget_s: float, *, first_stage: int, report: bool, baselines: bool
) -> Schedule:
    """A trial is the first quarter of the final run (at least 30 steps), its first half an eighth;
    refused when the final run and the first stage's `first_stage` candidates would not fit the budget."""
    from .train import total_steps

    steps = total_steps(spec.train, train_rows)
    trial_steps = max(min(steps, 30), steps // 4)
    half_steps = max(1, trial_steps // 2)
    e = spec.train.eval_every
    final_s = costs.run_s(trial_steps, steps, e, finish=True, report=report, zero_shot=baselines)
    first_s = costs.race_s(first_stage, first_stage, half_steps, trial_steps, e)
    need = final_s + first_s
    if need > budget_s:
        raise AutoError(
            f"--budget {minutes(budget_s)} is too small for this task: the final run takes about {minutes(final_s)} "
            f"and the first search stage ({first_stage} candidates) about {minutes(first_s)}; give --budget "
            f"{int(need // 60) + 1}m or more, or train without --auto"
        )
    return Schedule(steps, trial_steps, half_steps, final_s, budget_s)


def _run_stage(name: str, candidates: list[dict], context: _Context) -> None:
    """One stage's race (its recipes built on the best so far, less those measured), or nothing
    when it and the final run would pass the budget."""
    search, schedule = context.search, context.schedule
    incumbent = search.best
    base = incumbent.recipe if incumbent else context.start
    measured = search.measured()
    recipes = [r for r in dict.fromkeys(_apply(base, c) for c in candidates) if r.describe() not in measured]
    if not recipes:
        return
    pool_size = len(recipes) + int(incumbent is not None)
    stage_s = context.costs.race_s(len(recipes), pool_size, schedule.half_steps, schedule.trial_steps, context.spec.train.eval_every)
    if stage_s + schedule.final_s * context.costs.scale > schedule.left():
        search.skipped.append(name)
        context.console.print(f"auto: skipped {name}: its {len(recipes)} trials (about {minutes(stage_s)}) would pass the budget")
        return
    new = []
    for recipe in recipes:
        trial = Trial(name, recipe, context.trials_dir / f"trial{len(search.trials) + 1}")
        search.trials.append(trial)
        new.append(trial)
        _advance(trial, schedule.half_steps, context)
    pool = ([incumbent] if incumbent else []) + new
    held = pool[0]  # the recipe a change would replace: the best so far, or the task's own at the first stage
    going_on = _ranked(pool, held, schedule.half_steps, context)[: math.ceil(len(pool) / 2)]
    for trial in new:
        if trial in going_on:
            _advance(trial, schedule.trial_steps, context)
    contenders = [t for t in pool if t in going_on or t is incumbent]  # the best so far has its full trial already
    search.best = _ranked(contenders, held, schedule.trial_steps, context)[0]
    for trial in pool:
        if trial is not search.best:
            shutil.rmtree(trial.folder, ignore_errors=True)  # it will not be continued


def _ranked(trials: list[Trial], held: Trial, steps: int, context: _Context) -> list[Trial]:
    """`trials` best first by their score at `steps`, where a change must beat the recipe it would
    replace (`held`) by more than the validation's noise: the others are ranked a standard error
    lower (binomial, at the held recipe's score, on the validation rows). On the Portuguese example's
    36 validation rows that is about 8 points at 65%: a one-row lead at 15 steps had sent the task's
    own recipe (86.7% on dev) out of the race for one that ended at 80.0% (README). The sort is
    stable: the earlier first among equals."""
    scale = 100.0 if context.spec.train.metric in GENERATION_METRICS else 1.0  # generation metrics are 0-100
    share = min(max(held.score(steps) / scale, 0.0), 1.0)
    noise = scale * math.sqrt(share * (1 - share) / max(1, context.costs.validation_rows))
    return sorted(trials, key=lambda t: -(t.score(steps) - (0.0 if t is held else noise)))


def _advance(trial: Trial, until: int, context: _Context) -> None:
    """Train `trial` to step `until` (continuing its folder), record its score there, say so."""
    from .train import train_prefix

    if trial.done or until in trial.scores:
        return
    spec, schedule, costs = context.spec, context.schedule, context.costs
    start = max(trial.scores, default=0)
    expected = costs.run_s(start, until, spec.train.eval_every)
    began = time.perf_counter()
    with open(os.devnull, "w") as sink:
        state = train_prefix(
            context.run_spec(trial.recipe), trial.folder, context.backbone,
            until=until, console=Console(file=sink), method=trial.recipe.method, tasks=context.tasks,
        )
    took = time.perf_counter() - began
    trial.seconds += took
    trial.scores[until] = state.best
    trial.done = state.stopped_early or state.step >= schedule.steps
    costs.scale = 0.5 * costs.scale + 0.5 * costs.scale * took / max(expected, 1e-9)  # measured / probed
    best = context.search.best
    context.console.print(
        f"auto: trial {context.search.trials.index(trial) + 1} ({trial.stage}) {trial.recipe.describe()}: validation "
        f"{spec.train.metric} {state.best:.3f} at step {state.step} in {minutes(took)}"
        + (f"; best so far {best.score(until):.3f} there" if best is not None and best is not trial else "")
        + f"; at most {minutes(max(schedule.left(), 0))} of the budget left"
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


def probe(spec: TaskSpec, backbone: Backbone, recipe: Recipe, tasks) -> tuple[Costs, int]:
    """Time two training steps and a few validation rows of the task, for the estimates; also
    returns the number of training rows (for `epochs`). The task it builds goes into `tasks`
    (a train.TaskCache) for the trials."""
    kind = method_class(recipe.method)
    task, _ = tasks.get(variant(spec, recipe, PROBE_STEPS, PROBE_STEPS), kind, backbone)
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
            task.model.predict(task.model.encode([e.fields for e in rows]), spec.train.eval_batch_size)
    else:
        task.model.generate(task.encode(task.model, rows, False), task.decode, spec.train.eval_batch_size)
    row_s = (time.perf_counter() - began) / max(1, len(rows))
    return Costs(step_s, row_s, len(task.rows["validation"]), len(task.rows["dev"])), len(task.rows["train"])
