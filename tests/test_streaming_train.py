"""Training rows encoded a batch at a time (task.TrainRows): the same batches, lengths, cuts and
trained prompt as encoding every row up front, while a large source is never held whole."""

import json
import random
import weakref

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file

from softprompt import task as task_module
from softprompt.data import example as example_module
from softprompt.methods import DEFAULT_METHOD, method_class
from softprompt.task import Task, make_task
from softprompt.taskfile import TrainSettings, load_task
from softprompt.template import summarize_cuts
from softprompt.train import batch_plan, micro_batches, train

from helpers import quiet, write_task


def lists_plan(lengths, batch_size, seed, epoch, bucket=True):
    """The batch plan as lists of lists (the code before the plan became arrays): the reference."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 32 if bucket else batch_size
    batches = []
    for start in range(0, len(order), window):
        part = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    rng.shuffle(batches)
    return batches


@pytest.mark.parametrize("bucket", [True, False])
def test_the_array_batch_plan_is_the_plan_lists_gave(bucket):
    lengths = np.random.default_rng(0).integers(1, 6, 1003).astype(np.int32)  # many ties; a short batch
    for batch_size, seed, epoch in [(8, 0, 0), (3, 5, 1), (7, 2, 3)]:
        plan = batch_plan(lengths, batch_size, seed, epoch, bucket)
        got = [row[row >= 0].tolist() for row in plan]
        assert got == lists_plan(lengths.tolist(), batch_size, seed, epoch, bucket)


def test_a_resumed_stream_of_micro_batches_goes_on_where_the_full_stream_was():
    lengths = list(range(1, 51))  # 50 rows, batches of 4: 13 per epoch
    settings = TrainSettings(batch_size=4, seed=3)
    full = micro_batches(lengths, settings, 0)
    seen = [next(full) for _ in range(40)]
    for skip in (0, 5, 13, 27):
        resumed = micro_batches(lengths, settings, skip)
        assert [next(resumed) for _ in range(40 - skip)] == seen[skip:]


def _upfront_loss(self, index):
    """The loss as before TrainRows: every training row encoded once, the batch indexed in it."""
    if not hasattr(self, "_all_train"):
        self._all_train = self.encode(self.model, list(self.splits.train), True)
    return self.model.loss(self._all_train, index)


def _generation_task(folder, model_dir):
    pairs = [(f"def f{i}(a): return a + {i}", f"function f{i}(a) {{ return a + {i}; }}") for i in range(12)]
    (folder / "train.jsonl").write_text("".join(json.dumps({"code": p, "js": j}) + "\n" for p, j in pairs))
    (folder / "dev.jsonl").write_text("".join(json.dumps({"code": p, "js": j}) + "\n" for p, j in pairs[:3]))
    path = folder / "task.yaml"
    path.write_text(
        f"model: {model_dir}\n"
        "template: '{soft:4} Python: {code} JavaScript: {target}'\n"
        "data: {train: train.jsonl, dev: dev.jsonl, target: js, validation_fraction: 0.25}\n"
        "generation: {metrics: [chrf], max_new_tokens: 4, max_target_length: 8}\n"
        "train: {steps: 6, batch_size: 3, lr: 0.3, eval_every: 3, eval_limit: 2}\n"
    )
    return path


@pytest.mark.parametrize("kind", ["classification", "generation"])
def test_per_batch_encoding_trains_the_prompt_that_encoding_every_row_up_front_trained(
    tmp_path, tiny_model_dir, tiny_backbone, monkeypatch, kind
):
    if kind == "classification":
        path = write_task(tmp_path, tiny_model_dir, steps=6, extra=", max_length: 12")  # some rows cut
    else:
        path = _generation_task(tmp_path, tiny_model_dir)
    spec = load_task(path)
    train(spec, tmp_path / "batched", backbone=tiny_backbone, console=quiet(), baselines=False)
    monkeypatch.setattr(Task, "loss", _upfront_loss)
    train(spec, tmp_path / "upfront", backbone=tiny_backbone, console=quiet(), baselines=False)
    losses = {run: _step_losses(tmp_path / run) for run in ("batched", "upfront")}
    assert len(losses["batched"]) == 6  # every step's loss: the same rows, encoded the same, each step
    torch.testing.assert_close(torch.tensor(losses["batched"]), torch.tensor(losses["upfront"]), rtol=1e-6, atol=1e-7)
    batched = load_file(str(tmp_path / "batched" / "prompt.safetensors"))
    upfront = load_file(str(tmp_path / "upfront" / "prompt.safetensors"))
    assert batched.keys() == upfront.keys()
    for name in batched:
        torch.testing.assert_close(batched[name], upfront[name], rtol=1e-6, atol=1e-7)


def _step_losses(run) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def _tokenize_with_an_empty_field(tokenize_many):
    """The backbone's tokenizer, except that the text " EMPTY" gives no token (as some tokenizers'
    normalisers do to some inputs): a row whose body is empty, which moves the prefix's last token."""

    def tokenize(texts):
        return [[] if text == " EMPTY" else ids for text, ids in zip(texts, tokenize_many(texts))]

    return tokenize


def test_the_lengths_pass_gives_every_row_the_length_prefix_and_cuts_of_encoding_them_all_at_once(
    tmp_path, tiny_model_dir, tiny_backbone, monkeypatch
):
    path = write_task(tmp_path, tiny_model_dir, extra=", max_length: 14")
    path.write_text(
        path.read_text()
        .replace("'{soft:4} Review: {text} Sentiment: {label}'", "'{soft:4} Review: {text}{label}'")
        .replace("data: {train: train.jsonl, dev: dev.jsonl}", "data: {train: train.jsonl, dev: dev.jsonl, validation: dev.jsonl}")
    )
    rows = [{"text": "good " * (1 + i % 9), "label": ["positive", "negative"][i % 2]} for i in range(40)]
    rows[25]["text"] = "EMPTY"  # in the third chunk only
    rows[33]["text"] = "bad " * 30  # the worst cut, in a later chunk than the first cut rows
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    monkeypatch.setattr(tiny_backbone, "tokenize_many", _tokenize_with_an_empty_field(tiny_backbone.tokenize_many))
    monkeypatch.setattr(task_module, "ENCODE_CHUNK", 10)
    task = make_task(load_task(path), tiny_backbone)
    examples = list(task.splits.train)
    whole = task.encode(task.model, examples, True)
    assert len(whole.encoded.prefix) < len(task.encode(task.model, examples[:10], True).encoded.prefix)
    train_rows = task.rows["train"]
    assert train_rows.lengths.tolist() == task.row_lengths(whole)
    assert train_rows.prefix == whole.encoded.prefix
    batch = train_rows.batch([3, 0, 7])  # a batch from a chunk whose own prefix is longer
    assert batch.encoded.prefix == whole.encoded.prefix
    assert batch.encoded.bodies == [whole.encoded.bodies[i] for i in (3, 0, 7)]
    assert batch.labels.tolist() == whole.labels[[3, 0, 7]].tolist()
    expected = summarize_cuts(whole.encoded, [e.source for e in examples])
    assert expected is not None and expected.worst_source.endswith(":34")
    assert dict(task.cuts())["train"] == expected


def _parquet_task(folder, model_dir, rows: int):
    rng = random.Random(0)
    labels = [rng.choice(["positive", "negative"]) for _ in range(rows)]
    texts = [f"a {rng.choice(['great', 'dull', 'lovely', 'boring'])} film number {i}" for i in range(rows)]
    pq.write_table(pa.table({"text": texts, "label": labels}), folder / "train.parquet", row_group_size=500)
    dev = [{"text": "a great film", "label": "positive"}, {"text": "a dull film", "label": "negative"}] * 5
    (folder / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in dev))
    path = write_task(folder, model_dir, extra=", eval_limit: 16, max_length: 24")
    path.write_text(path.read_text().replace("train: train.jsonl", "train: train.parquet"))
    return path


def test_a_parquet_sources_training_rows_are_never_all_held_at_once(tmp_path, tiny_model_dir, tiny_backbone, monkeypatch):
    """Neither as rows (Examples alive at once) nor encoded (rows encoded in one call)."""
    path = _parquet_task(tmp_path, tiny_model_dir, 3000)
    peak = {"examples": 0, "encoded": 0, "alive": 0}
    make_example = example_module.RowSpec.example

    def gone():
        peak["alive"] -= 1

    def counted_example(self, record, where):
        example = make_example(self, record, where)
        peak["alive"] += 1
        weakref.finalize(example, gone)
        peak["examples"] = max(peak["examples"], peak["alive"])
        return example

    encode = task_module.ClassificationTask.encode

    def counted_encode(self, model, examples, with_answers):
        peak["encoded"] = max(peak["encoded"], len(examples))
        return encode(self, model, examples, with_answers)

    monkeypatch.setattr(example_module.RowSpec, "example", counted_example)
    monkeypatch.setattr(task_module.ClassificationTask, "encode", counted_encode)
    monkeypatch.setattr(task_module, "ENCODE_CHUNK", 200)
    task = make_task(load_task(path), tiny_backbone)
    task.use_method(method_class(DEFAULT_METHOD).build(task, tiny_backbone))
    assert len(task.splits.train) > 2900
    for index in ([0, 1, 2, 3], [2500, 17, 1200, 2899]):
        task.loss(index).backward()
    assert peak["encoded"] == 200  # the lengths pass's chunks; validation, dev and batches are smaller
    # two chunks (the next is read while the last is still named), the validation and dev rows, a batch
    assert peak["examples"] <= 2 * 200 + 16 + 10 + 4
    assert task.lengths().dtype == np.int32 and len(task.lengths()) == len(task.splits.train)


def test_splits_json_records_a_role_too_large_to_list_as_runs_of_the_same_lines(tmp_path, monkeypatch):
    from softprompt.data import lines_by_file, open_rows
    from softprompt.data.rows import hold_out

    rows = [{"text": f"row {i}", "label": "ab"[i % 2]} for i in range(300)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "t.parquet", row_group_size=64)
    (tmp_path / "t.jsonl").write_text("".join(json.dumps(r) + "\n" + ("\n" if i % 7 == 0 else "") for i, r in enumerate(rows)))
    monkeypatch.setattr(task_module, "LISTED_LINES", 100)
    for name in ("t.parquet", "t.jsonl"):  # a table's rows by number, a text file's by line (blank lines skipped)
        train, validation = hold_out(open_rows(tmp_path / name, ["text"]), 20, 0, by_label=True)
        record = task_module.Splits(train, list(validation), list(validation)).record()
        assert set(record["train"]) == {"rows", "line_runs"} and record["train"]["rows"] == 280
        listed = lines_by_file(train)
        expanded = {f: [n for a, b in runs for n in range(a, b + 1)] for f, runs in record["train"]["line_runs"].items()}
        assert expanded == listed
        assert record["validation"]["files"] == lines_by_file(validation)  # small roles as before
