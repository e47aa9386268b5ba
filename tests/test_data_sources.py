"""Parquet, Arrow (feather) and datasets folders as data sources: the rows, the messages and the
splits of the same rows in JSONL, and only the rows a role uses turned into Python."""

import hashlib
import json
import re

import pyarrow as pa
import pyarrow.feather as feather
import pyarrow.parquet as pq
import pytest

from softprompt.data import DataError, fingerprint, hold_out, k_per_label, load_examples, open_rows, tables
from softprompt.task import read_splits
from softprompt.taskfile import load_task
from softprompt.template import Template

TABLES = ["parquet", "feather", "datasets"]


def write_rows(folder, rows: list[dict], kind: str, name: str = "data", chunk: int = 7):
    """The rows as a .jsonl file (one per line, so line N is row N), or as a table of `kind`
    (Parquet row groups and feather record batches of `chunk` rows)."""
    if kind == "jsonl":
        path = folder / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        return path
    table = pa.Table.from_pylist(rows)
    if kind == "parquet":
        pq.write_table(table, folder / f"{name}.parquet", row_group_size=chunk)
        return folder / f"{name}.parquet"
    if kind == "feather":
        feather.write_feather(table, folder / f"{name}.feather", chunksize=chunk)
        return folder / f"{name}.feather"
    import datasets

    datasets.Dataset(table).save_to_disk(str(folder / name))
    return folder / name


def sentiment(n: int) -> list[dict]:
    """Rows sorted by label (a, then b, then c), a label per third, with a number column."""
    return [{"text": f"review {i}", "label": "abc"[3 * i // n], "stars": i % 5} for i in range(n)]


def _seen(examples, folder):
    """What a role holds, the file's own path left out (it differs between formats)."""
    return [(e.fields, e.label, e.extra, e.source.rpartition(":")[2]) for e in examples]


@pytest.mark.parametrize("kind", TABLES)
def test_a_table_reads_as_the_same_rows_in_jsonl(tmp_path, kind):
    rows = sentiment(30)
    jsonl = load_examples(
        write_rows(tmp_path, rows, "jsonl"), ["body"], {"body": "text"}, "label", ["a", "b", "c"], ["stars"]
    )
    table = load_examples(
        write_rows(tmp_path, rows, kind), ["body"], {"body": "text"}, "label", ["a", "b", "c"], ["stars"]
    )
    assert _seen(table, tmp_path) == _seen(jsonl, tmp_path)
    assert table[4].fields == {"body": "review 4"} and table[4].extra == {
        "stars": "4"
    }  # numbers written as text
    assert table[4].source.endswith(":5")  # rows counted from 1, like lines


BAD_ROWS = {  # row 4 (counted from 1), in the second chunk, is bad in each way
    "null": ({"text": None, "label": "a"}, r":4: missing field 'text'$"),
    "blank": ({"text": " \t ", "label": "a"}, r":4: field 'text' is empty$"),
    "unknown label": (
        {"text": "fine", "label": "zz"},
        r":4: field 'label': label 'zz' is not in the verbalizer \(a, b, c\)$",
    ),
}


def _errors(folder, rows, kind, **read) -> tuple[str, str]:
    """The DataError messages for the rows in JSONL and as `kind`, each without its file's path."""
    messages = []
    for k in ("jsonl", kind):
        path = write_rows(folder, rows, k, chunk=3)
        with pytest.raises(DataError) as err:  # on opening, before any row is read into Python
            open_rows(path, ["text"], **read)
        assert str(err.value).startswith(f"{path}:")
        messages.append(str(err.value).removeprefix(str(path)))
    return messages[0], messages[1]


@pytest.mark.parametrize("kind", TABLES)
@pytest.mark.parametrize("problem", BAD_ROWS)
def test_a_bad_value_in_a_table_names_file_row_and_column_as_jsonl_does(tmp_path, kind, problem):
    bad, message = BAD_ROWS[problem]
    rows = sentiment(9)
    rows[3] = bad
    jsonl, table = _errors(tmp_path, rows, kind, labels=["a", "b", "c"])
    assert table == jsonl
    assert re.search(message, table), table


@pytest.mark.parametrize("kind", TABLES)
@pytest.mark.parametrize("value, name", [(["a", "b"], "list"), (True, "bool"), ({"k": "v"}, "dict")])
def test_a_column_that_is_not_text_is_refused_at_its_first_row_as_jsonl_does(tmp_path, kind, value, name):
    rows = [{"text": value, "label": "a"}] * 3
    jsonl, table = _errors(tmp_path, rows, kind)
    assert table == jsonl == f":1: field 'text' should be text, got {name}"


@pytest.mark.parametrize("kind", TABLES)
def test_a_missing_column_names_file_row_and_column_and_the_columns_there_are(tmp_path, kind):
    path = write_rows(tmp_path, sentiment(5), kind)
    with pytest.raises(
        DataError, match=r"data[.a-z]*:1: missing field 'sentence' \(its columns: text, label, stars\)$"
    ):
        load_examples(path, ["text"], {"text": "sentence"})


def test_the_first_bad_row_is_reported_whatever_its_column_or_batch(tmp_path):
    """Row 12's unknown label comes before row 30's blank text, though the text column is checked
    first; in one row the text field comes before the label, as in a JSONL row."""
    rows = sentiment(40)
    rows[29]["text"] = " "
    rows[11]["label"] = "zz"
    path = write_rows(tmp_path, rows, "parquet", chunk=100)
    with pytest.raises(DataError, match=r"data\.parquet:12: field 'label': label 'zz'"):
        open_rows(path, ["text"], labels=["a", "b", "c"])
    rows[11]["text"] = None
    path = write_rows(tmp_path, rows, "parquet", chunk=5)
    with pytest.raises(DataError, match=r"data\.parquet:12: missing field 'text'$"):
        open_rows(path, ["text"], labels=["a", "b", "c"])


def _splits(folder, kind: str, validation: bool):
    """read_splits of a task over train.KIND (and val.KIND): few-shot, validation and report limits."""
    task = folder / f"task_{validation}.yaml"
    task.write_text(
        "template: '{soft:2} {text} {label}'\n"
        "verbalizer: {a: [a], b: [b], c: [c]}\n"
        f"data: {{train: train.{kind}{f', validation: val.{kind}' if validation else ''}}}\n"
        "train: {shots: 4, eval_limit: 9, report_limit: 5}\n",
        encoding="utf-8",
    )
    spec = load_task(task)
    return read_splits(spec, Template.parse(spec.template), ["a", "b", "c"])


@pytest.mark.parametrize("validation", [False, True], ids=["validation_slice", "validation_file"])
def test_splits_of_a_parquet_file_are_the_splits_of_the_same_rows_in_jsonl(tmp_path, validation):
    seen = {}
    for kind in ("jsonl", "parquet"):
        (tmp_path / kind).mkdir()
        write_rows(tmp_path / kind, sentiment(90), kind, name="train")
        write_rows(tmp_path / kind, sentiment(60), kind, name="val")
        splits = _splits(tmp_path / kind, kind, validation)
        roles = {role: _seen(getattr(splits, role), None) for role in ("train", "validation", "dev")}
        for role, record in splits.record().items():  # splits.json: each role's rows, by file line
            assert record["rows"] == len(roles[role])
            assert [n for lines in record["files"].values() for n in lines] == [
                int(r[3]) for r in roles[role]
            ]
        seen[kind] = roles
    assert seen["parquet"] == seen["jsonl"]
    # no dev file: 9 of the 90 rows are the report (5 kept), then 8 of 81 validate (or 9 of val.*)
    assert [len(seen["parquet"][r]) for r in ("train", "validation", "dev")] == [
        12,
        9 if validation else 8,
        5,
    ]
    assert sorted(label for _, label, _, _ in seen["parquet"]["train"]) == ["a"] * 4 + ["b"] * 4 + ["c"] * 4


def test_sampling_the_rest_of_a_hold_out_draws_what_sampling_its_rows_as_a_list_draws(tmp_path):
    """After a hold-out the rest's labels may first appear in another order than the file's (here
    row 1, the first "b", is often taken out): sampling the rest must take them in the rest's order,
    as sampling its rows as a list would."""
    rows = open_rows(
        write_rows(tmp_path, [{"text": "first", "label": "b"}] + sentiment(30), "parquet"), ["text"]
    )
    differs = 0
    for seed in range(12):
        rest, taken = rows.hold_out(15, seed, by_label=True)
        listed = list(rest)
        texts = lambda chosen: [e.fields["text"] for e in chosen]  # noqa: E731
        assert texts(rest.k_per_label(3, seed)) == texts(k_per_label(listed, 3, seed))
        assert texts(rest.hold_out(5, seed, by_label=True)[1]) == texts(
            hold_out(listed, 5, seed, by_label=True)[1]
        )
        differs += listed[0].label != "b"
    assert differs  # some seed took the first "b" out, so the orders did differ


def test_hold_out_and_k_per_label_draw_the_rows_they_drew_before_tables_came(tmp_path):
    """Pinned from the list-based samplers that preceded label codes: the same seed keeps giving the
    same rows (the README's numbers and every saved run's splits depend on it)."""
    labels = ["c"] * 5 + ["a"] * 20 + ["b"] * 15
    rows = [{"text": f"t{i}", "label": label} for i, label in enumerate(labels)]
    for kind in ("jsonl", "parquet"):
        path = write_rows(tmp_path, rows, kind)
        listed, lazy = load_examples(path, ["text"]), open_rows(path, ["text"])
        for examples in (listed, lazy):
            texts = lambda chosen: [e.fields["text"] for e in chosen]  # noqa: E731
            assert texts(hold_out(examples, 7, 3, by_label=True)[1]) == [
                "t1",
                "t9",
                "t22",
                "t23",
                "t30",
                "t32",
                "t34",
            ]
            assert texts(k_per_label(examples, 2, 4)) == ["t1", "t2", "t8", "t17", "t27", "t32"]
            assert texts(hold_out(examples, 4, 3, by_label=False)[1]) == ["t8", "t15", "t34", "t37"]


def test_only_the_rows_chosen_from_a_large_parquet_file_are_read_into_python(tmp_path, monkeypatch):
    """20,000 rows in 40 row groups: checking them converts none; a validation slice and 4 rows per
    label convert exactly those rows, and the row groups holding none of them are never read."""
    path = write_rows(tmp_path, sentiment(20_000), "parquet", chunk=500)
    groups_read = []
    read = tables.ParquetTable.read
    monkeypatch.setattr(
        tables.ParquetTable, "read", lambda self, k, c: groups_read.append(k) or read(self, k, c)
    )
    rows = open_rows(path, ["text"], labels=["a", "b", "c"])
    assert (
        rows.source.converted == 0
        and len(groups_read) == 40
        and rows.label_counts() == {"a": 6667, "b": 6667, "c": 6666}
    )
    groups_read.clear()
    train, validation = rows.hold_out(30, seed=1, by_label=True)
    few = train.k_per_label(4, seed=2)
    assert rows.source.converted == 0 and not groups_read  # choosing reads nothing
    chosen = list(validation) + list(few)
    assert rows.source.converted == 42 == len(chosen)
    holding = {(int(e.source.rpartition(":")[2]) - 1) // 500 for e in chosen}
    assert sorted(set(groups_read)) == sorted(holding) and len(holding) < 40


def test_take_reads_the_rows_asked_for_in_the_order_asked(tmp_path):
    rows = open_rows(write_rows(tmp_path, sentiment(50), "parquet"), ["text"])
    assert [e.fields["text"] for e in rows.take([42, 3, 17, 3])] == [
        "review 42",
        "review 3",
        "review 17",
        "review 3",
    ]
    assert rows.source.converted == 3
    assert [e.fields["text"] for e in rows[47:]] == ["review 47", "review 48", "review 49"]


def test_a_datasets_class_label_column_reads_as_its_class_names_and_minus_one_as_missing(tmp_path):
    import datasets

    features = datasets.Features(
        {"text": datasets.Value("string"), "label": datasets.ClassLabel(names=["neg", "pos"])}
    )
    data = datasets.Dataset.from_dict({"text": ["bad", "good", "ok"], "label": [0, 1, 1]}, features=features)
    data.save_to_disk(str(tmp_path / "ds"))
    assert [e.label for e in load_examples(tmp_path / "ds", ["text"], labels=["neg", "pos"])] == [
        "neg",
        "pos",
        "pos",
    ]
    data.to_parquet(str(tmp_path / "d.parquet"))  # the features travel in the schema metadata
    assert [e.label for e in load_examples(tmp_path / "d.parquet", ["text"])] == ["neg", "pos", "pos"]
    unlabelled = datasets.Dataset.from_dict({"text": ["bad", "good"], "label": [0, -1]}, features=features)
    unlabelled.save_to_disk(str(tmp_path / "test"))
    with pytest.raises(DataError, match=r"test:2: missing field 'label'$"):
        load_examples(tmp_path / "test", ["text"])


def test_a_datasets_folder_of_splits_is_refused_with_the_split_names(tmp_path):
    import datasets

    split = datasets.Dataset.from_dict({"text": ["a"], "label": ["x"]})
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(
        DataError,
        match=r"dd: a DatasetDict holding the splits train, test: name one of them, e\.g\. .*dd/train",
    ):
        load_examples(tmp_path / "dd", ["text"])
    assert [e.fields for e in load_examples(tmp_path / "dd" / "test", ["text"])] == [{"text": "a"}]


def test_unreadable_and_unknown_sources_are_refused_by_name(tmp_path):
    (tmp_path / "x.parquet").write_text("not parquet")
    with pytest.raises(DataError, match=r"x\.parquet: not a readable Parquet file"):
        load_examples(tmp_path / "x.parquet", ["text"])
    (tmp_path / "x.arrow").write_text("not arrow")
    with pytest.raises(DataError, match=r"x\.arrow: not a readable Arrow IPC"):
        load_examples(tmp_path / "x.arrow", ["text"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"empty: not a folder written by datasets' save_to_disk"):
        load_examples(tmp_path / "empty", ["text"])
    (tmp_path / "x.xml").write_text("<a/>")
    with pytest.raises(DataError, match=r"use \.jsonl, \.csv, \.tsv, \.parquet, \.arrow or \.feather"):
        load_examples(tmp_path / "x.xml", ["text"])
    pq.write_table(pa.table({"text": pa.array([], pa.string())}), tmp_path / "none.parquet")
    with pytest.raises(DataError, match=r"none\.parquet: no rows"):
        load_examples(tmp_path / "none.parquet", ["text"], label_column=None)


def test_fingerprint_of_a_file_is_the_digest_of_its_bytes_and_of_a_folder_its_files(tmp_path):
    path = write_rows(tmp_path, sentiment(10), "parquet")
    assert fingerprint(path) == hashlib.sha256(path.read_bytes()).hexdigest()[:16]  # as runs recorded it
    folder = write_rows(tmp_path, sentiment(10), "datasets")
    before = fingerprint(folder)
    assert before == fingerprint(folder)
    write_rows(tmp_path, sentiment(11), "datasets")
    assert fingerprint(folder) != before
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "x").write_text("12")
    (tmp_path / "one" / "y").write_text("")
    moved = fingerprint(tmp_path / "one")
    (tmp_path / "one" / "x").write_text("1")
    (tmp_path / "one" / "y").write_text("2")
    assert fingerprint(tmp_path / "one") != moved  # the same bytes in other files
