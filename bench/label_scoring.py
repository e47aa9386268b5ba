"""Rows per second when scoring many labels: the cost of the final report on an intent dataset.

Scores `--rows` dev rows of Banking77 (77 intents named in words, most of them several tokens:
"card arrival", "lost or stolen card", ...) with a 20-token prompt, labels said by their own names,
and, for scale, the same rows against two single-token labels. The prompt is the untrained `vocab`
init: speed does not depend on training. The last stdout line is one JSON object.

    python bench/label_scoring.py --data ../shared/data/intent --rows 300
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
TEMPLATE = "{soft:20} Customer message: {text} Intent: {label}"


def rows_per_second(classifier, examples, batch_size: int) -> tuple[float, float]:
    """(rows/s, seconds) of predict_proba over the examples, encoding included."""
    started = time.perf_counter()
    rows = classifier.encode([e.fields for e in examples])
    classifier.predict_proba(rows, batch_size)
    seconds = time.perf_counter() - started
    return len(examples) / seconds, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "intent")
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    from softprompt import Backbone, Classifier, Template, Verbalizer, init_prompt
    from softprompt.data import load_examples

    backbone = Backbone.load("smollm2-135m")
    template = Template.parse(TEMPLATE)
    prompt = init_prompt("vocab", template.soft_tokens, backbone, seed=0)
    examples = load_examples(args.data / "dev.jsonl", template.fields, label_column="label")[: args.rows]
    train = load_examples(args.data / "train.jsonl", template.fields, label_column="label")
    names = sorted({str(e.label) for e in train})
    many = Classifier(backbone, template, Verbalizer.from_spec({n: [n] for n in names}), prompt)
    two = Classifier(backbone, template, Verbalizer.from_spec(["positive", "negative"]), prompt)
    results = {"rows": len(examples), "batch_size": args.batch_size}
    for name, classifier in (("labels_77", many), ("labels_2", two)):
        speed, seconds = rows_per_second(classifier, examples, args.batch_size)
        tokens = [len(ids) for ids in classifier.choices.ids]
        results[name] = {
            "rows_per_s": round(speed, 2),
            "seconds": round(seconds, 1),
            "labels": len(classifier.labels),
            "multi_token_labels": sum(t > 1 for t in tokens),
            "tokens_per_label_max": max(tokens),
        }
        print(name, json.dumps(results[name]), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
