"""How close the pruned answer comes to the fewest nodes an exact search of its kind could feed.

The pruned answer (`classify.label_answers`) bounds every label by its prefix: a label's summed
log-probability is never above any prefix's, so a node must be fed (to learn its children's scores)
whenever its own exact score is at least the answer's. Any exact search that rules labels out by
their prefixes alone therefore feeds at least the trie's inner nodes that score at least the row's
best label; this counts them per row from the whole trie's exact scores (`predict_proba`), beside
the nodes the pruned answer fed on the same rows. The gap is what a better search order could still
save; the floor itself is what only a surer model (or a different kind of bound) lowers.

Rows, template and prompt as `label_scoring.py` (untrained `vocab` init; labels said by their own
names, sum of log-probabilities, no calibration): Banking77's 77 names and the 150 of `labels_150`.
The last stdout line is one JSON object.

    python bench/label_search_floor.py --model gemma3-270m --rows 96
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def node_scores(trie, first: torch.Tensor, edge_logp: torch.Tensor) -> list[float]:
    """Per trie node its exact score: the first token's (per choice, from the row's own pass), plus
    the log-probabilities down its path (`edge_logp` in `label_scores`' order: the fed nodes in
    pre-order, each one's children in turn)."""
    score = [0.0] * len(trie.tokens)
    for choice, path in enumerate(trie.paths):
        score[path[0]] = float(first[choice])
    edge = dict(zip((c for k in trie.fed for c in trie.children[k]), edge_logp.tolist()))
    for node, parent in enumerate(trie.parent):  # pre-order: a parent before its children
        if parent >= 0:
            score[node] = score[parent] + edge[node]
    return score


def floor_and_fed(classifier, rows, batch_size: int) -> dict:
    """Per row the least nodes an exact prefix-bounded search feeds, and what the pruned answer fed."""
    import softprompt.classify as classify

    firsts, edge_logps, fed = [], [], []
    first_scores, feed, backbone = classify._first_scores, classify._feed, classifier.backbone
    token_log_probs = backbone.token_log_probs

    def keep_first(batch, slot):
        firsts.append(first_scores(batch, slot))
        return firsts[-1]

    def keep_edges(*args, **kwargs):
        edge_logps.append(token_log_probs(*args, **kwargs))
        return edge_logps[-1]

    def counting(*args):
        fed.append(sum(map(len, args[3])))
        return feed(*args)

    classify._first_scores, backbone.token_log_probs = keep_first, keep_edges
    try:
        probs = classifier.predict_proba(rows, batch_size)
    finally:
        classify._first_scores, backbone.token_log_probs = first_scores, token_log_probs
    classify._feed = counting
    try:
        answers = classifier.predict(rows, batch_size)
    finally:
        classify._feed = feed
    trie = classifier.trie(rows.encoded.afters[0])
    least = []
    for first, logp in zip(firsts, edge_logps):
        for row_first, row_logp in zip(first, logp.view(len(first), -1)):
            score = node_scores(trie, row_first, row_logp)
            best = max(score[path[-1]] for path in trie.paths)
            least.append(sum(1 for k in trie.fed if score[k] >= best))
    return {
        "labels": len(classifier.labels),
        "inner_nodes": len(trie.fed),
        "fed_per_row_answer": round(sum(fed) / len(least), 2),
        "fed_per_row_least": round(statistics.mean(least), 2),
        "least_median": statistics.median(least),
        "least_max": max(least),
        "answers_identical": answers.tolist() == probs.argmax(-1).tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "intent")
    parser.add_argument("--rows", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default="gemma3-270m")
    args = parser.parse_args()

    from label_scoring import MORE_INTENTS, TEMPLATE

    from softprompt import Backbone, Classifier, Template, Verbalizer, init_prompt
    from softprompt.data import load_examples

    backbone = Backbone.load(args.model)
    template = Template.parse(TEMPLATE)
    prompt = init_prompt("vocab", template.soft_tokens, backbone, seed=0)
    names = sorted({str(e.label) for e in load_examples(args.data / "train.jsonl", template.fields, label_column="label")})
    dev = load_examples(args.data / "dev.jsonl", template.fields, label_column="label")
    examples = [dev[i] for i in torch.linspace(0, len(dev) - 1, min(args.rows, len(dev))).round().long().tolist()]
    results: dict = {"rows": len(examples), "model": args.model, "prompt": "vocab init"}
    wider = [*names, *(n for n in MORE_INTENTS if n not in names)]
    for key, label_names in (("labels_77", names), ("labels_150", wider)):
        classifier = Classifier(backbone, template, Verbalizer.from_spec({n: [n] for n in label_names}), prompt)
        rows = classifier.encode([e.fields for e in examples])
        if any(after != rows.encoded.afters[0] for after in rows.encoded.afters):
            raise SystemExit("every row must share its text after the label slot (one trie)")
        results[key] = floor_and_fed(classifier, rows, args.batch_size)
        print(key, json.dumps(results[key]), flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
