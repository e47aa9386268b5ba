import pytest

from softprompt.data import DataError, held_out_size, hold_out, k_per_label, load_examples


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
    picked = k_per_label(rows, 3, seed=1)
    assert sorted(r.label for r in picked) == ["a"] * 3 + ["b"] * 3
    assert [r.fields for r in picked] == [r.fields for r in k_per_label(rows, 3, seed=1)]


def test_hold_out_is_disjoint_seeded_and_gives_every_label_its_share(tmp_path):
    # sorted by label, 10 "a" then 20 "b": the first rows would all be "a"
    lines = "".join(f'{{"text": "t{i}", "label": "{"a" if i < 10 else "b"}"}}\n' for i in range(30))
    rows = load_examples(write(tmp_path / "d.jsonl", lines), ["text"])
    for seed in range(10):  # exact shares whatever the seed, not by luck
        assert sorted(r.label for r in hold_out(rows, 6, seed, by_label=True)[1]) == ["a"] * 2 + ["b"] * 4
    rest, taken = hold_out(rows, 6, seed=0, by_label=True)
    assert len(rest) == 24 and not {r.fields["text"] for r in rest} & {r.fields["text"] for r in taken}
    assert [r.fields for r in taken] == [r.fields for r in hold_out(rows, 6, seed=0, by_label=True)[1]]
    assert [r.fields for r in taken] != [r.fields for r in hold_out(rows, 6, seed=1, by_label=True)[1]]


def test_holding_rows_out_of_train_never_takes_a_labels_last_row(tmp_path):
    lines = '{"text": "only", "label": "rare"}\n' + "".join(f'{{"text": "t{i}", "label": "b"}}\n' for i in range(9))
    rows = load_examples(write(tmp_path / "d.jsonl", lines), ["text"])
    rest, taken = hold_out(rows, 5, seed=0, by_label=True)
    assert "rare" in {r.label for r in rest}
    assert held_out_size(5000, 0.1, 200) == 200 and held_out_size(1000, 0.1, None) == 100
    assert held_out_size(5, 0.1, None) == 1


def test_hold_out_gives_the_extra_row_to_the_label_with_the_largest_remainder(tmp_path):
    """3 rows out of 4 "a" and 6 "b": the exact shares are 1.2 and 1.8, so each label gets its whole
    part (1 and 1) and the one row left goes to "b", whose remainder (0.8) is the largest."""
    lines = "".join(f'{{"text": "t{i}", "label": "{"a" if i < 4 else "b"}"}}\n' for i in range(10))
    rows = load_examples(write(tmp_path / "d.jsonl", lines), ["text"])
    for seed in range(5):
        assert sorted(r.label for r in hold_out(rows, 3, seed, by_label=True)[1]) == ["a", "b", "b"]
    flipped = "".join(f'{{"text": "t{i}", "label": "{"b" if i < 4 else "a"}"}}\n' for i in range(10))  # "a" larger
    rows = load_examples(write(tmp_path / "e.jsonl", flipped), ["text"])
    assert sorted(r.label for r in hold_out(rows, 3, 0, by_label=True)[1]) == ["a", "a", "b"]
