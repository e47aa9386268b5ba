"""Rows per second when scoring many labels: the cost of a report on an intent dataset.

Times, on the same `--rows` dev rows of Banking77 (77 intents named in words, most of them several
tokens: "card arrival", "lost or stolen card", ...), labels said by their own names:

  packed  the scoring before the label trie: after each row every label's later tokens, packed, each
          label in a group of its own (`packed_label_scores` below: a reference copy of that code,
          kept in this script only, on today's mask);
  full    the label trie, every label's probability (`predict_proba`: the loss, calibration,
          predict's table, /v1/classify with probabilities);
  answer  the pruned search, the best label only (`predict`: eval, validation, predict
          --no-probabilities, serve's answer);

  label_vectors  one vector per label read at the slot (`label_vectors: per_label`): one projection,
          no label token fed; the run's own vectors with `--run` (when it has them), else the start
          the model's reading gives them (`classify.start_label_head`), whose accuracy on the rows
          is printed beside the frozen words' (`step0_accuracy`);

`labels_150` times packed, full and answer again with 150 names: Banking77's 77 and 73 intents of
other assistants' domains (travel, home, work, small talk: `MORE_INTENTS`, multi-token names in the
manner of CLINC150's, which the shared data does not hold), so that the trie and the pruning are
timed on a label set twice as large; the rows are still Banking77's. And, for scale, the same rows
against two single-token labels. The rows are `--rows` evenly spaced dev rows (the file is sorted
by intent: its first rows would be a few intents only). The prompt is the untrained `vocab`
init, or with `--run` the prompt, template and verbalizer of a run trained on Banking77: the full
scorings' speed does not depend on training, the pruned answer's does (a sure model expands few
prefixes). The model is SmolLM2-135M unless `--model` says otherwise (the README's numbers are on
it). The last stdout line is one JSON object.

    python bench/label_scoring.py --data ../shared/data/intent --rows 300

`--no-packed` leaves out the packed reference (the slowest path, unchanged since the trie replaced
it), for a quicker look at the others.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
TEMPLATE = "{soft:20} Customer message: {text} Intent: {label}"
MORE_INTENTS = (  # 73 names not among Banking77's, for labels_150
    "book flight", "cancel flight", "flight status", "lost luggage", "book hotel", "hotel check in time",
    "car rental", "travel alert", "travel suggestion", "plug type", "international visa", "vaccines for travel",
    "timezone", "weather forecast", "set alarm", "set timer", "reminder update", "calendar update",
    "meeting schedule", "schedule maintenance", "oil change when", "tire pressure", "gas type", "jump start",
    "uber request", "directions to place", "traffic update", "distance to city", "restaurant reservation",
    "restaurant reviews", "order food delivery", "nutrition info", "recipe suggestion", "calories in meal",
    "cook time", "ingredient substitution", "grocery list update", "shopping list add", "order status",
    "play music", "change volume", "next song", "smart home lights off", "thermostat change", "what is your name",
    "tell a joke", "meaning of life", "are you a bot", "who made you", "how old are you", "do you have pets",
    "what can i ask you", "goodbye", "thank you", "greeting", "repeat that", "change speaking voice",
    "change language", "sync device", "reset settings", "whisper mode", "definition of word", "spelling of word",
    "translate phrase", "calculate sum", "measurement conversion", "roll dice", "flip coin", "random number",
    "credit score check", "income tax question", "insurance claim", "retirement plan advice",
)


def packed_label_scores(rows) -> list[torch.Tensor]:
    """The label scoring before the trie (reference only): after each row's tokens come, packed, the
    tokens that score its multi-token words, each word in a group of its own that sees the row and
    its own earlier tokens only (a group is a tree node whose subtree is itself)."""
    from softprompt.classify import _first_token_scores
    from softprompt.splice import BatchRow, run_rows

    backbone = rows[0].classifier.backbone
    pairs = [(r, word, word + row.after) for r, row in enumerate(rows) for word in row.classifier.choices.ids]
    packed = [BatchRow(row.classifier.lm, row.prefix, list(row.body)) for row in rows]
    for row in packed:
        row.offsets, row.nodes, row.last = list(range(len(row.ids))), [-1] * len(row.ids), [-1] * len(row.ids)
    where: list[tuple[int, int]] = []
    targets, owners, in_word = [], [], []
    for index, (r, word, tokens) in enumerate(pairs):
        row, body = packed[r], len(rows[r].body)
        for k, token in enumerate(tokens[:-1]):
            where.append((r, len(row.ids)))
            row.ids.append(token)
            row.offsets.append(body + k)
            row.nodes.append(index)
            row.last.append(index)
        targets += tokens[1:]
        owners += [index] * (len(tokens) - 1)
        in_word += [k < len(word) for k in range(1, len(tokens))]
    out = run_rows(packed)
    bodies = torch.tensor([len(row.body) for row in rows])
    slot_hidden = out.hidden[torch.arange(len(rows)), (bodies - 1).to(out.hidden.device)]
    groups: dict[int, list[int]] = {}
    for r, row in enumerate(rows):
        groups.setdefault(id(row.classifier), []).append(r)
    first: list[torch.Tensor] = [slot_hidden[0, :0]] * len(rows)
    for members in groups.values():
        for r, scores in zip(members, _first_token_scores(rows[members[0]].classifier, slot_hidden[members])):
            first[r] = scores
    flat = torch.cat(first)
    after = torch.zeros_like(flat)
    if where:
        at = torch.tensor(where).to(out.hidden.device)
        logp = backbone.token_log_probs(out.hidden[at[:, 0], at[:, 1]], torch.tensor(targets))
        word = torch.tensor(in_word, device=logp.device)
        owner = torch.tensor(owners, device=logp.device)
        flat = flat.index_add(0, owner[word], logp[word])
        after = after.index_add(0, owner[~word], logp[~word])
    counts = torch.tensor([len(word) if rows[r].classifier.length_norm else 1 for r, word, _ in pairs])
    flat = flat / counts.to(flat.device) + after
    per_row = flat.split([len(row.classifier.choices.ids) for row in rows])
    result: list[torch.Tensor] = list(per_row)
    for members in groups.values():
        classifier = rows[members[0]].classifier
        labels = classifier.choices.label_scores(torch.stack([per_row[r] for r in members]))
        if classifier.log_prior is not None:
            labels = labels - classifier.log_prior.to(labels.device)
        for r, scores in zip(members, labels):
            result[r] = scores
    return result


@torch.inference_mode()
def packed_proba(classifier, rows, batch_size: int) -> torch.Tensor:
    """[N, L] probabilities by the packed reference, batched as `predict_proba` batches."""
    from softprompt.classify import RowToScore

    prefix = classifier.prefix(rows.encoded)
    probs = torch.zeros(len(rows), len(classifier.labels))
    for index in classifier.batches(rows, batch_size):
        batch = [RowToScore(classifier, prefix, rows.encoded.bodies[i], rows.encoded.afters[i]) for i in index]
        probs[index] = torch.softmax(torch.stack(packed_label_scores(batch)).float(), -1).cpu()
    return probs


def timed(score, classifier, examples) -> tuple[torch.Tensor, float]:
    """(the result, rows/s) of one scoring of the examples, encoding included."""
    started = time.perf_counter()
    result = score(classifier.encode([e.fields for e in examples]))
    return result, len(examples) / (time.perf_counter() - started)


def measure(classifier, examples, batch_size: int, packed: bool) -> tuple[dict, bool, torch.Tensor]:
    """Rows/s of each scoring path on the same rows, whether the pruned answers equal the full
    argmax, and the full probabilities."""
    import softprompt.classify as classify

    fed = []
    feed = classify._feed

    def counting(backbone, context, searches, nodes):
        fed.append(sum(map(len, nodes)))
        return feed(backbone, context, searches, nodes)

    results: dict = {}
    if packed:
        packed_probs, results["rows_per_s_packed"] = timed(
            lambda rows: packed_proba(classifier, rows, batch_size), classifier, examples
        )
    probs, results["rows_per_s_full"] = timed(lambda rows: classifier.predict_proba(rows, batch_size), classifier, examples)
    classify._feed = counting
    try:
        answers, results["rows_per_s_answer"] = timed(lambda rows: classifier.predict(rows, batch_size), classifier, examples)
    finally:
        classify._feed = feed
    identical = answers.tolist() == probs.argmax(-1).tolist()
    trie = classifier.trie([])
    tokens = [len(ids) for ids in classifier.choices.ids]
    results = {key: round(value, 2) for key, value in results.items()}
    results.update(
        labels=len(classifier.labels),
        label_tokens=sum(tokens),
        trie_nodes=len(trie.tokens),
        fed_per_row={
            **({"packed": sum(t - 1 for t in tokens)} if packed else {}),
            "full": len(trie.fed),
            "answer": round(sum(fed) / len(examples), 2),
        },
        answers_identical=identical,
    )
    if packed:
        results["packed_answers_identical"] = packed_probs.argmax(-1).tolist() == probs.argmax(-1).tolist()
        results["packed_max_abs_log_prob_gap"] = float((packed_probs.log() - probs.log()).abs().max())
    return results, identical, probs


def measure_label_vectors(many, examples, batch_size: int, full: torch.Tensor | None) -> dict:
    """Rows/s of per-label vectors on the same rows (the run's, or their start), and their accuracy
    there beside the frozen words' (`full`: the words' probabilities, when the start is measured)."""
    from softprompt.calibration import CONTENT_FREE
    from softprompt.classify import start_label_head

    head = many
    if many.label_head is None:
        fit = many.encode([{name: text for name in many.template.fields} for text in CONTENT_FREE if text])
        head = many.with_label_head(start_label_head(many, fit))
    probs, rows_per_s = timed(lambda rows: head.predict_proba(rows, batch_size), head, examples)
    results = {"rows_per_s_label_vectors": round(rows_per_s, 2)}
    truth = torch.tensor([many.labels.index(str(e.label)) for e in examples])
    results["label_vectors_accuracy"] = round(float((probs.argmax(-1) == truth).float().mean()), 4)
    if full is not None:
        results["words_accuracy"] = round(float((full.argmax(-1) == truth).float().mean()), 4)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=HERE.parent.parent / "shared" / "data" / "intent")
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--run", type=Path, help="a run trained on Banking77: its prompt, template and verbalizer")
    parser.add_argument("--no-packed", action="store_true", help="leave out the packed reference (the slowest path)")
    args = parser.parse_args()

    from softprompt import Backbone, Classifier, Template, Verbalizer, init_prompt
    from softprompt.artifact import load_classifier
    from softprompt.data import load_examples

    backbone = Backbone.load(args.model)
    if args.run is not None:
        many, _ = load_classifier(args.run, backbone)
        template, prompt = many.template, many.lm.prompt
    else:
        template = Template.parse(TEMPLATE)
        prompt = init_prompt("vocab", template.soft_tokens, backbone, seed=0)
        train = load_examples(args.data / "train.jsonl", template.fields, label_column="label")
        names = sorted({str(e.label) for e in train})
        many = Classifier(backbone, template, Verbalizer.from_spec({n: [n] for n in names}), prompt)
    dev = load_examples(args.data / "dev.jsonl", template.fields, label_column="label")
    examples = [dev[i] for i in torch.linspace(0, len(dev) - 1, min(args.rows, len(dev))).round().long().tolist()]
    two = Classifier(backbone, template, Verbalizer.from_spec(["positive", "negative"]), prompt)
    many.predict_proba(many.encode([e.fields for e in examples[:2]]))  # warm-up, untimed
    results: dict = {
        "rows": len(examples), "batch_size": args.batch_size, "model": args.model,
        "prompt": str(args.run) if args.run else "vocab init",
    }
    words = many.with_label_head(None)
    results["labels_77"], same_77, probs = measure(words, examples, args.batch_size, packed=not args.no_packed)
    results["labels_77"].update(measure_label_vectors(many, examples, args.batch_size, None if many.label_head else probs))
    print("labels_77", json.dumps(results["labels_77"]), flush=True)
    names = [*many.labels, *(n for n in MORE_INTENTS if n not in many.labels)]
    wider = Classifier(backbone, template, Verbalizer.from_spec({n: [n] for n in names}), prompt)
    results["labels_150"], same_150, _ = measure(wider, examples, args.batch_size, packed=not args.no_packed)
    print("labels_150", json.dumps(results["labels_150"]), flush=True)
    labels_2, same_2, _ = measure(two, examples, args.batch_size, packed=False)
    results["labels_2"] = {"rows_per_s": labels_2["rows_per_s_full"], **labels_2}
    print("labels_2", json.dumps(results["labels_2"]), flush=True)
    results["answers_identical"] = same_77 and same_150 and same_2
    print(json.dumps(results))


if __name__ == "__main__":
    main()
