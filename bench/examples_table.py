"""Every example task on each model: dev quality (and zero-shot's), training time, eval speed.

Issue 17 asks for this table in the README, so a user can see what each example reaches on the
default model (Gemma 3 270M) and on SmolLM2-135M before choosing. Each (example, model, seed) is
one `softprompt train EXAMPLE --model MODEL --seed S` in its own process, with the example's own
settings (nothing is tuned here), on its dev rows; the numbers come from the run's task.json.
Examples whose data is absent (the shared ones, when ../shared/data is missing) are skipped and
listed. A finished cell is kept in --out and not run again, so an interrupted table resumes.

    python bench/examples_table.py --out /tmp/examples-table              # every example, both models
    python bench/examples_table.py --examples sentiment,intent --seeds 0,1,2

The last stdout line is one JSON object: {"cells": [...], "skipped": [...]}.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("gemma3-270m", "smollm2-135m")


def examples(names: str | None) -> list[Path]:
    found = sorted((ROOT / "examples").glob("*.yaml"))
    if names:
        wanted = {n.strip().removesuffix(".yaml") for n in names.split(",")}
        found = [p for p in found if p.stem in wanted]
    return found


def missing_data(example: Path) -> str | None:
    """Why the example cannot run here (a data file it names is absent), or None."""
    from softprompt.taskfile import TaskError, load_task

    try:
        spec = load_task(example)
    except TaskError as err:
        return str(err).splitlines()[0]
    for path in (spec.data.train, spec.data.dev, spec.data.validation):
        if path and not spec.path(path).exists():
            return f"{spec.path(path)} is absent"
    return None


def run_cell(example: Path, model: str, seed: int, out: Path, steps: int | None) -> dict:
    """One training run, or the finished record a previous invocation left (a failed cell runs again)."""
    record_file = out / f"{example.stem}-{model}-s{seed}.json"
    previous = json.loads(record_file.read_text()) if record_file.is_file() else {}
    if previous.get("status") == "done":
        return previous
    run = out / "runs" / f"{example.stem}-{model}-s{seed}"
    command = [sys.executable, "-m", "softprompt.cli", "train", str(example), "--out", str(run),
               "--model", model, "--seed", str(seed)]
    command += ["--resume"] if run.exists() else []  # an interrupted run continues where it stopped
    command += ["--steps", str(steps)] if steps else []
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - started
    record = {"example": example.stem, "model": model, "seed": seed, "wall_seconds": round(wall, 1)}
    if done.returncode != 0:
        record |= {"status": "failed", "error": (done.stderr or done.stdout).strip().splitlines()[-1:]}
    else:
        metrics = json.loads((run / "task.json").read_text())["metrics"]
        metric = json.loads((run / "task.json").read_text())["training"]["metric"]
        record |= {
            "status": "done",
            "metric": metric,
            "dev": metrics.get("dev", {}).get(metric),
            "dev_zero_shot": metrics.get("dev_zero_shot", {}).get(metric),
            "dev_rows": metrics.get("rows", {}).get("dev"),
            "steps": metrics.get("steps"),
            "train_seconds": metrics.get("train_seconds"),
            "eval_rows_per_s": metrics.get("eval_examples_per_s"),
        }
    record_file.write_text(json.dumps(record))
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/examples-table"))
    parser.add_argument("--examples", help="comma-separated example names (default: every examples/*.yaml)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--steps", type=int, help="override every example's steps (default: its own)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    cells, skipped = [], []
    for example in examples(args.examples):
        if (why := missing_data(example)) is not None:
            skipped.append({"example": example.stem, "why": why})
            continue
        for model in args.models.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                cell = run_cell(example, model, seed, args.out, args.steps)
                print(json.dumps(cell), file=sys.stderr, flush=True)
                cells.append(cell)
    print(json.dumps({"cells": cells, "skipped": skipped}))


if __name__ == "__main__":
    main()
