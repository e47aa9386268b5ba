import pytest
import torch

from softprompt.generate import DecodeConfig, Decoding, Generator, RowToDecode, answer_text, stopped
from softprompt.soft_prompt import init_prompt
from softprompt.template import Template, TemplateError

from helpers import transformers_greedy

ROWS = [
    {"input": "def add(a, b): return a + b"},
    {"input": "x"},
    {"input": "Preciso marcar um horário com o gerente para amanhã, por favor, obrigado"},
]


def make(backbone, template="{soft:4} Code: {input} Summary: {target}"):
    t = Template.parse(template, slot="target")
    prompt = init_prompt("vocab", t.soft_tokens, backbone, seed=2) if t.soft_tokens else None
    return Generator(backbone, t, prompt)


def test_greedy_with_soft_tokens_in_a_mixed_batch_equals_transformers_generate_on_inputs_embeds(any_backbone):
    """Each row, decoded in one right-padded batch from the shared prefix cache, gives the tokens that
    transformers' own generate gives for that row alone with the prompt spliced into inputs_embeds
    (on Gemma the sequences are longer than its sliding window)."""
    gen = make(any_backbone)
    rows = gen.encode(ROWS)
    ours = gen.generate_tokens(rows, DecodeConfig(max_new_tokens=8), batch_size=3)
    for r in range(len(ROWS)):
        assert ours[r] == transformers_greedy(gen, rows.encoded.prefix + rows.encoded.bodies[r], 8)


def test_greedy_equals_transformers_generate_without_soft_tokens(tiny_backbone):
    gen = make(tiny_backbone, "Code: {input} Summary: {target}")
    rows = gen.encode(ROWS[:1])
    ids = torch.tensor([rows.encoded.prefix + rows.encoded.bodies[0]])
    expected = tiny_backbone.model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=6,
        do_sample=False,
        eos_token_id=None,
        pad_token_id=0,
    )[0, ids.shape[1] :]
    ours = gen._sample(
        gen.lm.run_prefix(rows.encoded.prefix), rows.encoded.bodies, DecodeConfig(max_new_tokens=6), None
    )
    assert ours[0] == expected.tolist()


@pytest.mark.parametrize("beams", [1, 3])
def test_a_row_decodes_the_same_alone_and_in_a_mixed_length_batch(any_backbone, beams):
    gen = make(any_backbone)
    rows = gen.encode(ROWS)
    config = DecodeConfig(max_new_tokens=8, num_beams=beams)
    together = gen.generate(rows, config, batch_size=3)
    alone = [gen.generate(gen.encode([row]), config, batch_size=1)[0] for row in ROWS]
    assert together == alone


def test_beam_search_finds_a_sequence_at_least_as_likely_as_greedy(tiny_backbone):
    gen = make(tiny_backbone)
    rows = gen.encode(ROWS[:1])
    prefix = gen.lm.run_prefix(rows.encoded.prefix)
    greedy = gen._sample(prefix, rows.encoded.bodies, DecodeConfig(max_new_tokens=5), None)[0]
    beam = gen.beam_search(
        prefix, rows.encoded.bodies, DecodeConfig(max_new_tokens=5, num_beams=4, length_penalty=0)
    )[0]

    def logprob(tokens):
        with torch.no_grad():
            out = gen.lm.run_rows(prefix, [rows.encoded.bodies[0] + tokens])
            start = len(rows.encoded.bodies[0]) - 1
            hidden = out.hidden[0, start : start + len(tokens)]
            return float(tiny_backbone.token_log_probs(hidden, torch.tensor(tokens)).sum())

    assert logprob(beam) >= logprob(greedy) - 1e-4


def test_sampling_is_reproducible_with_a_seed(tiny_backbone):
    gen = make(tiny_backbone)
    rows = gen.encode(ROWS)
    config = DecodeConfig(max_new_tokens=6, do_sample=True, temperature=1.0, top_p=0.9, seed=7)
    assert gen.generate(rows, config) == gen.generate(rows, config)


def test_stop_strings_cut_the_answer(tiny_backbone):
    gen = make(tiny_backbone)
    rows = gen.encode(ROWS[:1])
    full = gen.generate(rows, DecodeConfig(max_new_tokens=10))[0]
    assert len(full) > 2
    marker = full[1:3]
    cut = gen.generate(rows, DecodeConfig(max_new_tokens=10, stop=[marker]))[0]
    assert marker not in cut and full.startswith(cut)


def test_generation_loss_trains_the_prompt_and_ignores_batch_neighbours(tiny_backbone):
    gen = make(tiny_backbone)
    rows = gen.encode(ROWS, ["adds two numbers", "x", "a meeting request"])
    assert all(t[-1] == gen.eos_id for t in rows.targets)
    loss = gen.loss(rows, [0, 1, 2])
    loss.backward()
    assert gen.lm.prompt.vectors.grad.abs().sum() > 0
    # changing the input but not the target changes the loss; padding others in the batch does not
    alone = gen.loss(rows, [1])
    with_others = gen.loss(gen.encode([ROWS[1]], ["x"]), [0])
    torch.testing.assert_close(alone, with_others)


def test_loss_is_the_mean_cross_entropy_of_exactly_the_target_tokens_and_end_marker(any_backbone):
    """Against a plain full-sequence forward: loss = mean over every target token and the end
    marker of -log p(token | everything before it); no input token carries loss."""
    gen = make(any_backbone)
    targets = ["adds two numbers", "x", "a meeting request"]
    rows = gen.encode(ROWS, targets)
    assert [any_backbone.tokenizer.decode(t[:-1]) for t in rows.targets] == [" " + t for t in targets]
    losses = []
    with torch.no_grad():
        for r in range(len(ROWS)):
            context = rows.encoded.prefix + rows.encoded.bodies[r]
            ids = torch.tensor([context + rows.targets[r]])
            hidden = any_backbone.body(inputs_embeds=gen.lm.splice(ids)).last_hidden_state[0]
            logp = torch.log_softmax(any_backbone.model.lm_head(hidden), -1)
            losses += [-logp[len(context) - 1 + k, t] for k, t in enumerate(rows.targets[r])]
        expected = torch.stack(losses).mean()
        torch.testing.assert_close(gen.loss(rows, [0, 1, 2]), expected, atol=1e-5, rtol=1e-5)


def test_a_long_answer_budget_never_eats_the_input(tiny_backbone):
    """Training rows (with targets) keep the same whole input as rows in use, even when the answer
    budget equals the prompt budget (which used to leave the input a single token)."""
    t = Template.parse("{soft:4} Code: {input} Summary: {target}", slot="target")
    gen = Generator(tiny_backbone, t, init_prompt("vocab", 4, tiny_backbone), max_length=64, max_target_length=64)
    training = gen.encode(ROWS, ["adds", "x", "a meeting request " * 20])
    assert training.encoded.bodies == gen.encode(ROWS).encoded.bodies
    assert training.encoded.cut == [0, 0, 0]
    assert ROWS[2]["input"] in tiny_backbone.tokenizer.decode(training.encoded.bodies[2])
    assert training.target_cut[2] > 0 and len(training.targets[2]) == 64


def test_a_prompt_whose_length_differs_from_the_templates_soft_tokens_is_refused(tiny_backbone):
    t = Template.parse("{soft:4} Code: {input} Summary: {target}", slot="target")
    with pytest.raises(ValueError, match="the prompt has 3 vectors, the template 4 soft tokens"):
        Generator(tiny_backbone, t, init_prompt("vocab", 3, tiny_backbone))


def test_generation_templates_must_end_with_the_target(tiny_backbone):
    with pytest.raises(TemplateError, match="nothing but text may follow"):
        Template.parse("{soft:2} {target} Code: {input}", slot="target")


def test_a_leading_newline_does_not_trigger_a_newline_stop_string(tiny_backbone):
    tokens = tiny_backbone.tokenize("\ncode\nmore")
    assert answer_text(tiny_backbone, tokens, ["\n"]) == "code"
    assert not stopped(tiny_backbone, tiny_backbone.tokenize("\n"), ["\n"])
    assert stopped(tiny_backbone, tokens, ["\n"])


def _keep_joining(decoding_rows, live: int, on_step=None) -> dict[int, list[int]]:
    """Decode `decoding_rows` `live` at a time, a waiting row joining as soon as another finishes (a
    decoding that never drains while rows wait), answered rows forgotten; each row's tokens, by its
    place in the list."""
    waiting = list(range(len(decoding_rows)))
    decoding, owner, answers = None, {}, {}
    while waiting or not decoding.done:
        room = live - (0 if decoding is None else len(decoding.active))
        joining, waiting = waiting[:room], waiting[room:]
        if joining:
            rows = [decoding_rows[i] for i in joining]
            first = 0 if decoding is None else len(decoding.rows)
            if decoding is None:
                decoding = Decoding(rows)
            else:
                decoding.add(rows)
            owner.update({first + k: i for k, i in enumerate(joining)})
        for row, _token, finished in decoding.step():
            if finished:
                answers[owner[row]] = list(decoding.generated[row])
                decoding.release(row)
        if decoding.released >= live:  # forget the answered rows' places, as the server does
            owner = {new: owner[old] for old, new in decoding.compact().items()}
        if on_step is not None:
            on_step(decoding)
    return answers


def _joining_rows(backbone, n: int):
    gens = [make(backbone), make(backbone, "{soft:6} Translate it to JavaScript. Code: {input} JavaScript: {target}")]
    rows = []
    for k in range(n):
        gen = gens[k % 2]
        enc = gen.encode([ROWS[k % len(ROWS)]]).encoded
        config = DecodeConfig(max_new_tokens=2 + (5 * k) % 9)  # 2 to 10 tokens: rows finish at different steps
        rows.append(RowToDecode(gen, gen.lm.run_prefix(enc.prefix), enc.bodies[0], config))
    return rows


@torch.no_grad()
def test_a_decoding_that_never_drains_keeps_its_cache_bounded_and_each_row_decodes_as_alone(any_backbone):
    """Rows keep joining as others finish (160 rows, 4 live, ~240 steps): the key/value cache stays
    within twice what its longest live row needs, never growing with the steps, the decoding keeps a
    place for only a few rows, and every row's tokens are the tokens it gets decoded alone."""
    rows = _joining_rows(any_backbone, 160)
    need = max(r.prefix.length + len(r.body) + r.config.max_new_tokens for r in rows)
    widths, batches, places = [], [], []

    def measure(decoding):
        places.append(len(decoding.rows))
        if decoding.done:
            return
        keys = decoding.context.cache.layers[0].keys
        assert keys.shape[2] == decoding.context.layout.positions.shape[1]
        widths.append(keys.shape[2])
        batches.append(keys.shape[0])

    answers = _keep_joining(rows, live=4, on_step=measure)
    assert len(widths) > 2 * need  # long enough that a cache growing a key per step would pass the bound
    assert max(widths) <= 2 * need + 1 and max(batches) <= 4 and max(places) <= 2 * 4
    assert [answers[i] for i in range(len(rows))] == [_keep_joining([row], live=1)[0] for row in rows]


def test_top_p_sampling_never_picks_a_token_outside_the_nucleus(tiny_backbone, monkeypatch):
    """Logits fixed at p = 0.4 and 0.3 for two tokens and 0.3 spread over the rest: with top_p 0.6
    the nucleus is those two tokens (0.4 < 0.6 <= 0.7), so no sampled token is another one (without
    the filter, 0.3 of every draw would fall outside)."""
    gen = make(tiny_backbone)
    vocab = tiny_backbone.logits(torch.zeros(1, tiny_backbone.hidden_size)).shape[-1]
    inside = [10, 11]
    probs = torch.full((vocab,), 0.3 / (vocab - 2))
    probs[inside] = torch.tensor([0.4, 0.3])
    monkeypatch.setattr(tiny_backbone, "logits", lambda hidden: probs.log().expand(hidden.shape[0], -1).clone())
    config = DecodeConfig(max_new_tokens=20, do_sample=True, top_p=0.6, seed=3)
    drawn = [t for tokens in gen.generate_tokens(gen.encode(ROWS), config) for t in tokens]
    assert len(drawn) == 60 and set(drawn) == set(inside)


class _Ids:
    """A stand-in cache for beam search over a hand-made model: it holds nothing (the state is in
    the hidden vector), so reordering it is a no-op."""

    def repeat_interleave(self, n):
        pass

    def select(self, index):
        pass


@pytest.mark.parametrize(("penalty", "winner"), [(0.0, [2, 1]), (1.0, [2, 1]), (2.0, [3, 4, 1])])
def test_beam_search_length_penalty_decides_between_a_short_and_a_long_answer(tiny_backbone, monkeypatch, penalty, winner):
    """A hand-made model whose hidden state is the last token: from the start it emits 2 (p 0.6) or
    3 (p 0.4); 2 is then followed by the end marker (1), 3 by 4 and then the end marker, each surely.
    The two finished beams are [2, 1], log-prob log 0.6 = -0.511 over 2 tokens, and [3, 4, 1], log 0.4
    = -0.916 over 3. Scored as log-prob / length ** penalty: penalty 0 gives -0.511 against -0.916 and
    1 gives -0.255 against -0.305 (the short answer wins), 2 gives -0.128 against -0.102 (the long one)."""
    import math

    import softprompt.generate as generate

    assert tiny_backbone.tokenizer.eos_token_id == 1
    table = {-1: {2: 0.6, 3: 0.4}, 2: {1: 1.0}, 3: {4: 1.0}, 4: {1: 1.0}, 1: {1: 1.0}}

    def logits(hidden):
        out = torch.full((hidden.shape[0], 8), -1e4)
        for row, state in enumerate(hidden[:, 0].long().tolist()):
            for token, p in table[state].items():
                out[row, token] = math.log(p)
        return out

    def start_rows(rows):
        n = len(rows)
        return _Ids(), torch.full((n, 1), -1.0), torch.zeros(n, dtype=torch.long)

    def next_hidden(backbone, context, tokens, positions):
        return tokens.view(-1, 1).float(), context

    monkeypatch.setattr(tiny_backbone, "logits", logits)
    monkeypatch.setattr(generate, "start_rows", start_rows)
    monkeypatch.setattr(generate, "next_hidden", next_hidden)
    gen = make(tiny_backbone)
    config = DecodeConfig(max_new_tokens=6, num_beams=2, length_penalty=penalty)
    assert gen.beam_search(None, [[5], [6, 7]], config) == [winner, winner]
