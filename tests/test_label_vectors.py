"""One output vector per label (`label_vectors: per_label`): read at the slot in one projection,
started from the model's own reading of each name, trained, saved, and read back the same by eval,
predict and serve (mixed batches too); and the kept state of any run is never worse than its start
on validation, with an end line that says when training did not beat zero-shot."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from softprompt.artifact import load_run
from softprompt.classify import Classifier, RowToScore, label_answers, label_scores, start_label_head
from softprompt.cli import app
from softprompt.methods import method_class
from softprompt.serve.bank import TaskBank
from softprompt.soft_prompt import init_prompt
from softprompt.taskfile import TaskError, load_task
from softprompt.template import Template
from softprompt.train import _outcome, _task_for, train
from softprompt.verbalizer import Verbalizer

from helpers import quiet, write_run, write_task

TEXTS = ["a great film", "a dull, boring mess with many more words in it", "ok", "lovely and moving"]
SHARED = {"film": ["great film"], "mess": ["great mess"], "dull": ["dull"]}  # " great" starts two names
TEMPLATE = "{soft:4} Review: {text} Sentiment: {label}"


def _classifier(backbone, words=SHARED, length_norm=False):
    t = Template.parse(TEMPLATE)
    return Classifier(backbone, t, Verbalizer.from_spec(words), init_prompt("vocab", 4, backbone, seed=3), length_norm=length_norm)


def _task(tmp_path, model_dir, top="label_vectors: per_label\n", steps=6, extra=", label_lr: 0.05"):
    path = write_task(tmp_path, model_dir, steps=steps, extra=extra)
    path.write_text(path.read_text() + top)
    return load_task(path)


# -- the start: the model's own reading -------------------------------------------------------------
@pytest.mark.parametrize("length_norm", [False, True])
def test_per_label_vectors_at_step_0_are_the_first_token_rows_plus_what_the_rest_of_the_name_adds(any_backbone, length_norm):
    """On the row it is fitted on the head scores exactly as the frozen words do (its softmax); on
    any row it is the first token's reading (its output row) plus a constant per label."""
    clf = _classifier(any_backbone, length_norm=length_norm)
    fit = clf.encode([{"text": "N/A"}])
    head = start_label_head(clf, fit)
    read = clf.with_label_head(head)
    torch.testing.assert_close(read.predict_proba(fit), clf.predict_proba(fit), rtol=1e-4, atol=1e-5)
    rows = clf.encode([{"text": t} for t in TEXTS])
    hidden = clf.slot_states(rows)
    divisor = torch.tensor([len(ids) if length_norm else 1 for ids in clf.choices.ids], dtype=torch.float32)
    first = any_backbone.logits_for(hidden.to(any_backbone.device), clf.choices.first_ids).cpu() / divisor
    torch.testing.assert_close(head.scores(hidden.to(head.vectors.device)).detach().cpu() - head.bias.detach().cpu(), first, rtol=1e-4, atol=1e-4)


def test_per_label_head_rows_are_read_in_one_projection_alone_or_mixed_with_word_scored_tasks(tiny_backbone):
    words = _classifier(tiny_backbone)
    other = Classifier(tiny_backbone, Template.parse("{soft:2} {text} => {label}"), Verbalizer.from_spec(["great film", "dull mess"]),
                       init_prompt("vocab", 2, tiny_backbone, seed=1))
    head = words.with_label_head(start_label_head(words, words.encode([{"text": "N/A"}])))

    def row(clf, text):
        enc = clf.encode([{"text": text}]).encoded
        return RowToScore(clf, clf.prefix(enc), enc.bodies[0], enc.afters[0])

    with torch.no_grad():
        rows = [row(clf, text) for text in TEXTS for clf in (head, other, words)]
        mixed, answers = label_scores(rows), label_answers(rows, 2)
        for r, together, answer in zip(rows, mixed, answers):
            alone = label_scores([r])[0]
            torch.testing.assert_close(together, alone, atol=2e-4, rtol=1e-4)
            assert answer == sorted(range(len(alone)), key=lambda label: -float(alone[label]))[:2]
        for text, together in zip(TEXTS, mixed[0::3]):  # the head's rows: its own projection at the slot
            hidden = head.slot_states(head.encode([{"text": text}]))
            torch.testing.assert_close(together, head.label_head.scores(hidden)[0], atol=2e-4, rtol=1e-4)
    assert head.trie([]).fed == []  # no label token is fed after a head row


# -- labels sharing a first token ---------------------------------------------------------------------
def test_labels_sharing_a_first_token_get_scores_of_their_own(tmp_path, tiny_model_dir, tiny_backbone):
    """First-token rows (label_vectors: true) give "great film" and "great mess" one learned row;
    per-label vectors are trained apart, so the gap between the two labels changes with the row."""
    clf = _classifier(tiny_backbone)
    assert clf.choices.first_ids[0] == clf.choices.first_ids[1]
    head = start_label_head(clf, clf.encode([{"text": "N/A"}]))
    target = torch.tensor([0, 1, 0, 1])
    optimizer = torch.optim.Adam(head.parameters(), lr=0.05)
    rows = clf.encode([{"text": t} for t in TEXTS])
    hidden = clf.slot_states(rows)
    for _ in range(20):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(head.scores(hidden), target).backward()
        optimizer.step()
    gap = (head.scores(hidden)[:, 0] - head.scores(hidden)[:, 1]).detach()
    assert not torch.allclose(head.vectors[0], head.vectors[1])
    assert gap.max() - gap.min() > 0.1
    assert (head.scores(hidden).argmax(-1) == target).all()


# -- trained, saved, read back -------------------------------------------------------------------------
def test_a_run_with_per_label_vectors_is_saved_and_scores_the_same_in_eval_predict_and_serve(tmp_path, tiny_model_dir, tiny_backbone):
    spec = _task(tmp_path, tiny_model_dir)
    info = train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet(), baselines=False)
    saved = load_file(str(tmp_path / "run" / "labels.safetensors"))
    assert set(saved) == {"label_vectors", "label_bias"} and saved["label_vectors"].shape == (2, tiny_backbone.hidden_size)
    assert info.method_settings["label_vectors"] == "per_label"
    assert info.metrics["saved_parameters"] == 4 * 32 + 2 * 32 + 2
    task, _ = _task_for(spec, method_class("prompt"), tiny_backbone)
    method = method_class("prompt").build(task, tiny_backbone)
    groups = method.param_groups(spec.train.lr, spec.train.label_lr)  # the vectors step at label_lr
    assert [len(g["params"]) for g in groups] == [1, 2] and groups[1]["scale"] == spec.train.label_lr / spec.train.lr
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in method.label_head.parameters()}
    model, _ = load_run(tmp_path / "run", tiny_backbone)
    torch.testing.assert_close(model.label_head.vectors.detach().cpu(), saved["label_vectors"])
    # eval (the pruned answer) = the run's own report = the full distribution's argmax
    dev = task.rows["dev"]
    assert task.score(model, "dev")["confusion"] == info.metrics["dev"]["confusion"]
    probs = model.predict_proba(dev)
    assert model.predict(dev).tolist() == probs.argmax(-1).tolist()
    # predict (the CLI) and serve (the bank, mixed with a task scored by its words)
    texts = [json.loads(line)["text"] for line in (tmp_path / "dev.jsonl").read_text().splitlines()]
    out = tmp_path / "pred.jsonl"
    result = CliRunner().invoke(app, ["predict", str(tmp_path / "run"), "--input", str(tmp_path / "dev.jsonl"), "--out", str(out)])
    assert result.exit_code == 0, result.output
    predicted = [json.loads(line) for line in out.read_text().splitlines()]
    want = model.predict_proba(model.encode([{"text": t} for t in texts]))
    for row, p in zip(predicted, want):
        assert row["probabilities"] == pytest.approx(dict(zip(model.labels, p.tolist())), abs=1e-5)
    bank = TaskBank(tiny_backbone, allow=[tmp_path])
    bank.load("head", tmp_path / "run")
    bank.load("words", write_run(tmp_path / "words", tiny_backbone, TEMPLATE, {"pos": ["great film"], "neg": ["dull"]}))
    served = bank.classify([(name, {"text": t}) for t in texts for name in ("head", "words")])
    for got, p in zip(served[0::2], want):
        assert got["probabilities"] == pytest.approx(dict(zip(model.labels, p.tolist())), abs=1e-4)
    answers = bank.answer_prepared([bank.prepare(bank.get("head"), [{"text": t}]) for t in texts])
    assert answers == want.argmax(-1).tolist()


def test_label_vectors_spelling_and_templates_that_cannot_have_them_are_refused(tmp_path, tiny_model_dir, tiny_backbone):
    with pytest.raises(TaskError, match="label_vectors.*'perlabel' is not one of false, true .* or per_label"):
        _task(tmp_path, tiny_model_dir, top="label_vectors: perlabel\n")
    spec = _task(tmp_path, tiny_model_dir)
    spec.template = "{soft:4} Sentiment: {label}. Review: {text}"
    with pytest.raises(TaskError, match="input must come before"):
        train(spec, tmp_path / "before", backbone=tiny_backbone, console=quiet())


# -- never worse than the start ----------------------------------------------------------------------
def test_the_kept_state_is_never_worse_than_step_0_on_validation(tmp_path, tiny_model_dir, tiny_backbone):
    """A rate that wrecks the prompt: every later validation is worse, and step 0 is what is kept."""
    spec = _task(tmp_path, tiny_model_dir, top="", steps=6, extra="")
    spec.train.lr = 300.0
    info = train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet())
    metric = info.training["metric"]
    validation = info.metrics["validation"]
    log = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    scores = [e[metric] for e in log if e.get("split") == "validation" and e.get("variant") is None]
    assert validation["kept"][metric] >= validation["initial_prompt"][metric]
    assert validation["kept"][metric] == max([validation["initial_prompt"][metric], *scores])
    if max(scores) <= validation["initial_prompt"][metric]:
        assert info.metrics["best_step"] == 0


def test_the_end_line_says_when_training_did_not_beat_zero_shot(tmp_path, tiny_model_dir, tiny_backbone):
    spec = _task(tmp_path, tiny_model_dir, top="", steps=2, extra="")
    info = train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet())
    kind, metric = method_class("prompt"), info.training["metric"]
    zero = info.metrics["validation"]["zero_shot"][metric]
    info.method_settings.pop("calibration", None)  # the kept state as it is, not calibrated
    info.metrics["validation"]["kept"][metric] = zero
    assert "did not beat zero-shot" in _outcome(info, kind)
    info.metrics["validation"]["kept"][metric] = zero + 0.01
    assert "did not beat zero-shot" not in _outcome(info, kind)
    assert "did not beat zero-shot" not in _outcome(info, method_class("zero-shot"))


def test_a_run_whose_training_scored_under_zero_shot_keeps_the_template_alone(tmp_path, tiny_model_dir, tiny_backbone, monkeypatch):
    """Zero-shot's validation score is raised past anything training can reach: the run must keep
    the template alone (task.json says zero-shot, no trained files), answer on the dev rows exactly
    as zero-shot prompting does, and load back as that."""
    from softprompt.task import Task

    real = Task.zero_shot

    def unbeatable(self, role, progress=None):
        result = real(self, role, progress)
        return {**result, "accuracy": 1.01} if role == "validation" else result

    monkeypatch.setattr(Task, "zero_shot", unbeatable)
    spec = _task(tmp_path, tiny_model_dir, steps=2)  # per-label vectors: their file must go too
    run = tmp_path / "run"
    info = train(spec, run, backbone=tiny_backbone, console=quiet())
    fell_back = info.metrics["validation"]["fell_back"]
    assert info.method == "zero-shot" and fell_back["zero_shot"]["accuracy"] == 1.01
    assert info.metrics["validation"]["kept"]["accuracy"] == 1.01
    assert "{soft" not in info.template and info.soft_tokens == 0 and not info.label_vectors
    assert not list(run.glob("*.safetensors"))
    assert info.metrics["dev"]["accuracy"] == info.metrics["dev_zero_shot"]["accuracy"]
    model, _ = load_run(run, tiny_backbone)
    assert model.lm.prompt is None and model.label_head is None and model.template.soft_tokens == 0
    assert "kept the template alone" in _outcome(info, method_class("prompt"))
    inspected = CliRunner().invoke(app, ["inspect", str(run)])
    assert inspected.exit_code != 0 and "was not kept" in inspected.output


def test_a_run_that_beats_zero_shot_keeps_its_trained_state(tmp_path, tiny_model_dir, tiny_backbone, monkeypatch):
    from softprompt.task import Task

    real = Task.zero_shot
    monkeypatch.setattr(Task, "zero_shot", lambda self, role, progress=None: {**real(self, role, progress), "accuracy": -1.0})
    info = train(_task(tmp_path, tiny_model_dir, steps=2), tmp_path / "run", backbone=tiny_backbone, console=quiet())
    assert info.method == "prompt" and "fell_back" not in info.metrics["validation"]
    assert (tmp_path / "run" / "prompt.safetensors").exists()


@pytest.mark.parametrize("name", ["prompt", "residual", "p-tuning"])
def test_every_soft_prompt_method_starts_exactly_from_its_init_prompt(name, tmp_path, tiny_model_dir, tiny_backbone):
    """Step 0 reads the init prompt, not a random encoder's output (p-tuning's MLP included)."""
    spec = _task(tmp_path, tiny_model_dir, top="", steps=2, extra="")
    task, _ = _task_for(spec, method_class(name), tiny_backbone)
    method = method_class(name).build(task, tiny_backbone)
    torch.testing.assert_close(method.vectors.detach(), task.start_prompt(tiny_backbone).vectors, rtol=0, atol=1e-6)
    assert any(p.requires_grad for p in method.parameters())


# -- label_init: fit (LP-FT) ---------------------------------------------------------------------------
def test_label_init_fit_starts_the_head_as_a_logistic_regression_of_the_prompted_slot_states(tmp_path, tiny_model_dir, tiny_backbone):
    """The head at step 0 gives, on the training rows, the probabilities scikit-learn's standardized
    logistic regression fitted to those rows' slot states under the initial prompt gives."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    spec = _task(tmp_path, tiny_model_dir, top="label_vectors: per_label\nlabel_init: fit\n")
    task, _ = _task_for(spec, method_class("prompt"), tiny_backbone)
    method = method_class("prompt").build(task, tiny_backbone)
    rows = task.rows["train"].sample(10_000, spec.train.seed, by_label=True)
    prompted = task.model.with_prompt(method.prompt())
    states = prompted.slot_states(rows)
    other = task.model.with_prompt(init_prompt("random", 4, tiny_backbone, seed=9))
    assert not torch.allclose(states, other.slot_states(rows), atol=1e-3)  # the prompt changes what is fitted
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=1.0, max_iter=1000)).fit(states.double().numpy(), rows.labels.numpy())
    got = torch.softmax(method.label_head.scores(states), -1).detach()
    torch.testing.assert_close(got, torch.from_numpy(reference.predict_proba(states.double().numpy())).float(), atol=1e-4, rtol=1e-3)
    name = method_class("prompt").build(_task_for(_task(tmp_path, tiny_model_dir), method_class("prompt"), tiny_backbone)[0], tiny_backbone)
    assert not torch.allclose(name.label_head.vectors, method.label_head.vectors)  # not the names' start


@pytest.mark.parametrize("name", ["lora", "full"])
def test_a_method_that_changes_the_weights_trains_a_per_label_head_that_starts_as_the_linear_probe(name, tmp_path, tiny_model_dir, monkeypatch):
    """lora and full with `label_vectors: per_label` and `label_init: fit`: at step 0 the head is the
    linear probe's (the same rows, the same features: the template without soft tokens, read at
    its last token), it trains beside the weights at label_lr, is saved beside them, and the run
    read back scores as it reported."""
    from softprompt.backbone import Backbone

    spec = _task(tmp_path, tiny_model_dir, top="label_vectors: per_label\nlabel_init: fit\n", extra=", label_lr: 0.05")
    backbone = Backbone.load(str(tiny_model_dir))
    task, _ = _task_for(spec, method_class(name), backbone)
    method = method_class(name).build(task, backbone)
    probe = method_class("linear-probe").build(_task_for(spec, method_class("linear-probe"), backbone)[0], backbone)
    torch.testing.assert_close(method.label_head.vectors, probe.weight, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(method.label_head.bias, probe.bias, atol=1e-5, rtol=1e-4)
    labels = {id(p) for p in method.label_head.parameters()}
    groups = method.param_groups(spec.train.lr, spec.train.label_lr)
    assert {id(p) for p in groups[-1]["params"]} == labels and groups[-1]["scale"] == spec.train.label_lr / spec.train.lr
    assert not labels & {id(p) for g in groups[:-1] for p in g["params"]}

    import softprompt.train as train_mod

    checkpoints, save = [], train_mod.save_checkpoint
    monkeypatch.setattr(train_mod, "save_checkpoint", lambda run, c: (checkpoints.append(c.params), save(run, c)))
    info = train(spec, tmp_path / "run", backbone=Backbone.load(str(tiny_model_dir)), console=quiet(), baselines=False, method=name)
    assert info.method_settings["label_vectors"] == "per_label"
    last = checkpoints[-1]["label_head.vectors"]  # the last step's head, checkpointed with the weights
    assert not torch.allclose(last, probe.weight.detach(), atol=1e-4)  # it trained
    saved = load_file(str(tmp_path / "run" / "labels.safetensors"))
    model, _ = load_run(tmp_path / "run", Backbone.load(str(tiny_model_dir)))
    torch.testing.assert_close(model.label_head.vectors.detach().cpu(), saved["label_vectors"])
    assert task.score(model, "dev")["confusion"] == info.metrics["dev"]["confusion"]


def test_label_init_fit_refuses_a_label_with_no_training_rows_and_a_misspelling(tmp_path, tiny_model_dir, tiny_backbone):
    spec = _task(tmp_path, tiny_model_dir, top="label_vectors: per_label\nlabel_init: fit\n")
    spec.verbalizer = {"positive": ["code"], "negative": ["Sentiment"], "neutral": ["so"]}
    with pytest.raises(TaskError, match="label_init: fit .*'neutral' has none"):
        train(spec, tmp_path / "run", backbone=tiny_backbone, console=quiet(), baselines=False)
    with pytest.raises(TaskError, match="label_init"):
        _task(tmp_path, tiny_model_dir, top="label_vectors: per_label\nlabel_init: fitted\n")
