"""Summed against length-normalised label scores (`label_scores: sum | mean`) on a many-label task.

Scores a seeded, label-stratified sample of the task's test rows (its `data.test`, else dev) with
plain zero-shot prompting (the template without soft tokens: no training, so the difference is the
scoring alone), once per setting, and reports accuracy, macro-F1 and rows/s. Nothing here chooses
anything. The last stdout line is one JSON object.

    python bench/label_scores_quality.py examples/banking77.yaml --rows 385
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", type=Path)
    parser.add_argument("--rows", type=int, default=385, help="test rows, a seeded label-stratified sample")
    args = parser.parse_args()

    from softprompt import Backbone
    from softprompt.task import make_task
    from softprompt.taskfile import load_task

    spec = load_task(args.task)
    spec.data.dev = spec.data.test or spec.data.dev
    spec.train.report_limit = args.rows
    backbone = Backbone.load(spec.model)
    results: dict = {"task": str(args.task), "rows_file": spec.data.dev}
    for setting in ("sum", "mean"):
        spec.label_scores = setting
        task = make_task(spec, backbone)
        zero_shot = task.model.with_prompt(None)
        zero_shot.predict_proba(zero_shot.encode([e.fields for e in task.splits.dev[:16]]))  # warm-up, untimed
        started = time.perf_counter()
        report = task.score(zero_shot, "dev")
        seconds = time.perf_counter() - started
        words = [len(ids) for ids in task.model.choices.ids]
        results[setting] = {
            "rows": report["n"],
            "accuracy": round(report["accuracy"], 4),
            "macro_f1": round(report["macro_f1"], 4),
            "rows_per_s": round(report["n"] / seconds, 2),
            "labels": len(task.model.labels),
            "tokens_per_label_mean": round(sum(words) / len(words), 2),
        }
        print(setting, json.dumps(results[setting]), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
