import pytest

from softprompt.data import DataError, few_shot, load_examples, split


def write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_jsonl_rows_map_columns_to_fields(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"texto": "bom", "y": "pos"}\n\n{"texto": "ruim", "y": "neg"}\n')
    rows = load_examples(f, ["text"], {"text": "texto"}, "y", ["pos", "neg"])
    assert [(r.fields["text"], r.label) for r in rows] == [("bom", "pos"), ("ruim", "neg")]
    assert rows[1].source.endswith("d.jsonl:3")


def test_malformed_json_names_file_and_line(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": \n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON"):
        load_examples(f, ["text"])


def test_missing_field_names_file_line_and_field(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"text": "a", "label": "x"}\n{"label": "y"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: missing field 'text'"):
        load_examples(f, ["text"])


def test_empty_text_is_an_error(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"text": "  ", "label": "x"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:1: field 'text' is empty"):
        load_examples(f, ["text"])


def test_label_missing_from_verbalizer_names_label_and_row(tmp_path):
    f = write(tmp_path / "d.jsonl", '{"text": "a", "label": "pos"}\n{"text": "b", "label": "meh"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'label': label 'meh' is not in the verbalizer"):
        load_examples(f, ["text"], labels=["pos", "neg"])


def test_csv_and_tsv_are_read_with_line_numbers(tmp_path):
    csv = write(tmp_path / "d.csv", 'text,label\n"hello, world",pos\n,neg\n')
    with pytest.raises(DataError, match=r"d\.csv:3: field 'text' is empty"):
        load_examples(csv, ["text"])
    tsv = write(tmp_path / "d.tsv", "text\tlabel\nhi there\tpos\n")
    assert load_examples(tsv, ["text"])[0].fields == {"text": "hi there"}


def test_unknown_format_is_refused(tmp_path):
    with pytest.raises(DataError, match="unknown format"):
        load_examples(write(tmp_path / "d.xml", "<a/>"), ["text"])


def test_few_shot_takes_k_per_label_reproducibly(tmp_path):
    lines = "".join(f'{{"text": "t{i}", "label": "{"ab"[i % 2]}"}}\n' for i in range(20))
    rows = load_examples(write(tmp_path / "d.jsonl", lines), ["text"])
    picked = few_shot(rows, 3, seed=1)
    assert sorted(r.label for r in picked) == ["a"] * 3 + ["b"] * 3
    assert [r.fields for r in picked] == [r.fields for r in few_shot(rows, 3, seed=1)]


def test_split_is_disjoint_and_seeded(tmp_path):
    lines = "".join(f'{{"text": "t{i}", "label": "a"}}\n' for i in range(30))
    rows = load_examples(write(tmp_path / "d.jsonl", lines), ["text"])
    train, dev = split(rows, 0.2, seed=0)
    assert len(dev) == 6 and len(train) == 24
    assert not {r.fields["text"] for r in train} & {r.fields["text"] for r in dev}
