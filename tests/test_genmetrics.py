import pytest

from softprompt.codecheck import node_available, parses, run_tests
from softprompt.metrics import exact_match, generation_scores, normalize_answer, token_f1


def test_squad_normalisation_ignores_case_punctuation_and_articles():
    assert normalize_answer("The  Refund, within 30 days!") == "refund within 30 days"
    assert exact_match("the refund within 30 days", "Refund within 30 days.") == 1.0


def test_token_f1_counts_overlap():
    assert token_f1("within 30 days", "30 days") == pytest.approx(0.8)
    assert token_f1("no", "yes") == 0.0


def test_generation_scores_perfect_and_bad_predictions():
    refs = ["returns the sum of two numbers", "opens the file and reads it"]
    perfect = generation_scores(refs, refs, ["bleu", "chrf", "rouge_l", "exact_match", "f1"])
    assert perfect == pytest.approx(
        {"bleu": 100.0, "chrf": 100.0, "rouge_l": 100.0, "exact_match": 100.0, "f1": 100.0}
    )
    bad = generation_scores(["zzz qqq", "xxx"], refs, ["bleu", "rouge_l"])
    assert bad["bleu"] < 5 and bad["rouge_l"] == 0.0


def test_python_syntax_check():
    assert parses("def f(x):\n    return x\n", "python") is True
    assert parses("def f(x) return x", "python") is False
    assert parses("anything", "cobol") is None


def test_an_empty_answer_does_not_count_as_parsing():
    assert parses("  \n", "python") is False
    assert parses("", "javascript") is False


@pytest.mark.skipif(not node_available(), reason="node not installed")
def test_javascript_is_checked_and_executed_with_node():
    good = "function add(a, b) { return a + b; }"
    tests = "const assert = require('node:assert');\nassert.deepEqual(add(2, 3), 5);\n"
    assert parses(good, "javascript") is True
    assert parses("function add(a, b) { return a + ; }", "javascript") is False
    assert run_tests(good, tests).passed
    assert not run_tests("function add(a, b) { return a - b; }", tests).passed
    slow = run_tests("function add(a, b) { while (true) {} }", tests, timeout=1)
    assert not slow.passed and slow.detail == "timeout"
