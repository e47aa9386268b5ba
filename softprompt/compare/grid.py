"""The grid of `softprompt compare`: which cells to run, running them, resuming, the budget.

A cell is one training run (method, training-set size, seed, learning rate) in its own process, so
its peak memory is its own (`os.wait4`) and a method that changes the model's weights (lora, full)
cannot leak into the next cell. Every cell writes cells/ID.json when it finishes; a re-run skips
finished cells. The learning-rate search runs first, on one seed at the smallest training-set size,
and chooses on validation rows only; the final cells score the report rows (the test file), which
nothing ever chose on. A search cell runs the very command of the final cell of its seed, shots and
rate, so the search scores the report rows too (its record keeps only validation) and the final cell
at the chosen rate is that run, read back, not trained again. The budget counts the wall time of
every finished cell, earlier invocations included; a cell that would not fit is reported as over
budget, not dropped.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

from rich.console import Console

from ..data import open_source
from ..methods import DEFAULT_METHOD, METHODS
from ..run import write_atomic
from ..train import METRICS_FILE

LONG_CELL_S = 600  # cells expected to take longer than this are announced with their estimate


@dataclass(frozen=True)
class Cell:
    stage: str  # "search": chooses the learning rate; "final": reported
    method: str
    shots: str  # training rows per label ("16") or "all"
    seed: int
    lr: float | None  # None: nothing is trained

    @property
    def id(self) -> str:
        lr = f"-lr{self.lr:g}" if self.stage == "search" else ""
        return f"{self.stage}-{self.method}-{self.shots}-s{self.seed}{lr}"


@dataclass
class Plan:
    task: Path
    out: Path
    methods: list[str]
    shots: list[str]
    seeds: list[int]
    steps: int
    test: Path | None  # the report rows (default: the task's dev file)
    budget_s: float | None
    model: str | None = None
    lrs: dict[str, list[float]] | None = None  # per method; default: the method's own grid
    extra: tuple[str, ...] = ()  # further `softprompt train` flags for every cell
    jobs: int = 1  # cells run at once, each in its own process

    def grid(self, method: str) -> list[float]:
        return list((self.lrs or {}).get(method) or METHODS[method].lrs)


def parse_budget(text: str | None) -> float | None:
    """'90m', '2h', '3600s' or '3600' -> seconds."""
    if not text:
        return None
    match = re.fullmatch(r"\s*([\d.]+)\s*([smh]?)\s*", text)
    if not match:
        raise ValueError(f"--budget {text!r}: use seconds, or a number with s, m or h (e.g. 90m)")
    return float(match.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[match.group(2)]


class Runner:
    """Runs cells in child processes, remembers what finished, and keeps to the budget."""

    def __init__(self, plan: Plan, console: Console) -> None:
        self.plan, self.console = plan, console
        self.folder = plan.out / "cells"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.lock = threading.Lock()
        self.in_flight: dict[str, float] = {}  # running cells' estimated seconds

    def record(self, cell: Cell) -> dict | None:
        path = self.folder / f"{cell.id}.json"
        return json.loads(path.read_text()) if path.is_file() else None

    def spent(self) -> float:
        """Wall seconds of every finished cell, a final cell read from its search run counted once."""
        records = [json.loads(p.read_text()) for p in self.folder.glob("*.json")]
        return sum(r.get("wall_seconds", 0.0) for r in records if not r.get("reused"))

    def estimate(self, cell: Cell) -> float | None:
        """Seconds the cell will take: the mean of finished cells of its method (and stage), else
        prompt tuning's scaled by the method's `time_factor` (only to warn and keep to the budget)."""
        done = [json.loads(p.read_text()) for p in self.folder.glob("*.json")]
        done = [d for d in done if d.get("status") == "done"]
        for method, factor in ((cell.method, 1.0), (DEFAULT_METHOD, METHODS[cell.method].time_factor)):
            times = [d["wall_seconds"] for d in done if d["method"] == method and d["stage"] == cell.stage]
            if times:
                return factor * sum(times) / len(times)
        return None

    def run(self, cell: Cell, index: int, total: int) -> dict:
        """The cell's record: read back when it finished before, else run now (or over budget).
        Cells running beside it count against the budget by their estimates."""
        known = self.record(cell)
        if known is not None and known.get("status") == "done":
            return known
        if (reused := self._from_search(cell)) is not None:
            write_atomic(self.folder / f"{cell.id}.json", json.dumps(reused, indent=1))
            return reused
        estimate = self.estimate(cell)
        budget = self.plan.budget_s
        with self.lock:
            committed = self.spent() + sum(self.in_flight.values())
            if budget is not None and committed + (estimate or 0.0) > budget:
                return _stub(cell, "over_budget", f"the budget ({budget / 60:.0f} min) is spent")
            self.in_flight[cell.id] = estimate or 0.0
        guess = f", about {estimate / 60:.1f} min" if estimate else ""
        self.console.rule(f"[bold]cell {index}/{total}: {cell.method}, shots {cell.shots}, seed {cell.seed}" + (f", lr {cell.lr:g}" if cell.lr else "") + guess)
        if estimate and estimate > LONG_CELL_S:
            self.console.print(f"[yellow]warning:[/] {cell.method} trains {_what(cell.method)}: this cell will take about {estimate / 60:.0f} minutes")
        try:
            record = self._execute(cell)
            write_atomic(self.folder / f"{cell.id}.json", json.dumps(record, indent=1))
        finally:
            with self.lock:
                del self.in_flight[cell.id]
        if self.plan.jobs > 1:
            self.console.print(f"cell {cell.id}: {record['status']} in {record.get('wall_seconds', 0):.0f}s (output: {self._log(cell)})")
        return record

    def _from_search(self, cell: Cell) -> dict | None:
        """A final cell's record read from the search cell that ran its command (same method, shots,
        seed and rate), or None where there is none (other seeds, a search run before searches
        scored the report rows)."""
        if cell.stage != "final" or cell.lr is None:
            return None
        search = replace(cell, stage="search")
        record, run = self.record(search), self.folder / search.id
        if record is None or record.get("status") != "done" or not (run / "task.json").is_file():
            return None
        final = _from_run(cell, run, record["wall_seconds"], record["peak_rss_mb"])
        return None if final["test"] is None else {**final, "reused": search.id}

    def _execute(self, cell: Cell) -> dict:
        run = self.folder / cell.id
        if run.exists():  # an interrupted cell starts again from scratch (its own run resumes nothing)
            shutil.rmtree(run)
        command = self._command(cell, run)
        started = time.perf_counter()
        child = self._start(command, cell)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - started
        if child.returncode != 0:
            if child.returncode in (-2, 130):
                raise KeyboardInterrupt
            return {**_stub(cell, "failed", f"`{shlex.join(command)}` exited with {child.returncode}"), "wall_seconds": wall}
        return _from_run(cell, run, wall, usage.ru_maxrss / 1024)

    def _start(self, command: list[str], cell: Cell) -> subprocess.Popen:
        """One job: the child writes to this terminal. Several: each writes to its own log, and
        gets an equal share of the cores (torch would otherwise start a thread per core in each)."""
        if self.plan.jobs == 1:
            return subprocess.Popen(command)
        threads = str(max(1, (os.cpu_count() or 1) // self.plan.jobs))
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads}
        with self._log(cell).open("w") as log:
            return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)

    def _log(self, cell: Cell) -> Path:
        return self.folder / f"{cell.id}.log"

    def _command(self, cell: Cell, run: Path) -> list[str]:
        plan = self.plan
        command = [sys.executable, "-m", "softprompt.cli", "train", str(plan.task), "--out", str(run)]
        command += ["--method", cell.method, "--seed", str(cell.seed), "--steps", str(plan.steps), "--no-zero-shot"]
        if cell.lr is not None:
            command += ["--lr", f"{cell.lr:g}"]
        if cell.shots != "all":
            command += ["--shots", cell.shots]
        if plan.model:
            command += ["--model", plan.model]
        if plan.test is not None:  # the search too: its run is the final cell at the rate it wins with
            command += ["--dev", str(plan.test)]
        return command + list(plan.extra)


def _what(method: str) -> str:
    return METHODS[method].summary


def _stub(cell: Cell, status: str, error: str | None) -> dict:
    return {
        "id": cell.id, "stage": cell.stage, "method": cell.method, "shots": cell.shots, "seed": cell.seed,
        "lr": cell.lr, "status": status, "error": error, "wall_seconds": 0.0, "curve": [],
        "base_unchanged": not METHODS[cell.method].changes_base,
    }


def _from_run(cell: Cell, run: Path, wall: float, peak_mb: float) -> dict:
    """A finished cell's record, from its run folder."""
    info = json.loads((run / "task.json").read_text())
    metrics = info["metrics"]
    metric = info["training"]["metric"]
    test = metrics.get("dev") if cell.stage == "final" else None  # a search's report rows wait for its final cell
    if test is not None:
        test = {k: v for k, v in test.items() if k not in ("per_class", "rows")}
    return {
        **_stub(cell, "done", None),
        "metric": metric,
        "validation": metrics["validation"]["kept"][metric],
        "test": test,
        "trainable_params": metrics["trainable_parameters"],
        "saved_params": metrics["saved_parameters"],
        "artifact_bytes": sum((run / f).stat().st_size for f in METHODS[cell.method].artifact_files() if (run / f).is_file()),
        "train_seconds": metrics["train_seconds"],
        "train_examples_per_s": metrics["train_examples_per_s"] if metrics["steps"] else None,
        "eval_examples_per_s": metrics.get("eval_examples_per_s"),
        "peak_rss_mb": round(peak_mb, 1),
        "steps": metrics["steps"],
        "best_step": metrics["best_step"],
        "train_rows": metrics["rows"]["train"],
        "examples_seen": metrics.get("train_examples", 0),
        "wall_seconds": round(wall, 1),
        "curve": validation_curve(run, metric),
        "note": _note(info),
        "run": str(run),
    }


def validation_curve(run: Path, metric: str) -> list[dict]:
    """The run's validation metric by step (step 0: the untrained method)."""
    curve = []
    for line in (run / METRICS_FILE).read_text().splitlines():
        entry = json.loads(line)
        if entry.get("split") == "validation" and entry.get("variant") in (None, "initial_prompt"):
            curve.append({"step": entry["step"], "value": entry[metric]})
    return curve


def _note(info: dict) -> str | None:
    """What the cell's method says it chose (few-shot's demonstrations, the probe's pooling)."""
    return METHODS[info["method"]].note(info.get("method_settings") or {})


def search_cells(plan: Plan) -> list[Cell]:
    """Every trained method at each of its learning rates, first seed, smallest training set. A
    method given one rate (`--lrs prompt=0.03`) has nothing to choose: it is not searched."""
    shots, seed = plan.shots[0], plan.seeds[0]
    searched = [m for m in plan.methods if METHODS[m].trains and len(plan.grid(m)) > 1]
    return [Cell("search", m, shots, seed, lr) for m in searched for lr in plan.grid(m)]


def choose_lr(method: str, records: list[dict]) -> float | None:
    """The search's choice: the best validation score; ties go to the rate listed first."""
    done = [r for r in records if r["method"] == method and r["status"] == "done"]
    if not done:
        return None
    return max(done, key=lambda r: r["validation"])["lr"]


def final_cells(plan: Plan, chosen: dict[str, float | None]) -> list[Cell]:
    """The reported cells, seeds outermost (a budget that runs out cuts later seeds rather than
    whole methods). Untrained methods that depend on neither training rows nor seed run once."""
    cells: list[Cell] = []
    for seed in plan.seeds:
        for shots in plan.shots:
            for method in plan.methods:
                kind = METHODS[method]
                if not kind.uses_training_rows and (seed, shots) != (plan.seeds[0], plan.shots[0]):
                    continue
                lr = (chosen.get(method) or kind.lr) if kind.trains else None  # not searched: the default
                cells.append(Cell("final", method, shots, seed, lr))
    return cells


def run_compare(plan: Plan, console: Console) -> tuple[list[dict], dict]:
    """Run (or resume) the whole grid; returns every cell's record and the report's meta."""
    from ..taskfile import load_task

    spec = load_task(plan.task)  # refuses a bad task file before any cell starts
    kind = spec.kind
    skipped = [m for m in plan.methods if METHODS[m].classification_only and kind != "classification"]
    plan.methods = [m for m in plan.methods if m not in skipped]
    started = time.perf_counter()
    runner = Runner(plan, console)
    records, chosen = Schedule(plan, runner, console).run()
    records += _shared_baselines(records, plan)
    notes = [f"{m} is for classification tasks: not run on this {kind} task" for m in skipped]
    notes += [f"every cell ran `softprompt train` with {flag}" for flag in plan.extra]
    notes += [f"{m}: the learning-rate search did not finish; the final cells used the default {METHODS[m].lr:g}" for m, lr in chosen.items() if lr is None]
    notes += [f"{r['method']}, shots {r['shots']}, seed {r['seed']}: the final cell is search cell {r['reused']} read back (the same command; its report rows chose nothing)" for r in records if r.get("reused")]
    meta = {
        "task": str(plan.task),
        "model": plan.model or spec.model,
        "kind": kind,
        "metric": spec.train.metric,
        "methods": plan.methods,
        "shots": plan.shots,
        "seeds": plan.seeds,
        "steps": plan.steps,
        "batch_size": spec.train.batch_size,
        "report_rows": _rows_text(plan.test or spec.path(spec.data.dev) if (plan.test or spec.data.dev) else None, _report_limit(plan, spec)),
        "validation_rows": _validation_text(spec),
        "budget_seconds": plan.budget_s,
        "wall_seconds": round(runner.spent(), 1),
        "this_run_seconds": round(time.perf_counter() - started, 1),
        "jobs": plan.jobs,
        "notes": notes,
        "chosen_lr": chosen,
    }
    return records, meta


class Schedule:
    """The grid's cells in the order they are wanted (each method's search, then its first seed, so
    rows of the table complete early; then the other seeds), each started as soon as a job is free
    and, for a final cell, its method's search has finished and chosen the learning rate. With one
    job that is exactly the order above, run in this thread; with N, N worker threads each wait on
    a child process."""

    def __init__(self, plan: Plan, runner: Runner, console: Console) -> None:
        self.plan, self.runner, self.console = plan, runner, console
        search, finals = search_cells(plan), final_cells(plan, {})
        first = plan.seeds[0]
        self.order = [c for m in plan.methods for c in search + finals if c.method == m and (c.stage == "search" or c.seed == first)]
        self.order += [c for c in finals if c.seed != first]
        self.waiting = list(range(len(self.order)))
        self.searching = {m: sum(c.method == m for c in search) for m in plan.methods}  # unfinished search cells
        self.records: dict[int, dict] = {}
        self.chosen: dict[str, float | None] = {}
        self.started = 0
        self.failure: BaseException | None = None
        self.ready = threading.Condition()

    def run(self) -> tuple[list[dict], dict[str, float | None]]:
        """Every cell's record, in the wanted order, and each trained method's chosen rate."""
        if self.plan.jobs == 1:
            self._work()
        else:
            workers = [threading.Thread(target=self._work, daemon=True) for _ in range(self.plan.jobs)]
            for worker in workers:
                worker.start()
            try:
                for worker in workers:
                    worker.join()
            except KeyboardInterrupt:
                self._stop(KeyboardInterrupt())
        if self.failure is not None:
            raise self.failure
        return [self.records[i] for i in sorted(self.records)], self.chosen

    def _work(self) -> None:
        while (item := self._next()) is not None:
            position, cell, index = item
            try:
                record = self.runner.run(cell, index, len(self.order))
            except BaseException as err:  # noqa: BLE001 - handed to run(), which raises it
                self._stop(err)
                return
            with self.ready:
                self.records[position] = record
                if cell.stage == "search":
                    self.searching[cell.method] -= 1
                self.ready.notify_all()

    def _next(self) -> tuple[int, Cell, int] | None:
        """The first waiting cell that can start (its learning rate known), waiting for one if none can."""
        with self.ready:
            while self.waiting and self.failure is None:
                for position in self.waiting:
                    cell = self.order[position]
                    if cell.stage == "search" or self.searching[cell.method] == 0:
                        self.waiting.remove(position)
                        self.started += 1
                        return position, self._with_rate(cell), self.started
                self.ready.wait()
            return None

    def _with_rate(self, cell: Cell) -> Cell:
        """A final cell of a trained method at the rate its search chose (the default if none finished)."""
        kind = METHODS[cell.method]
        if cell.stage == "search" or not kind.trains:
            return cell
        if cell.method not in self.chosen and len(grid := self.plan.grid(cell.method)) == 1:
            self.chosen[cell.method] = grid[0]
            self.console.print(f"learning rate for {cell.method}: {grid[0]:g} (given; not searched)")
        if cell.method not in self.chosen:
            searched = [r for r in self.records.values() if r["stage"] == "search"]
            self.chosen[cell.method] = choose_lr(cell.method, searched)
            if self.chosen[cell.method] is not None:
                self.console.print(f"learning rate for {cell.method}: {self.chosen[cell.method]:g} (best validation of {self.plan.grid(cell.method)})")
        return replace(cell, lr=self.chosen[cell.method] or kind.lr)

    def _stop(self, err: BaseException) -> None:
        with self.ready:
            self.failure = self.failure or err
            self.ready.notify_all()


def _shared_baselines(records: list[dict], plan: Plan) -> list[dict]:
    """zero-shot and calibrated depend on neither the training rows nor the seed: their one cell
    stands for every training-set size."""
    out = []
    for record in records:
        if record["stage"] == "final" and not METHODS[record["method"]].uses_training_rows:
            for shots in plan.shots[1:]:
                out.append({**record, "shots": shots, "note": "one run: depends on neither training rows nor seed"})
    return out


def _rows_text(path, limit: int | None = None) -> str:
    if path is None:
        return "a held-out slice of train"
    rows = len(open_source(path))  # any format: a table's row count, a text file's rows
    sample = f", of which each cell scores a seeded, label-stratified {limit}" if limit and limit < rows else ""
    return f"{path} ({rows} rows{sample})"


def _report_limit(plan: Plan, spec) -> int | None:
    """The report rows a cell scores at most: --report-limit, else the task file's train.report_limit."""
    given = [flag.split("=", 1)[1] for flag in plan.extra if flag.startswith("--report-limit=")]
    return int(given[-1]) if given else spec.train.report_limit


def _validation_text(spec) -> str:
    limit = spec.train.eval_limit
    source = spec.data.validation or f"a seeded, label-stratified slice of train ({spec.data.validation_fraction:.0%})"
    return f"{source}" + (f", at most {limit} rows" if limit else "")
