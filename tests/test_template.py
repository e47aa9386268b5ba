import pytest

from softprompt.template import Template, TemplateError, soft_id


def char_tokenize(texts):
    return [[ord(c) for c in t] for t in texts]


def test_parse_counts_soft_tokens_and_fields():
    t = Template.parse("{soft:3} Review: {text} Title: {title} Sentiment: {label}")
    assert t.soft_tokens == 3
    assert t.fields == ["text", "title"]


def test_plain_soft_means_twenty_tokens():
    assert Template.parse("{soft} {text} {label}").soft_tokens == 20


@pytest.mark.parametrize(
    "text, message",
    [
        ("{soft:2} {text}", "no {label} slot"),
        ("{soft:0} {text} {label}", "bad soft token count"),
        ("{soft:x} {text} {label}", "bad soft token count"),
        ("{soft:2} {text} {label} {soft:2}", "soft tokens must come before"),
        ("{soft:2} {te xt} {label}", "bad field name"),
        ("{soft:2} {text:3} {label}", "unknown placeholder"),
        ("{soft:2} {text {label}", "unbalanced"),
        ("{soft:2} {label}", "no input field"),
    ],
)
def test_bad_templates_are_clear_errors(text, message):
    with pytest.raises(TemplateError, match=message):
        Template.parse(text)


def test_double_braces_are_literal_text():
    t = Template.parse("{{json}} {text} {label}")
    enc = t.encode([{"text": "x"}], char_tokenize, 100)
    assert enc.prefix == [ord(c) for c in "{json}"]


def test_space_before_a_field_moves_into_the_field_value():
    t = Template.parse("{soft:2} Review: {text} Sentiment: {label}")
    enc = t.encode([{"text": "good"}], char_tokenize, 100)
    assert enc.prefix == [soft_id(0), soft_id(1)] + [ord(c) for c in " Review:"]
    assert enc.bodies[0] == [ord(c) for c in " good Sentiment:"]
    assert t.slot_lead == " "


def test_long_fields_are_cut_but_soft_tokens_and_fixed_text_are_kept():
    t = Template.parse("{soft:4} A: {a} B: {b} => {label}")
    rows = [{"a": "x" * 50, "b": "y" * 5}, {"a": "short", "b": "row"}]
    enc = t.encode(rows, char_tokenize, max_length=30)
    assert enc.truncated == 1
    assert len(enc.prefix) + len(enc.bodies[0]) == 30
    assert enc.prefix[:4] == [soft_id(k) for k in range(4)]
    assert enc.bodies[0][-3:] == [ord(c) for c in " =>"]
    assert enc.bodies[1] == [ord(c) for c in " short B: row =>"]


def test_fields_after_the_label_are_rendered_for_whole_sequence_scoring():
    t = Template.parse('{soft:2} O sentimento desta crítica é {label}. Crítica: "{text}"')
    assert t.fields_after_slot
    enc = t.encode([{"text": "boa"}], char_tokenize, 100)
    assert "".join(map(chr, enc.afters[0])) == '. Crítica: "boa"'


def test_without_soft_drops_the_soft_tokens():
    t = Template.parse("{soft:5} Review: {text} Sentiment: {label}").without_soft()
    assert t.soft_tokens == 0
    enc = t.encode([{"text": "ok"}], char_tokenize, 100)
    assert enc.prefix == [ord(c) for c in "Review:"]


def test_a_template_whose_fixed_text_fills_the_budget_is_refused_with_the_numbers():
    t = Template.parse("{soft:4} A long fixed instruction: {a} => {label}")
    with pytest.raises(TemplateError, match=r"takes 33 tokens before any input \(4 soft tokens, 29 of fixed text\).*max_length 30"):
        t.encode([{"a": "x"}], char_tokenize, max_length=30)
    assert t.encode([{"a": "x"}], char_tokenize, max_length=35).cut == [0]


def test_cuts_are_counted_per_row_with_the_worst_named():
    from softprompt.template import summarize_cuts

    t = Template.parse("{soft:2} {a} => {label}")
    rows = [{"a": "x" * 40}, {"a": "short"}, {"a": "y" * 20}]
    enc = t.encode(rows, char_tokenize, max_length=20)
    assert enc.cut == [26, 0, 6] and enc.input_tokens == [41, 6, 21]
    summary = summarize_cuts(enc, ["f.jsonl:1", "f.jsonl:2", "f.jsonl:3"])
    assert summary.loud
    assert summary.describe("train", "max_length 20") == (
        "2 of 3 train rows (66.7%) were cut to fit max_length 20; the worst, f.jsonl:1, lost 26 of its 41 input tokens"
    )


@pytest.mark.parametrize("slot", ["label", "target"])
def test_an_empty_field_right_before_the_slot_is_read_at_the_prefix_s_last_token(slot):
    t = Template.parse("{soft:2}Q:{q}{" + slot + "}", slot=slot)
    enc = t.encode([{"q": "ab"}, {"q": ""}], char_tokenize, 64)
    assert enc.prefix == [soft_id(0), soft_id(1), ord("Q")]  # the ":" of "Q:" moved into every row
    assert enc.bodies == [[ord(":"), ord("a"), ord("b")], [ord(":")]]


def test_an_empty_field_with_nothing_before_it_names_the_row():
    t = Template.parse("{q} {label}")
    assert t.encode([{"q": "ab"}], char_tokenize, 64).bodies == [[ord("a"), ord("b")]]
    with pytest.raises(TemplateError, match="row 2 gives no token before {label}"):
        t.encode([{"q": "ab"}, {"q": ""}], char_tokenize, 64)
