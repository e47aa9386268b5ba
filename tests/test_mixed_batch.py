"""Rows of different tasks (prompts, prompt lengths, templates, verbalizers, decoding settings) run
in one batch, and a row's scores and greedy tokens do not depend on its neighbours: alone or mixed,
they are the same. Checked on the tiny Llama and the tiny Gemma 3 (BOS, sliding-window layers)."""

import pytest
import torch

from softprompt.classify import Classifier, RowToScore, label_scores
from softprompt.generate import DecodeConfig, Decoding, Generator, RowToDecode
from softprompt.soft_prompt import init_prompt
from softprompt.template import Template
from softprompt.verbalizer import Verbalizer

TEXTS = ["a great film", "a dull, boring mess with many more words in it", "ok", "lovely and moving"]
CLASSIFIERS = [
    # one-token labels, a short prompt
    ("{soft:2} Review: {text} Sentiment: {label}", {"positive": ["code"], "negative": ["Sentiment"]}),
    # multi-token, multi-word labels, a longer prompt and a long fixed text
    (
        "{soft:7} Read the review below and say how the writer felt. Review: {text} Sentiment: {label}",
        {"pos": ["great film", "positive"], "neg": ["dull mess"], "meh": ["ok"]},
    ),
    # the label slot before the input (the seed's Portuguese form)
    ("{soft:3} Sentiment: {label}. Review: {text}", {"pos": ["positive"], "neg": ["negative"]}),
    # no soft tokens in the prefix: they follow the input
    ("Review: {text} {soft:4} Sentiment: {label}", {"pos": ["positive"], "neg": ["negative", "boring"]}),
    # no prefix at all on a model without BOS: the input opens the template
    ("{text} {soft:2} Sentiment: {label}", {"pos": ["great film"], "neg": ["dull mess"]}),
]
GENERATORS = [
    ("{soft:3} Code: {input} Summary: {target}", DecodeConfig(max_new_tokens=6)),
    ("{soft:9} Translate this to JavaScript please. Code: {input} JavaScript: {target}", DecodeConfig(max_new_tokens=9)),
    ("Code: {input} {soft:2} Summary: {target}", DecodeConfig(max_new_tokens=4, stop=["\n"])),
]


def _classifiers(backbone):
    out = []
    for seed, (template, words) in enumerate(CLASSIFIERS):
        t = Template.parse(template)
        out.append(Classifier(backbone, t, Verbalizer.from_spec(words), init_prompt("vocab", t.soft_tokens, backbone, seed=seed)))
    return out


def _label_row(clf, text):
    enc = clf.encode([{"text": text}]).encoded
    return RowToScore(clf, clf.prefix(enc), enc.bodies[0], enc.afters[0])


@torch.no_grad()
def test_a_rows_label_scores_are_the_same_alone_and_in_a_mixed_task_batch(any_backbone):
    classifiers = _classifiers(any_backbone)
    rows = [_label_row(clf, text) for text in TEXTS for clf in classifiers]  # interleaved tasks
    mixed = label_scores(rows)
    for row, together in zip(rows, mixed):
        alone = label_scores([row])[0]
        assert together.shape == (len(row.classifier.labels),)
        torch.testing.assert_close(together, alone, atol=2e-4, rtol=1e-4)


@torch.no_grad()
def test_single_task_scoring_is_the_one_task_case_of_the_mixed_path(tiny_backbone):
    clf = _classifiers(tiny_backbone)[1]
    enc = clf.encode([{"text": t} for t in TEXTS])
    probs = clf.predict_proba(enc, batch_size=4)
    mixed = label_scores([_label_row(clf, t) for t in TEXTS] + [_label_row(_classifiers(tiny_backbone)[0], "x")])
    expected = torch.stack([torch.softmax(s, -1) for s in mixed[: len(TEXTS)]])
    torch.testing.assert_close(probs.log(), expected.log(), atol=2e-4, rtol=1e-4)


def _gen_rows(backbone):
    rows = []
    for seed, (template, config) in enumerate(GENERATORS):
        t = Template.parse(template, slot="target")
        gen = Generator(backbone, t, init_prompt("vocab", t.soft_tokens, backbone, seed=seed + 5))
        for text in TEXTS:
            enc = gen.encode([{"input": text}]).encoded
            rows.append(RowToDecode(gen, gen.lm.run_prefix(enc.prefix), enc.bodies[0], config))
    return rows


def _decode(rows):
    decoding = Decoding(rows)
    while not decoding.done:
        decoding.step()
    return decoding.generated


@torch.no_grad()
def test_greedy_tokens_are_the_same_alone_and_in_a_mixed_task_batch(any_backbone):
    rows = _gen_rows(any_backbone)
    mixed = _decode(rows[::-1])[::-1]  # another order too: neighbours change
    for row, together in zip(rows, mixed):
        alone = _decode([row])[0]
        assert together == alone
        assert 1 <= len(alone) <= row.config.max_new_tokens


@torch.no_grad()
def test_each_row_of_a_mixed_decoding_stops_at_its_own_max_new_tokens(tiny_backbone):
    rows = _gen_rows(tiny_backbone)
    lengths = {len(tokens) for row, tokens in zip(rows, _decode(rows)) if row.config.max_new_tokens == 9}
    assert lengths == {9}  # the tiny random model never emits its end marker in 9 tokens


@pytest.mark.parametrize("batch_size", [1, 3])
@torch.no_grad()
def test_batch_generation_is_the_one_task_case_of_the_mixed_decoding(tiny_backbone, batch_size):
    template, config = GENERATORS[1]
    t = Template.parse(template, slot="target")
    gen = Generator(tiny_backbone, t, init_prompt("vocab", t.soft_tokens, tiny_backbone, seed=6))
    tokens = gen.generate_tokens(gen.encode([{"input": x} for x in TEXTS]), config, batch_size=batch_size)
    assert tokens == [_decode([r])[0] for r in _gen_rows(tiny_backbone)[4:8]]


@torch.no_grad()
def test_rows_that_join_a_running_decoding_decode_as_they_would_alone(any_backbone):
    rows = _gen_rows(any_backbone)
    decoding = Decoding(rows[:4])
    for _ in range(3):
        decoding.step()
    decoding.add(rows[4:9])  # other tasks, other prompt lengths, while the first rows are mid-answer
    decoding.step()
    decoding.add(rows[9:])
    while not decoding.done:
        decoding.step()
    assert decoding.generated == [_decode([row])[0] for row in rows]
