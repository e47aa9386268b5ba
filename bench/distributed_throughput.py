"""What distributing training costs: the same prompt-tuning steps on 2 processes x 1 thread
(`torchrun --nproc-per-node 2 -m softprompt train`, gloo) and on 1 process x 2 threads, in one run.

Each run's training examples/s is the one task.json records (optimizer steps and checkpoints, not
loading or validation). The target is 2 x 1 at least 0.9x of 1 x 2: splitting every batch between
processes and averaging the gradients costs almost nothing. The two kept prompts are compared too
(same global batch: they should agree to float rounding).

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

from safetensors.torch import load_file

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
        prompts = [load_file(str(root / run / "prompt.safetensors"))["prompt"] for run in ("two_by_one", "one_by_two")]
        difference = float((prompts[0] - prompts[1]).abs().max())
    print(json.dumps({
        "model": args.model,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "two_by_one": two,
        "one_by_two": one,
        "ratio": round(two["examples_per_s"] / one["examples_per_s"], 3),
        "target_ratio": 0.9,
        "max_prompt_difference": difference,
    }))


if __name__ == "__main__":
    main()
