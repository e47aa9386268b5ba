"""Peak memory of training on a huge Parquet file against a small one (issue 18's target: 5,000,000
rows at most 1.2x the peak RSS of 5,000 rows, for the same 100 steps).

Writes two Parquet training files of short generated reviews (two labels, row groups of 100,000
rows) and a 200-row dev file in a temporary folder, then runs `softprompt train` on each in its own
subprocess and reads that child's peak RSS from os.wait4. Validation is a seeded slice of train
(`eval_limit` rows), so the large run also exercises the stratified slice over all its rows.
`--shots K` trains on K rows per label, the few-shot path; without it training reads every
training row: one pass at the start tokenizes them ENCODE_CHUNK at a time and keeps only their
lengths (int32, for length bucketing), and each step reads and encodes its own batch
(task.TrainRows). A run past `--rss-limit-mb` is killed rather than let it take the machine.
The last stdout line is one JSON object; each run's `wall_s` includes reading the file, the lengths
pass and the doctor's duplicate check (a second read of every row), `train_seconds` the steps.

    python bench/parquet_memory.py                       # 5,000 vs 5,000,000 rows, 100 steps
    python bench/parquet_memory.py --shots 64 --large 5000000
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

import pyarrow as pa
import pyarrow.parquet as pq

WORDS = {
    "positive": ["great", "lovely", "moving", "fun", "superb", "warm", "clever", "bright"],
    "negative": ["dull", "boring", "messy", "flat", "slow", "cold", "silly", "grim"],
}
FILLER = ["film", "plot", "cast", "story", "music", "ending", "scene", "pace", "a", "the", "very", "quite"]
GROUP_ROWS = 100_000
TARGET = 1.2


def write_parquet(path: Path, rows: int, seed: int) -> None:
    """`rows` short reviews ("the plot was very dull"), labels alternating at random, in row groups."""
    rng = random.Random(seed)
    schema = pa.schema([("text", pa.string()), ("label", pa.string())])
    with pq.ParquetWriter(path, schema) as writer:
        for start in range(0, rows, GROUP_ROWS):
            n = min(GROUP_ROWS, rows - start)
            labels = [rng.choice(("positive", "negative")) for _ in range(n)]
            texts = [
                f"the {rng.choice(FILLER)} was {rng.choice(FILLER)} {rng.choice(WORDS[y])} #{start + i}"
                for i, y in enumerate(labels)
            ]
            writer.write_table(pa.table({"text": texts, "label": labels}, schema=schema))


def task_file(folder: Path, train: Path, dev: Path, args: argparse.Namespace) -> Path:
    settings = {
        "steps": args.steps,
        "batch_size": 8,
        "eval_every": args.steps,
        "eval_limit": 32,
        "patience": 100,
        "max_length": 64,
        "calibrate": "off",
        **({"shots": args.shots} if args.shots else {}),
    }
    spec = {
        "model": args.model,
        "template": "{soft:8} Review: {text} Sentiment: {label}",
        "verbalizer": {"positive": ["positive"], "negative": ["negative"]},
        "data": {"train": str(train), "dev": str(dev)},
        "train": settings,
    }
    path = folder / f"{train.stem}.yaml"
    path.write_text(json.dumps(spec), encoding="utf-8")  # JSON is YAML
    return path


def _rss_mb(pid: int) -> float:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return 0.0
    return next(
        (int(line.split()[1]) / 1024 for line in status.splitlines() if line.startswith("VmRSS:")), 0.0
    )


def train_once(task: Path, out: Path, timeout: float, rss_limit_mb: float) -> dict:
    """Run `softprompt train` in a child process; its peak RSS (MB), wall time and exit status. A
    child past `timeout` seconds or `rss_limit_mb` of RSS is killed (a run that would take the
    machine's memory must not take the machine)."""
    command = [
        sys.executable, "-c", "import sys; from softprompt.cli import main; sys.argv[0] = 'softprompt'; main()",
        "train", str(task), "--out", str(out), "--no-zero-shot",
    ]  # fmt: skip
    log = out.with_suffix(".log")
    started = time.perf_counter()
    with log.open("w") as handle:
        child = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)
        deadline, status, usage, stopped = started + timeout, None, None, None
        while status is None:
            pid, status_now, usage_now = os.wait4(child.pid, os.WNOHANG)
            if pid:
                status, usage = status_now, usage_now
                continue
            if time.perf_counter() > deadline:
                stopped = "timeout"
            elif _rss_mb(child.pid) > rss_limit_mb:
                stopped = "rss_limit"
            if stopped:
                os.killpg(child.pid, signal.SIGKILL)
                _, status, usage = os.wait4(child.pid, 0)
            else:
                time.sleep(0.2)
        child.returncode = os.waitstatus_to_exitcode(status)
    tail = log.read_text(errors="replace").splitlines()[-3:]
    result = {
        "peak_rss_mb": round(usage.ru_maxrss / 1024, 1),  # Linux: kilobytes
        "wall_s": round(time.perf_counter() - started, 1),
        "exit": child.returncode,
        "killed": stopped,  # None, "timeout" or "rss_limit"
    }
    if child.returncode != 0:
        result["log_tail"] = tail
    info = out / "task.json"
    if info.exists():
        metrics = json.loads(info.read_text())["metrics"]
        result.update(steps=metrics["steps"], rows=metrics["rows"], train_seconds=metrics["train_seconds"])
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", type=int, default=5_000, help="rows of the small training file")
    parser.add_argument("--large", type=int, default=5_000_000, help="rows of the large training file")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--shots", type=int, default=None, help="train on K rows per label (few-shot)")
    parser.add_argument(
        "--model", default="smollm2-135m", help="a packaged model's name or a HF model folder"
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per training run")
    parser.add_argument("--rss-limit-mb", type=float, default=6000, help="kill a training run past this RSS")
    parser.add_argument(
        "--keep", type=Path, default=None, help="write the files and runs here, and keep them"
    )
    args = parser.parse_args()

    with TemporaryDirectory() as tmp:
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        dev = folder / "dev.parquet"
        write_parquet(dev, 200, seed=1)
        results = {}
        for name, rows in (("small", args.small), ("large", args.large)):
            train = folder / f"train_{rows}.parquet"
            started = time.perf_counter()
            write_parquet(train, rows, seed=0)
            written = round(time.perf_counter() - started, 1)
            print(
                f"{name}: {rows} rows, {train.stat().st_size / 2**20:.1f} MB written in {written}s",
                file=sys.stderr,
            )
            task = task_file(folder, train, dev, args)
            results[name] = {
                "file_rows": rows,
                "file_mb": round(train.stat().st_size / 2**20, 2),
                **train_once(task, folder / f"run_{rows}", args.timeout, args.rss_limit_mb),
            }
            print(f"{name}: {json.dumps(results[name])}", file=sys.stderr)
    ratio = results["large"]["peak_rss_mb"] / results["small"]["peak_rss_mb"]
    finished = all(r["exit"] == 0 for r in results.values())
    print(
        json.dumps(
            {
                "bench": "parquet_memory",
                "model": args.model,
                "steps": args.steps,
                "shots": args.shots,
                "small": results["small"],
                "large": results["large"],
                "rss_ratio": round(ratio, 3),
                "target": TARGET,
                "meets_target": finished and ratio <= TARGET,
            }
        )
    )


if __name__ == "__main__":
    main()
