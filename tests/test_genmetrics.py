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


def _no_node(monkeypatch, tmp_path):
    """A PATH on which there is no node (nor anything else)."""
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert not node_available()


def test_pass_rate_without_node_is_a_clear_user_error_saying_how_to_install_it(monkeypatch, tmp_path):
    """Not a FileNotFoundError traceback: a TaskError (the CLI prints it as `error: ...`, exit 2)
    naming node, pass_rate and the install command."""
    from softprompt import codecheck
    from softprompt.data import Example
    from softprompt.task import score_generations
    from softprompt.taskfile import GenerationSpec, TaskError

    _no_node(monkeypatch, tmp_path)
    tests = "const assert = require('node:assert');\nassert.deepEqual(add(2, 3), 5);\n"
    answer = "function add(a, b) { return a + b; }"
    examples = [Example({"code": "def add(a, b): return a + b"}, answer, "dev.jsonl:1", {"tests": tests})]
    with pytest.raises(TaskError, match="node is not on PATH"):
        score_generations([answer], examples, GenerationSpec(metrics=["pass_rate"]), "tests")
    with pytest.raises(TaskError, match=r"pass_rate .*node.*apt-get install nodejs") as caught:
        run_tests(answer, tests)
    assert type(caught.value).__name__ == "NodeMissing" and isinstance(caught.value, codecheck.NodeMissing)


def test_parse_rate_of_javascript_without_node_is_left_out_not_guessed(monkeypatch, tmp_path):
    from softprompt.data import Example
    from softprompt.task import score_generations
    from softprompt.taskfile import GenerationSpec

    _no_node(monkeypatch, tmp_path)
    assert parses("function f() {}", "javascript") is None
    examples = [Example({"code": "x"}, "let x;", "dev.jsonl:1")]
    report = score_generations(["let x;"], examples, GenerationSpec(metrics=["chrf", "parse_rate"], language="javascript"), None)
    assert "parse_rate" not in report and "parses" not in report["rows"][0]


LIMITS_PROBE = r"""
const limits = require('node:fs').readFileSync('/proc/self/limits', 'utf8');
const value = (name) => limits.match(new RegExp('^' + name + '\\s+(\\S+)', 'm'))[1];
for (const name of ['Max address space', 'Max cpu time', 'Max file size']) {
  if (value(name) === 'unlimited') { console.error(name + ' is unlimited'); process.exit(3); }
}
const heap = require('node:v8').getHeapStatistics().heap_size_limit;
if (heap > 1024 * 2 ** 20) { console.error('heap limit ' + heap); process.exit(4); }
"""


@pytest.mark.skipif(not node_available(), reason="node not installed")
def test_generated_javascript_runs_under_memory_cpu_and_file_size_limits():
    """Generated code is untrusted: node runs with its address space, CPU time and file sizes
    capped (read back by the program itself from /proc/self/limits) and its heap capped."""
    result = run_tests("", LIMITS_PROBE)
    assert result.passed, result.detail
    # 3 GB reserved, never touched (no memory is used whether or not a cap stops it)
    hog = "const chunks = []; for (let i = 0; i < 12; i++) chunks.push(Buffer.allocUnsafe(256 * 2 ** 20));"
    assert not run_tests(hog, "").passed
