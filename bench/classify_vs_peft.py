"""softprompt vs the plain PEFT prompt-tuning recipe on one classification dataset.

Both sides train 20 soft tokens with batch 8 for the same number of steps on the same rows and
model, then score the first `--eval-n` rows of `--split` (dev, or test: rows no choice of either
recipe ever saw). softprompt's side is `train`'s default recipe (validation every 50 steps on 200
training rows, the best prompt kept) unless a flag changes it. Each side runs in its own subprocess
so its peak RSS is its own. The last stdout line is one JSON object: {"softprompt": {...}, "peft": {...}}.

    python bench/classify_vs_peft.py --data ../shared/data/sst2 --steps 150 --eval-n 300
    python bench/classify_vs_peft.py --data ../shared/data/sst2 --steps 150 --eval-n 1821 --split test
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from tempfile import TemporaryDirectory

HERE = Path(__file__).resolve().parent
TEMPLATE = "{soft:20} Review: {text} Sentiment: {label}"
VERBALIZER = {"negative": ["negative"], "positive": ["positive"]}
SOFTPROMPT_SETTINGS = ("lr", "warmup", "schedule", "eval_every")  # train settings the command line may change


def run_softprompt(
    data: Path, steps: int, eval_n: int, split: str, seed: int, init: str | None, changes: dict
) -> dict:
    """`changes`: the SOFTPROMPT_SETTINGS the command line sets; the rest are train's defaults."""
    from rich.console import Console

    from softprompt import Backbone, TaskSpec, load_classifier
    from softprompt.data import load_examples
    from softprompt.metrics import classification_report
    from softprompt.train import train

    start = time.perf_counter()
    backbone = Backbone.load("smollm2-135m")
    load_s = time.perf_counter() - start
    # Validation (which picks the kept prompt) is a label-stratified slice of train (200 rows), never
    # the rows we report. train() ends by scoring all dev rows; the timed pass below scores the
    # first eval_n rows of the split, as the PEFT side does, to measure evaluation throughput.
    settings = {"steps": steps, "batch_size": 8, "eval_limit": 200, "seed": seed}
    settings |= {key: value for key, value in changes.items() if value is not None}
    spec = TaskSpec.model_validate(
        {
            "template": TEMPLATE,
            "verbalizer": VERBALIZER,
            "data": {"train": str(data / "train.jsonl"), "dev": str(data / "dev.jsonl")},
            "train": settings,
            **({"init": init} if init else {}),
        }
    )
    with TemporaryDirectory() as run:
        info = train(spec, run, backbone=backbone, console=Console(stderr=True))
        classifier, _ = load_classifier(run, backbone)
        scored = load_examples(data / f"{split}.jsonl", ["text"])[:eval_n]
        started = time.perf_counter()
        rows = classifier.encode([e.fields for e in scored], [str(e.label) for e in scored])
        predicted = classifier.predict_proba(rows, batch_size=16).argmax(-1).tolist()
        eval_s = time.perf_counter() - started
        report = classification_report(rows.labels.tolist(), predicted, classifier.labels)
        plain = classifier.zero_shot()
        zero = plain.predict_proba(plain.encode([e.fields for e in scored], [str(e.label) for e in scored]))
        zero_shot = classification_report(rows.labels.tolist(), zero.argmax(-1).tolist(), classifier.labels)
        if split == "dev" and len(scored) == info.metrics["dev"]["n"]:
            assert abs(report["accuracy"] - info.metrics["dev"]["accuracy"]) < 1e-9
    return {
        "train_examples_per_s": info.metrics["train_examples_per_s"],
        "eval_examples_per_s": len(rows) / eval_s,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "accuracy": report["accuracy"],
        "split": split,
        "zero_shot_accuracy": zero_shot["accuracy"],
        "load_s": load_s,
        "train_s": info.metrics["train_seconds"],
        "eval_s": eval_s,
        "steps": steps,
        "batch_size": 8,
        "eval_n": len(rows),
        "lr": spec.train.lr,
        "init": spec.init,
        "warmup": spec.train.warmup,
        "schedule": spec.train.schedule,
        "eval_every": spec.train.eval_every,
        "kept_step": info.metrics["best_step"],  # the step whose prompt was kept (validated on train rows)
    }


def side_in_subprocess(side: str, args: argparse.Namespace) -> dict:
    common = ["--data", str(args.data), "--steps", str(args.steps), "--eval-n", str(args.eval_n)]
    common += ["--seed", str(args.seed), "--split", args.split]
    if side == "peft":
        command = [sys.executable, str(HERE / "peft_side.py"), *common]
    else:
        command = [sys.executable, str(Path(__file__).resolve()), "--side", side, *common]
        for name in ("init", *SOFTPROMPT_SETTINGS):
            value = getattr(args, name)
            command += [f"--{name.replace('_', '-')}={value}"] if value is not None else []
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "sst2")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--eval-n", type=int, default=300, help="score the first N rows of --split")
    parser.add_argument("--split", choices=["dev", "test"], default="dev", help="the rows scored (DATA/SPLIT.jsonl)")
    parser.add_argument("--lr", type=float, default=None, help="softprompt's learning rate (default: ours)")
    parser.add_argument("--init", default=None, help="softprompt's init (default: ours)")
    parser.add_argument("--warmup", type=float, default=None, help="softprompt's warmup share (default: ours)")
    parser.add_argument("--schedule", choices=["linear", "cosine", "constant"], help="softprompt's lr schedule")
    parser.add_argument("--eval-every", type=int, help="softprompt's validation interval (default: train's)")
    parser.add_argument("--seed", type=int, default=0, help="data order (and init) seed for both sides")
    parser.add_argument("--side", choices=["softprompt", "peft"], help="run one side here (internal)")
    parser.add_argument("--only", choices=["softprompt", "peft"], help="run just one side")
    args = parser.parse_args()
    if args.side == "softprompt":
        changes = {name: getattr(args, name) for name in SOFTPROMPT_SETTINGS}
        result = run_softprompt(args.data, args.steps, args.eval_n, args.split, args.seed, args.init, changes)
        print(json.dumps(result))
        return
    sides = [args.only] if args.only else ["softprompt", "peft"]
    results = {side: side_in_subprocess(side, args) for side in sides}
    if len(results) == 2:
        sp, pf = results["softprompt"], results["peft"]
        results["ratios"] = {
            "train_examples_per_s": sp["train_examples_per_s"] / pf["train_examples_per_s"],
            "eval_examples_per_s": sp["eval_examples_per_s"] / pf["eval_examples_per_s"],
            "peak_rss": sp["peak_rss_mb"] / pf["peak_rss_mb"],
            "accuracy_diff": sp["accuracy"] - pf["accuracy"],
        }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
