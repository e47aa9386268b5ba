"""What distributing training costs: the same prompt-tuning steps on 2 processes x 1 thread
(`torchrun --nproc-per-node 2 -m softprompt train`, gloo) and on 1 process x 2 threads, in one run.

Each run's training examples/s is the one task.json records (optimizer steps and checkpoints, not
loading or validation). The target is 2 x 1 at least 0.9x of 1 x 2: splitting every batch between
processes and averaging the gradients costs almost nothing. The two runs' training losses are
compared step by step (same global batch: each step's loss is that of the prompt the steps before
made); the kept prompts may both be the initial one when no validation beats it, so they say
nothing. The two sum each batch's gradient in a different order (4 + 4 rows, then the average,
against 8 rows), so the first step's losses agree to rounding and later ones drift apart as Adam's
normalised updates amplify that rounding (measured: 1 process on 1 and on 2 threads give identical
losses; 2 processes agree to 1e-6 for four steps and drift to several percent by step 30). The JSON
gives the first step's difference, the largest, and how many first steps agree within 1e-5.

    python bench/distributed_throughput.py [--model smollm2-135m] [--steps 30] [--batch-size 8]

Skips (a JSON line saying why) when the SST-2 data beside the checkout is absent. Last line: JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "sst2"
TASK = """model: {model}
template: '{{soft:20}} Review: {{text}} Sentiment: {{label}}'
verbalizer: {{negative: [negative], positive: [positive]}}
data: {{train: {data}/train.jsonl, dev: {data}/dev.jsonl}}
init: vocab
train: {{steps: {steps}, batch_size: {batch}, lr: 0.03, eval_every: {steps}, eval_limit: 16, report_limit: 16}}
"""


def train(task: Path, out: Path, processes: int, threads: int) -> dict:
    """One `softprompt train` on `processes` x `threads`; the throughput its task.json records."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(processes)]
    command = [*(launcher if processes > 1 else [sys.executable]), "-m", "softprompt", "train", str(task),
               "--out", str(out), "--no-zero-shot", "--no-report"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stdout[-3000:]}{done.stderr[-3000:]}")
    metrics = json.loads((out / "task.json").read_text())["metrics"]
    return {
        "processes": metrics["processes"],
        "threads_per_process": threads,
        "train_examples": metrics["train_examples"],
        "train_seconds": metrics["train_seconds"],
        "examples_per_s": metrics["train_examples_per_s"],
    }


def _losses(run: Path) -> list[float]:
    """The training loss of every step, from the run's metrics.jsonl."""
    lines = (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    return [entry["loss"] for entry in lines if "loss" in entry]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    if not (DATA / "train.jsonl").is_file():
        print(json.dumps({"skipped": f"no SST-2 data at {DATA}"}))
        return
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        task = root / "task.yaml"
        task.write_text(TASK.format(model=args.model, data=DATA, steps=args.steps, batch=args.batch_size))
        two = train(task, root / "two_by_one", processes=2, threads=1)
        one = train(task, root / "one_by_two", processes=1, threads=2)
        losses = [_losses(root / run) for run in ("two_by_one", "one_by_two")]
        differences = [abs(a - b) / abs(b) for a, b in zip(*losses)]
    print(json.dumps({
        "model": args.model,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "two_by_one": two,
        "one_by_two": one,
        "ratio": round(two["examples_per_s"] / one["examples_per_s"], 3),
        "target_ratio": 0.9,
        "relative_loss_difference": {"step_1": differences[0], "max": max(differences)},
        "first_steps_within_1e-5": next((k for k, d in enumerate(differences) if d > 1e-5), len(differences)),
        "steps_compared": len(differences),
    }))


if __name__ == "__main__":
    main()
