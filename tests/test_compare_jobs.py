"""`compare --jobs N`: cells run side by side, a final cell waits for its method's search, and
the report is the one `--jobs 1` writes (same cells, same numbers)."""

import json
import threading
import time
from pathlib import Path

from rich.console import Console
from typer.testing import CliRunner

from softprompt.cli import app
from softprompt.compare.grid import Plan, Schedule, _stub

from helpers import write_task


def compare(task, out, *extra):
    args = ["compare", str(task), "--out", str(out), "--methods", "zero-shot,prompt,lora", "--shots", "2",
            "--seeds", "0", "--steps", "2", "--lrs", "prompt=0.1,0.3", "--lrs", "lora=0.001", *extra]
    return CliRunner().invoke(app, args)


class FakeRunner:
    """Stands in for the process-starting Runner: records which cells run at the same time."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.running: set[str] = set()
        self.overlaps: list[tuple[str, ...]] = []
        self.log: list[tuple[str, str]] = []  # ("start"|"end", cell id) in time order

    def run(self, cell, index, total):
        with self.lock:
            self.running.add(cell.id)
            self.log.append(("start", cell.id))
            if len(self.running) > 1:
                self.overlaps.append(tuple(sorted(self.running)))
        time.sleep(0.3 if cell.stage == "search" else 0.05)  # long enough for a free job to start another
        with self.lock:
            self.running.discard(cell.id)
            self.log.append(("end", cell.id))
        return {**_stub(cell, "done", None), "validation": cell.lr or 0.0}


def plan(jobs: int, rates=(0.1, 0.3)) -> Plan:
    return Plan(task=Path("t.yaml"), out=Path("out"), methods=["zero-shot", "prompt"], shots=["4"], seeds=[0, 1],
                steps=2, test=None, budget_s=None, lrs={"prompt": list(rates)}, jobs=jobs)


def test_two_jobs_run_two_cells_at_once_and_finals_wait_for_their_search():
    runner = FakeRunner()  # three searches on two jobs: the third runs alone while a final could start
    records, chosen = Schedule(plan(2, (0.1, 0.3, 0.2)), runner, Console(quiet=True)).run()
    assert runner.overlaps, "no two cells ever ran at the same time"
    searches = {f"search-prompt-4-s0-lr{r}" for r in (0.1, 0.3, 0.2)}
    last_search_end = max(i for i, (what, cid) in enumerate(runner.log) if what == "end" and cid in searches)
    first_final_start = min(i for i, (what, cid) in enumerate(runner.log) if what == "start" and cid.startswith("final-prompt"))
    assert first_final_start > last_search_end  # the rate is chosen before a final prompt cell starts
    assert chosen == {"prompt": 0.3}  # the best validation (the fake scores a cell by its rate)
    assert {r["lr"] for r in records if r["stage"] == "final" and r["method"] == "prompt"} == {0.3}


def test_one_job_runs_the_cells_one_after_another_in_the_wanted_order():
    runner = FakeRunner()
    records, _ = Schedule(plan(1), runner, Console(quiet=True)).run()
    assert not runner.overlaps
    assert [(r["stage"], r["method"], r["seed"]) for r in records] == [
        ("final", "zero-shot", 0), ("search", "prompt", 0), ("search", "prompt", 0), ("final", "prompt", 0),
        ("final", "prompt", 1),
    ]


def test_two_jobs_write_the_report_one_job_writes(tmp_path, tiny_model_dir):
    task = write_task(tmp_path, tiny_model_dir)
    reports = {}
    for jobs in (1, 2):
        result = compare(task, tmp_path / f"report{jobs}", "--test", str(tmp_path / "dev.jsonl"), "--jobs", str(jobs))
        assert result.exit_code == 0, result.output
        assert "wall time of this run" in result.output
        reports[jobs] = json.loads((tmp_path / f"report{jobs}" / "report.json").read_text())
    def numbers(report):
        return sorted(
            (c["stage"], c["method"], c["shots"], c["seed"], c["lr"], c["status"], c["validation"], json.dumps(c["test"], sort_keys=True))
            for c in report["cells"]
        )
    assert numbers(reports[2]) == numbers(reports[1])
    assert reports[2]["meta"]["chosen_lr"] == reports[1]["meta"]["chosen_lr"]
    assert list((tmp_path / "report2" / "cells").glob("*.log")), "with --jobs 2 each cell writes its own log"


def test_a_method_given_one_rate_is_not_searched_and_its_finals_use_that_rate():
    runner = FakeRunner()
    records, chosen = Schedule(plan(1, (0.2,)), runner, Console(quiet=True)).run()
    assert [(r["stage"], r["method"], r["seed"]) for r in records] == [
        ("final", "zero-shot", 0), ("final", "prompt", 0), ("final", "prompt", 1),
    ]
    assert chosen == {"prompt": 0.2}
    assert {r["lr"] for r in records if r["method"] == "prompt"} == {0.2}
