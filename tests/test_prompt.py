import pytest
import torch

from softprompt.soft_prompt import InitError, SoftPrompt, init_prompt


@pytest.mark.parametrize("spec", ["random", "vocab", 'text:"Classify the review"', "labels"])
def test_every_init_gives_n_vectors_of_the_model_width(tiny_backbone, spec):
    prompt = init_prompt(spec, 7, tiny_backbone, label_words=["positive", "negative"], seed=1)
    assert prompt.vectors.shape == (7, tiny_backbone.hidden_size)
    assert prompt.vectors.dtype == torch.float32
    assert prompt.vectors.requires_grad


def test_text_init_repeats_the_text_embeddings(tiny_backbone):
    ids = tiny_backbone.tokenize("code")
    prompt = init_prompt("text:code", 3, tiny_backbone)
    expected = tiny_backbone.embed(torch.tensor((ids * 3)[:3])).float()
    torch.testing.assert_close(prompt.vectors.detach(), expected)


def test_labels_init_starts_with_the_label_words(tiny_backbone):
    prompt = init_prompt("labels", 4, tiny_backbone, label_words=["code"])
    word = tiny_backbone.embed(torch.tensor(tiny_backbone.tokenize(" code"))).float().mean(0)
    torch.testing.assert_close(prompt.vectors[0].detach(), word)


def test_unknown_init_is_a_clear_error(tiny_backbone):
    with pytest.raises(InitError, match="unknown init 'magic'"):
        init_prompt("magic", 3, tiny_backbone)


def test_save_and_load_round_trip_in_safetensors(tmp_path, tiny_backbone):
    prompt = init_prompt("random", 5, tiny_backbone)
    path = prompt.save(tmp_path)
    assert path.read_bytes()[:8] != b"\x80\x04\x95"  # not a pickle
    torch.testing.assert_close(SoftPrompt.load(tmp_path).vectors, prompt.vectors)


def test_nearest_tokens_of_a_token_embedding_is_that_token(tiny_backbone):
    ids = tiny_backbone.tokenize(" code")
    prompt = SoftPrompt(tiny_backbone.embed(torch.tensor(ids)))
    (best, similarity), *_ = prompt.nearest_tokens(tiny_backbone, k=3)[0]
    assert best == tiny_backbone.tokenizer.decode(ids)
    assert similarity == pytest.approx(1.0, abs=1e-5)


def test_a_prompt_made_from_a_texts_embeddings_reads_like_that_text(any_backbone):
    """Soft vectors live where the model's input embeddings do (after Gemma's sqrt(hidden) scaling):
    a prompt initialised from a text's tokens, in place of that text, gives the rows the same hidden
    states."""
    from softprompt.classify import Classifier
    from softprompt.template import Template
    from softprompt.verbalizer import Verbalizer

    verbalizer = Verbalizer.from_spec({"pos": ["great film"], "neg": ["dull"]})
    rows = [{"text": "a great film"}, {"text": "a dull, boring mess"}]
    n = len(any_backbone.tokenize("Review:"))
    as_text = Classifier(any_backbone, Template.parse("Review: {text} Sentiment: {label}"), verbalizer, None)
    as_soft = Classifier(
        any_backbone,
        Template.parse(f"{{soft:{n}}} {{text}} Sentiment: {{label}}"),
        verbalizer,
        init_prompt("text:Review:", n, any_backbone),
    )

    def hidden(clf):
        enc = clf.encode(rows).encoded
        with torch.no_grad():
            return clf.lm.run_rows(clf.lm.run_prefix(enc.prefix), enc.bodies).hidden

    torch.testing.assert_close(hidden(as_soft), hidden(as_text), atol=1e-5, rtol=1e-5)
