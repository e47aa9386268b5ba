"""How good a feature the label slot's state is under an initial prompt: the start of `label_init: fit`.

A task with `label_vectors: per_label` and `label_init: fit` starts its head as a logistic
regression of the training rows' slot states *under the initial prompt* (LP-FT). Where the soft
tokens sit changes those states, and so the start. For each template given, this builds the prompt
method as `train` would (same seed, shots, init, fitted head) and scores its step 0 on the task's
dev rows: no training step. A template without soft tokens is the linear probe's own start. Nothing
here chooses anything; it is how `examples/banking77.yaml`'s placement and init were measured
(README, "One vector per label"). The last stdout line is one JSON object.

    python bench/fitted_start.py examples/banking77.yaml --seed 0 --dev-rows 1000 \\
        --template '{soft:20} Customer message: {text} Intent: {label}' \\
        --template 'Customer message: {text} {soft:20} Intent: {label}'
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", type=Path)
    parser.add_argument("--template", action="append", required=True, help="a template to start from (repeat)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dev-rows", type=int, default=1000, help="dev rows scored (label-stratified)")
    parser.add_argument("--init", help="the soft tokens' init for every template (default: the task file's)")
    args = parser.parse_args()

    from softprompt import Backbone
    from softprompt.methods import method_class
    from softprompt.task import make_task
    from softprompt.taskfile import load_task

    backbone = None
    starts = []
    for template in args.template:
        started = time.perf_counter()
        spec = load_task(args.task, {"template": template, "seed": args.seed, "report_limit": args.dev_rows, "init": args.init})
        backbone = backbone or Backbone.load(spec.model)
        task = make_task(spec, backbone)
        model = method_class("prompt").build(task, backbone).apply(task.model)
        report = task.score(model, "dev")
        seconds = round(time.perf_counter() - started, 1)
        starts.append({"template": template, "init": spec.init, "dev_accuracy": report["accuracy"], "dev_rows": report["n"], "seconds": seconds})
        print(json.dumps(starts[-1]), flush=True)
    print(json.dumps({"task": str(args.task), "seed": args.seed, "starts": starts}))


if __name__ == "__main__":
    main()
