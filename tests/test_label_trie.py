"""The label trie and the pruned answer. Label words share prefixes; every distinct prefix is fed once
per row under a tree mask (a node sees the row and its own ancestors, nothing else), and the scores
must equal a plain full-sequence forward of each label after the row. The pruned search must give
exactly the full scores' best labels. On the tiny Llama and the tiny Gemma 3 (BOS token, scaled
embeddings, sliding-window layers with a window far shorter than the prompts)."""

import json
import math
import random

import pytest
import torch

import softprompt.classify as classify
import softprompt.vocab_bound as vocab_bound
from softprompt.backbone import Backbone, Layout
from softprompt.classify import Classifier, RowToScore, _first_token_scores, label_answers, label_scores
from softprompt.soft_prompt import init_prompt
from softprompt.template import Template
from softprompt.verbalizer import Verbalizer

from conftest import build_tiny_gemma, build_tiny_model

AFTER = "{soft:4} Review: {text} Sentiment: {label}"
BEFORE = "{soft:3} Sentiment: {label}. Review: {text}"
LONG = "{soft:3} Read the review below and say how the writer felt about the film. Review: {text} Sentiment: {label}"
# On the tiny tokenizer " great" is a word of its own and the first tokens of "great film", "great
# fun" and "great and lovely"; " dull" those of "dull mess" and "dull, boring"; " a" those of the last two.
SHARED = {
    "pos": ["great film", "great and lovely"],
    "fun": ["great fun"],
    "great": ["great"],
    "neg": ["dull mess", "dull, boring", "a dull film"],
    "dull": ["dull"],
    "moving": ["a moving film"],
}
WORDS = [w for ws in SHARED.values() for w in ws] + ["boring", "boring film", "code", "code summary", "ok", "no"]
TEXTS = ["a great film", "a dull, boring mess with many more words in it", "ok", "lovely and moving", "code"]


def taught_the_words(folder) -> Backbone:
    """A tiny model taught the label words for a second, so that it predicts the rest of a word
    from its first tokens as a real model does: a label's later tokens then cost little, and a
    bound loosened by a fraction of a nat stops the search on a wrong answer (on the random models
    every later token costs ~log(400) nats, which hides a loose bound)."""
    backbone = Backbone.load(str(folder), device="cpu")
    rng = random.Random(0)
    texts = [" " + " ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(64)]
    ids = torch.tensor([t[:24] for t in backbone.tokenize_many(texts) if len(t) >= 24])
    params = list(backbone.model.parameters())
    optimizer = torch.optim.Adam(params, lr=1e-2)
    with torch.enable_grad():
        for p in params:
            p.requires_grad_(True)
        for _ in range(100):
            optimizer.zero_grad()
            backbone.model(input_ids=ids, labels=ids).loss.backward()
            optimizer.step()
        for p in params:
            p.requires_grad_(False)
    return backbone


@pytest.fixture(scope="module")
def knowing_llama(tmp_path_factory):
    return taught_the_words(build_tiny_model(tmp_path_factory.mktemp("knowing-llama")))


@pytest.fixture(scope="module")
def knowing_gemma(tmp_path_factory):
    return taught_the_words(build_tiny_gemma(tmp_path_factory.mktemp("knowing-gemma")))


@pytest.fixture(params=["llama", "gemma"])
def knowing(request):
    """Each taught tiny model in turn."""
    return request.getfixturevalue(f"knowing_{request.param}")


def classifier(backbone, template, words, seed=0, mean=False, learned=False, prior=False):
    t = Template.parse(template)
    clf = Classifier(backbone, t, Verbalizer.from_spec(words), init_prompt("vocab", t.soft_tokens, backbone, seed=seed), length_norm=mean)
    g = torch.Generator().manual_seed(seed)
    if learned:  # label vectors moved away from the output rows, sharper than the tiny model's own
        rows = backbone.output_rows(clf.choices.first_ids).cpu()
        clf = clf.with_label_rows(rows * 3 + torch.randn(rows.shape, generator=g))
    if prior:
        clf = clf.calibrated(torch.rand(len(clf.labels), generator=g) + 0.05)
    return clf


def rows_of(clf, texts):
    enc = clf.encode([{"text": t} for t in texts]).encoded
    prefix = clf.prefix(enc)
    return [RowToScore(clf, prefix, b, a) for b, a in zip(enc.bodies, enc.afters)]


@torch.no_grad()
def full_sequence_scores(row: RowToScore) -> torch.Tensor:
    """[L] one row's label scores from plain forwards, no cache, no trie: each choice's word and what
    follows the slot run after the row's whole prompt; its first token read at the slot as the
    classifier reads it (label rows, learned or the model's), the rest normalised over the whole
    vocabulary; the word's part averaged with `length_norm`; the verbalizer's formula, the prior."""
    clf, backbone = row.classifier, row.classifier.backbone
    enc = clf.encode([{"text": "x"}]).encoded  # only for the prefix ids, which every row shares
    context = enc.prefix + row.body
    scores = []
    for c, word in enumerate(clf.choices.ids):
        tokens = word + row.after
        hidden = backbone.body(inputs_embeds=clf.lm.splice(torch.tensor([context + tokens]))).last_hidden_state[0]
        first = _first_token_scores(clf, hidden[len(context) - 1 : len(context)])[0, c]
        logp = torch.log_softmax(backbone.logits(hidden), -1)
        rest = [logp[len(context) - 1 + j, t] for j, t in enumerate(tokens) if j > 0]
        in_word, after = first + sum(rest[: len(word) - 1]), sum(rest[len(word) - 1 :])
        scores.append((in_word / len(word) if clf.length_norm else in_word) + after)
    labels = clf.choices.label_scores(torch.stack(scores).unsqueeze(0))[0]
    return labels - clf.log_prior if clf.log_prior is not None else labels


def full_order(scores: torch.Tensor) -> list[int]:
    """Label indices by score, best first, ties to the lower index."""
    return sorted(range(len(scores)), key=lambda i: -float(scores[i]))


# -- the tree mask ----------------------------------------------------------------------------------
def test_a_tree_node_sees_the_row_and_its_own_ancestors_and_nothing_else(tiny_backbone):
    """Two row tokens, then a tree in pre-order: 0 -> (1 -> 2, 3), 4 -> 5."""
    parent = [-1, 0, 1, 1, -1, 4]
    last = [3, 3, 2, 3, 5, 5]
    depth = [1, 2, 3, 3, 1, 2]
    positions = torch.tensor([[0, 1] + [1 + d for d in depth]])
    layout = Layout.of(positions, nodes=torch.tensor([[-1, -1] + list(range(6))]), last=torch.tensor([[-1, -1] + last]))
    seen = tiny_backbone.attention_masks(layout, layout)[0, 0] == 0

    def ancestors(k):
        return {k} | (ancestors(parent[k]) if parent[k] >= 0 else set())

    for q in range(6):
        expected = [True, True] + [k in ancestors(q) for k in range(6)]
        assert seen[2 + q].tolist() == expected, f"node {q}"


# -- trie scores against the full-sequence reference ------------------------------------------------
@pytest.mark.parametrize("template", [AFTER, BEFORE, LONG])
@pytest.mark.parametrize(
    "settings",
    [{}, {"mean": True}, {"learned": True}, {"learned": True, "mean": True}, {"prior": True}],
    ids=["sum", "mean", "label-rows", "label-rows-mean", "prior"],
)
def test_trie_scores_equal_the_full_sequence_reference(any_backbone, template, settings):
    clf = classifier(any_backbone, template, SHARED, seed=3, **settings)
    rows = rows_of(clf, TEXTS[:3])
    with torch.no_grad():
        got = label_scores(rows)
    for row, scores in zip(rows, got):
        # exact values: first tokens are read as the classifier reads them on both sides
        torch.testing.assert_close(scores, full_sequence_scores(row), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("template", [AFTER, BEFORE])
def test_each_distinct_prefix_is_fed_once_per_row(tiny_backbone, monkeypatch, template):
    clf = classifier(tiny_backbone, template, SHARED)
    rows = rows_of(clf, TEXTS[:2])
    fed = []
    run_rows = classify.run_rows

    def spy(batch):
        fed.extend(len(b.ids) - len(r.body) for b, r in zip(batch, rows))
        return run_rows(batch)

    monkeypatch.setattr(classify, "run_rows", spy)
    with torch.no_grad():
        label_scores(rows)
    for row, count in zip(rows, fed):
        sequences = [word + row.after for word in clf.choices.ids]
        prefixes = {tuple(s[:j]) for s in sequences for j in range(1, len(s))}  # those with a token after them
        assert count == len(prefixes) < sum(len(s) - 1 for s in sequences)


def test_single_token_labels_are_answered_from_the_rows_own_pass(tiny_backbone, monkeypatch):
    clf = classifier(tiny_backbone, AFTER, {"positive": ["code"], "negative": ["Sentiment"]})
    assert clf.choices.single_token
    rows = rows_of(clf, TEXTS)

    def forbidden(*args, **kwargs):
        raise AssertionError("a label token fed, or the whole vocabulary projected")

    monkeypatch.setattr(tiny_backbone, "logits", forbidden)
    run = tiny_backbone.run
    calls = []
    monkeypatch.setattr(tiny_backbone, "run", lambda *a, **k: calls.append(1) or run(*a, **k))
    with torch.no_grad():
        assert [top[0] for top in label_answers(rows)] == [full_order(s)[0] for s in label_scores(rows)]
    assert len(calls) == 2  # one row pass each: label_answers, then label_scores


# -- the pruned answer ------------------------------------------------------------------------------
def random_task(backbone, rng: random.Random, seed: int):
    """A random verbalizer over words with shared prefixes, a random template and settings."""
    words = rng.sample(WORDS, rng.randint(3, 9))
    labels = {}
    while words:
        take = rng.randint(1, min(3, len(words)))
        labels[f"l{len(labels)}"], words = words[:take], words[take:]
    if len(labels) < 2:
        labels["extra"] = ["ok"] if "ok" not in str(labels) else ["no"]
    settings = {"mean": rng.random() < 0.4, "learned": rng.random() < 0.4, "prior": rng.random() < 0.4}
    return classifier(backbone, rng.choice([AFTER, BEFORE, LONG]), labels, seed=seed, **settings)


@pytest.fixture(params=["tight", "loose"])
def bounds(request, monkeypatch):
    """The search's score bounds as they come (on a tiny vocabulary every cluster is scored exactly,
    so a bound is the exact score), and loose: one cluster of ~25 scored exactly, the rest by their
    means, so that many labels are ruled out by bounds alone and the winners must be resolved."""
    if request.param == "loose":
        monkeypatch.setattr(vocab_bound, "EXACT_CLUSTERS", 1)
    return request.param


@pytest.mark.parametrize("model", ["tiny_backbone", "tiny_gemma", "knowing_llama", "knowing_gemma"])
@pytest.mark.parametrize("seed", range(4))
def test_pruned_answers_equal_the_full_argmax_on_random_rows_and_label_sets(request, model, seed, bounds):
    backbone = request.getfixturevalue(model)
    rng = random.Random(seed)
    for task in range(8):
        clf = random_task(backbone, rng, seed * 10 + task)
        rows = rows_of(clf, rng.sample(TEXTS, 4))
        with torch.no_grad():
            answers = label_answers(rows)
            full = label_scores(rows)
        assert [a[0] for a in answers] == [full_order(s)[0] for s in full], clf.verbalizer.words


@pytest.mark.parametrize("k", [2, 3, 10])
def test_pruned_top_k_equals_the_full_order(knowing, k, bounds):
    rng = random.Random(k)
    for task in range(6):
        clf = random_task(knowing, rng, task)
        rows = rows_of(clf, TEXTS)
        with torch.no_grad():
            answers = label_answers(rows, k)
            full = label_scores(rows)
        assert answers == [full_order(s)[:k] for s in full]


def test_pruned_answers_in_a_mixed_task_batch_equal_each_rows_full_order(any_backbone):
    tasks = [classifier(any_backbone, t, SHARED, seed=i, **s) for i, (t, s) in enumerate(
        [(AFTER, {}), (BEFORE, {"mean": True}), (LONG, {"learned": True, "prior": True})]
    )]
    rows = [row for text in TEXTS for clf in tasks for row in rows_of(clf, [text])]  # interleaved tasks
    with torch.no_grad():
        answers = label_answers(rows, 2)
        for row, answer in zip(rows, answers):
            assert answer == full_order(label_scores([row])[0])[:2]


def test_the_pruned_answer_leaves_most_of_the_trie_unfed_when_the_model_is_sure(tiny_backbone, monkeypatch):
    """A prior that all but names "pos": its path is expanded, hardly anything else."""
    prior = torch.ones(len(SHARED))
    prior[list(SHARED).index("pos")] = 1e-12
    clf = classifier(tiny_backbone, AFTER, SHARED).calibrated(prior)
    run, fed = tiny_backbone.run, []

    def spy(embeds, layout, context=None):
        fed.append(int(layout.real.sum()) if context is not None and layout.positions.shape[1] == 1 else 0)
        return run(embeds, layout, context)

    monkeypatch.setattr(tiny_backbone, "run", spy)
    with torch.no_grad():
        answers = clf.predict(clf.encode([{"text": t} for t in TEXTS]))
    assert answers.tolist() == [list(SHARED).index("pos")] * len(TEXTS)
    whole = len(clf.trie([]).fed) * len(TEXTS)
    assert 0 < sum(fed) <= whole / 2


@pytest.mark.parametrize("template", [AFTER, LONG])
def test_a_search_over_rows_passed_in_parts_gives_each_rows_full_order(any_backbone, template, bounds):
    """`top_labels` runs the rows' own pass a batch at a time and searches them together: the parts'
    keys are joined, padded to the longest part (rows of unequal length, so the padding matters)."""
    clf = classifier(any_backbone, template, SHARED, seed=3)
    rows = rows_of(clf, TEXTS)
    every = len(clf.labels)
    with torch.no_grad():
        full = [full_order(s) for s in label_scores(rows)]
        for size in (1, 2, 3):
            assert label_answers(rows, every, pass_rows=size) == full


def test_every_fed_node_comes_after_or_with_its_parent(knowing, monkeypatch, bounds):
    """A step's padding slots carry further nodes of its labels' paths (`_Search.filled`): a node's
    state is only right when its parent was fed before it or in the same step (the tree mask)."""
    feed, orphans, with_parent = classify._feed, [], []

    def checking(backbone, context, searches, nodes):
        for search, row in zip(searches, nodes):
            parents = [search.trie.parent[n] for n in row]
            orphans.extend(n for n, p in zip(row, parents) if p >= 0 and p not in search.states and p not in row)
            with_parent.extend(n for n, p in zip(row, parents) if p in row)
        return feed(backbone, context, searches, nodes)

    monkeypatch.setattr(classify, "_feed", checking)
    rng = random.Random(5)
    for task in range(6):
        clf = random_task(knowing, rng, task)
        with torch.no_grad():
            label_answers(rows_of(clf, TEXTS), 3)
    assert with_parent and orphans == []


def test_predict_is_the_argmax_of_predict_proba(tiny_backbone):
    clf = classifier(tiny_backbone, AFTER, SHARED, learned=True, prior=True)
    enc = clf.encode([{"text": t} for t in TEXTS])
    assert clf.predict(enc, batch_size=2).tolist() == clf.predict_proba(enc, batch_size=2).argmax(-1).tolist()
    top = clf.top_labels(enc, 3, batch_size=3)
    assert top.tolist() == [full_order(p.log())[:3] for p in clf.predict_proba(enc)]


def test_a_labels_bound_is_the_verbalizer_formula_of_its_words_bounds():
    """log of the mean word probability is increasing in every word's score, so bounds on the words
    bound the label: the check the search's stopping rule rests on."""
    from softprompt.verbalizer import Choices

    choices = Choices([[1], [2], [3]], torch.tensor([0, 0, 1]), 2)
    exact = torch.log(torch.tensor([[0.2, 0.05, 0.3]]))
    bound = exact + torch.tensor([[0.0, 0.7, 0.0]])  # the second word not yet complete
    assert (choices.label_scores(bound) >= choices.label_scores(exact)).all()
    assert math.isclose(float(choices.label_scores(exact)[0, 0]), math.log(0.125), rel_tol=1e-6)


# -- the answer paths: eval and predict --no-probabilities, serve without probabilities -------------
@pytest.fixture(scope="module")
def shared_run(tmp_path_factory, tiny_backbone):
    """A run folder of the many-label task (a seeded prompt) and labelled rows for it."""
    from helpers import write_run

    folder = tmp_path_factory.mktemp("trie-run")
    write_run(folder / "run", tiny_backbone, AFTER, SHARED)
    labels = list(SHARED)
    rows = [{"text": t, "label": labels[i % len(labels)]} for i, t in enumerate(TEXTS * 2)]
    (folder / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_eval_and_predict_without_probabilities_give_the_full_scorings_labels(shared_run, tiny_backbone, monkeypatch):
    from typer.testing import CliRunner

    from softprompt.artifact import load_run
    from softprompt.cli import app

    model, _ = load_run(shared_run / "run", tiny_backbone)
    rows = model.encode([{"text": t} for t in TEXTS * 2], [list(SHARED)[i % len(SHARED)] for i in range(len(TEXTS) * 2)])
    expected = model.predict_proba(rows).argmax(-1)
    searched = []
    monkeypatch.setattr(classify, "label_answers", lambda *a, **k: searched.append(1) or label_answers(*a, **k))
    runner = CliRunner()
    report = runner.invoke(app, ["eval", str(shared_run / "run"), "--data", str(shared_run / "dev.jsonl"), "--json"])
    assert report.exit_code == 0, report.output
    accuracy = json.loads(report.stdout.strip().splitlines()[-1])["accuracy"]
    assert accuracy == pytest.approx(float((expected == rows.labels).float().mean()))
    out = shared_run / "labels.jsonl"
    args = ["predict", str(shared_run / "run"), "--input", str(shared_run / "dev.jsonl"), "--out", str(out)]
    assert runner.invoke(app, [*args, "--no-probabilities"]).exit_code == 0
    predicted = [json.loads(line) for line in out.read_text().splitlines()]
    assert [p["label"] for p in predicted] == [list(SHARED)[i] for i in expected]
    assert all("probabilities" not in p for p in predicted)
    assert len(searched) == 2  # eval and predict each took the pruned search (one batch of 10 rows)


def test_serve_answers_a_label_without_probabilities_by_the_pruned_search(shared_run, tiny_backbone, monkeypatch):
    import httpx
    from serving import running_server

    import softprompt.serve.bank as bank_module
    from softprompt.serve.bank import TaskBank

    bank = TaskBank(tiny_backbone, allow=[shared_run])
    bank.load("multi", shared_run / "run")
    searched = []
    monkeypatch.setattr(bank_module, "label_answers", lambda *a, **k: searched.append(1) or label_answers(*a, **k))
    inputs = [{"text": t} for t in TEXTS]
    with running_server(bank) as base, httpx.Client(base_url=base, timeout=60) as client:
        full = client.post("/v1/classify", json={"task": "multi", "inputs": inputs}).json()["results"]
        assert not searched  # every probability asked for: the whole trie
        short = client.post("/v1/classify", json={"task": "multi", "inputs": inputs, "probabilities": False}).json()
        completion = client.post("/v1/completions", json={"model": "multi", "prompt": TEXTS}).json()
    assert [r["label"] for r in short["results"]] == [r["label"] for r in full]
    assert all("probabilities" not in r and r["prompt_tokens"] > 0 for r in short["results"])
    assert [c["text"] for c in completion["choices"]] == [r["label"] for r in full]
    assert len(searched) == 2
