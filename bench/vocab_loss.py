"""Training steps of a generation task with long answers, with the vocabulary loss done plainly
(whole [positions, vocabulary] logits, then cross-entropy, as before `softprompt/vocab_loss.py`)
and chunked (that module: a chunk of positions at a time, keeping only what the backward pass needs).

Each side is a fresh subprocess that trains `--task` (default examples/py2js_shared.yaml: answers of
up to 320 tokens, so a batch of 8 has ~1,500 target positions; on Gemma 3's 262,144-token
vocabulary one plain copy of their logits is 1.6 GB) with the package's own loop for `--steps`
steps, no validation and no baselines. Reported per side: peak RSS (os.wait4), the mean time of the
steps after the first, the losses; and how far the two sides' losses are apart. Same seed, same
batches: the losses agree to float rounding. The last stdout line is one JSON object.

    python bench/vocab_loss.py --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

HERE = Path(__file__).resolve().parent


def child(args: argparse.Namespace) -> None:
    """One side's training in this process; writes what it saw to `args.result`."""
    from rich.console import Console

    import softprompt.backbone
    from softprompt import vocab_loss
    from softprompt.backbone import Backbone
    from softprompt.taskfile import load_task
    from softprompt.train import train

    if args.side == "plain":
        softprompt.backbone.vocab_log_probs = vocab_loss._plain
    spec = load_task(args.task, {"steps": args.steps, "eval_every": 10**6, "model": args.model})
    backbone = Backbone.load(spec.model)
    stamps: list[float] = [time.perf_counter()]
    run = Path(args.folder) / args.side
    train(spec, run, backbone, console=Console(file=open(os.devnull, "w")), baselines=False, report=False,
          on_step=lambda step: stamps.append(time.perf_counter()))  # fmt: skip
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    losses = [entry["loss"] for entry in map(json.loads, lines) if "loss" in entry]
    later = [b - a for a, b in zip(stamps[1:-1], stamps[2:])]  # steps 2 to the last: step 1 warms up
    result = {"losses": losses, "step_s": round(sum(later) / len(later), 2) if later else None}
    Path(args.result).write_text(json.dumps(result))


def measure(args: argparse.Namespace, folder: Path, side: str) -> dict:
    result = folder / f"{side}.json"
    command = [
        sys.executable, __file__, "--child", "--side", side, "--folder", str(folder), "--result", str(result),
        "--task", str(args.task), "--steps", str(args.steps), "--model", args.model,
    ]  # fmt: skip
    process = subprocess.Popen(command)
    _, status, usage = os.wait4(process.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"the {side} side failed (exit {os.waitstatus_to_exitcode(status)})")
    return {"peak_rss_mb": round(usage.ru_maxrss / 1024, 1), **json.loads(result.read_text())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", type=Path, default=HERE.parent / "examples" / "py2js_shared.yaml")
    parser.add_argument("--model", default="default")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--side", choices=["plain", "chunked"], help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    with TemporaryDirectory() as tmp:
        sides = {side: measure(args, Path(tmp), side) for side in ("plain", "chunked")}
    plain, chunked = sides["plain"], sides["chunked"]
    worst = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(chunked["losses"], plain["losses"], strict=True))
    print(json.dumps({
        "bench": "vocab_loss", "task": args.task.name, "model": args.model, "steps": args.steps, **sides,
        "max_rel_loss_diff": worst,
        "peak_rss_chunked_over_plain": round(chunked["peak_rss_mb"] / plain["peak_rss_mb"], 3),
        "step_time_chunked_over_plain": round(chunked["step_s"] / plain["step_s"], 3),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
