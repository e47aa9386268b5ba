"""The fast scoring path (shared prefix cache, label rows only) must equal a plain full-sequence
computation of the same log-probabilities, on the tiny Llama and on the tiny Gemma 3 (BOS token,
scaled embeddings, sliding-window layers with a window far shorter than the prompts)."""

import pytest
import torch

from softprompt.classify import Classifier
from softprompt.soft_prompt import init_prompt
from softprompt.template import Template
from softprompt.verbalizer import Verbalizer

from helpers import reference_label_scores

ROWS = [{"text": "a great film"}, {"text": "a dull, boring mess with many more words in it"}, {"text": "ok"}]
LONG_TEXT = "Read the review below and say how the writer felt about the film."  # > the 6-token window


@pytest.mark.parametrize(
    "template, words",
    [
        ("{soft:5} Review: {text} Sentiment: {label}", {"positive": ["positive"], "negative": ["negative"]}),
        (
            "{soft:5} Review: {text} Sentiment: {label}",
            {"pos": ["great film", "positive"], "neg": ["dull mess"]},
        ),
        ("{soft:3} Sentiment: {label}. Review: {text}", {"pos": ["positive"], "neg": ["negative"]}),
        ("Review: {text} {soft:4} Sentiment: {label}", {"pos": ["positive"], "neg": ["negative", "boring"]}),
        (
            "{soft:5} " + LONG_TEXT + " Review: {text} Sentiment: {label}",
            {"pos": ["great film", "positive"], "neg": ["dull mess"]},
        ),
        ("{soft:3} " + LONG_TEXT + " Sentiment: {label}. Review: {text}", {"pos": ["great film"], "neg": ["no"]}),
    ],
)
def test_cached_batched_scores_equal_full_sequence_reference(any_backbone, template, words):
    t = Template.parse(template)
    v = Verbalizer.from_spec(words)
    clf = Classifier(any_backbone, t, v, init_prompt("vocab", t.soft_tokens, any_backbone, seed=3))
    enc = clf.encode(ROWS)
    probs = clf.predict_proba(enc, batch_size=2)
    with torch.no_grad():
        expected = torch.softmax(torch.stack([reference_label_scores(clf, enc.encoded, r) for r in range(len(ROWS))]), -1)
    # in log space: the tiny random models put ~1e-5 on some labels, where probabilities hide errors
    torch.testing.assert_close(probs.log(), expected.log(), atol=2e-4, rtol=1e-4)


def test_single_token_words_never_project_the_whole_vocabulary(tiny_backbone, monkeypatch):
    t = Template.parse("{soft:2} Review: {text} Sentiment: {label}")
    v = Verbalizer.from_spec({"positive": ["code"], "negative": ["Sentiment"]})  # one token each here
    clf = Classifier(tiny_backbone, t, v, init_prompt("random", 2, tiny_backbone))
    assert clf.choices.single_token

    def forbidden(*args, **kwargs):
        raise AssertionError("full-vocabulary projection used")

    monkeypatch.setattr(tiny_backbone, "token_log_probs", forbidden)
    monkeypatch.setattr(tiny_backbone.model.lm_head, "forward", forbidden)
    assert clf.predict_proba(clf.encode(ROWS)).shape == (3, 2)


def test_gradient_reaches_every_soft_vector_through_the_shared_prefix(tiny_backbone):
    t = Template.parse("{soft:4} Review: {text} Sentiment: {label}")
    v = Verbalizer.from_spec({"pos": ["great film"], "neg": ["negative"]})
    prompt = init_prompt("vocab", 4, tiny_backbone)
    clf = Classifier(tiny_backbone, t, v, prompt)
    enc = clf.encode(ROWS, ["pos", "neg", "neg"])
    clf.loss(enc, [0, 1, 2]).backward()
    assert prompt.vectors.grad is not None
    assert (prompt.vectors.grad.norm(dim=-1) > 0).all()
    assert all(p.grad is None for p in tiny_backbone.model.parameters())


def test_results_do_not_depend_on_batch_composition(any_backbone):
    t = Template.parse("{soft:3} Review: {text} Sentiment: {label}")
    v = Verbalizer.from_spec({"pos": ["great film"], "neg": ["negative"]})
    clf = Classifier(any_backbone, t, v, init_prompt("vocab", 3, any_backbone))
    enc = clf.encode(ROWS)
    together = clf.predict_proba(enc, batch_size=3)
    alone = clf.predict_proba(enc, batch_size=1)
    torch.testing.assert_close(together.log(), alone.log(), atol=2e-4, rtol=1e-4)


def test_a_labels_score_is_the_log_of_the_mean_probability_of_its_words():
    """Words with probabilities 0.5 and 0.1 give their label log(0.3): neither the best word (0.5)
    nor the sum (0.6)."""
    import math

    from softprompt.verbalizer import Choices

    choices = Choices([[1], [2], [3]], torch.tensor([0, 0, 1]), 2)
    scores = choices.label_scores(torch.log(torch.tensor([[0.5, 0.1, 0.2]])))
    torch.testing.assert_close(scores, torch.tensor([[math.log(0.3), math.log(0.2)]]))


def test_gemma_rows_start_with_its_bos_token_and_llama_rows_with_none(tiny_backbone, tiny_gemma):
    t = Template.parse("{soft:2} Review: {text} Sentiment: {label}")
    v = Verbalizer.from_spec(["positive", "negative"])
    gemma = Classifier(tiny_gemma, t, v, init_prompt("vocab", 2, tiny_gemma)).encode(ROWS).encoded
    assert gemma.prefix[:2] == [tiny_gemma.tokenizer.bos_token_id, -1]
    llama = Classifier(tiny_backbone, t, v, init_prompt("vocab", 2, tiny_backbone)).encode(ROWS).encoded
    assert llama.prefix[0] == -1
