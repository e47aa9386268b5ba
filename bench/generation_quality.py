"""Quality of a trained generation run against its baselines, on the same rows in one process.

Three variants decode the first `--limit` rows of `--data` with the run's decoding settings and are
scored with the run's metrics (BLEU, chrF, ROUGE-L, EM/F1, parse and test pass rates):

  zero_shot       the run's template with its soft tokens removed (plain prompting)
  initial_prompt  the template with the untrained starting prompt (re-made from the run's init/seed)
  tuned           the template with the trained prompt

Use a file the run never validated on (e.g. the dataset's dev file when the task file validates on
a split of train). The last stdout line is one JSON object {variant: scores, ...}.

    python bench/generation_quality.py runs/java2cs --data ../shared/data/code_translation/dev.jsonl --limit 100
    python bench/generation_quality.py runs/py2js --data ../shared/data/py2js/exec.jsonl \\
        --column input=python --column target=js_reference --only tuned
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from softprompt import Backbone, init_prompt
from softprompt.artifact import load_run
from softprompt.data import load_examples
from softprompt.generate import DecodeConfig, Generator
from softprompt.task import score_generations, write_predictions
from softprompt.taskfile import GenerationSpec

VARIANTS = ("zero_shot", "initial_prompt", "tuned")


def variant_model(name: str, tuned: Generator, info) -> Generator:
    if name == "tuned":
        return tuned
    if name == "zero_shot":
        return tuned.with_prompt(None)
    backbone, seed = tuned.backbone, int(info.training.get("seed", 0))
    initial = init_prompt(info.init, tuned.template.soft_tokens, backbone, [], seed).to(backbone.device)
    return tuned.with_prompt(initial)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("run", type=Path)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--column", action="append", help="FIELD=COLUMN, as for `softprompt eval`")
    parser.add_argument("--only", action="append", choices=VARIANTS, help="variants to run (default all)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default=None, help="override the run's model")
    args = parser.parse_args()

    tuned, info = load_run(args.run, Backbone.load(args.model) if args.model else None)
    assert isinstance(tuned, Generator), f"{args.run} is not a generation run"
    info.remap(args.column, tuned.template.fields)
    keep = [info.tests_column] if info.tests_column else None
    examples = load_examples(args.data, tuned.template.fields, info.columns, info.target_column, keep=keep)
    examples = examples[: args.limit]
    spec = GenerationSpec.model_validate(info.generation or {})
    config = DecodeConfig(max_new_tokens=spec.max_new_tokens, num_beams=spec.num_beams, stop=spec.stop)
    results = {"run": str(args.run), "data": str(args.data), "n": len(examples)}
    for name in args.only or VARIANTS:
        model = variant_model(name, tuned, info)
        started = time.perf_counter()
        predictions = model.generate(model.encode([e.fields for e in examples]), config, args.batch_size)
        report = score_generations(predictions, examples, spec, info.tests_column)
        out = args.run / f"quality_{args.data.stem}_{name}.predictions.jsonl"
        write_predictions(out, report.pop("rows"))
        report.pop("n")
        results[name] = {k: round(v, 2) for k, v in report.items()}
        results[name]["decode_seconds"] = round(time.perf_counter() - started, 1)
        print(name, json.dumps(results[name]), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
