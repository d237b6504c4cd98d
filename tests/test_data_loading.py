"""Loading preference data: every local source round-trips, and bad sources give one-line DataErrors."""

from __future__ import annotations

import json

import datasets
import pyarrow.feather as feather
import pytest

from chipo.data import DataError, load_preference_dataset

STANDARD_ROWS = [
    {"prompt": "the cat", "chosen": " sat on the mat.", "rejected": " bad.", "id": 0},
    {"prompt": "why is this", "chosen": " a good answer.", "rejected": " a dog.", "id": 1},
    {"prompt": "how", "chosen": " short.", "rejected": " long long long.", "id": 2},
]
CONVERSATION_ROWS = [
    {"prompt": [{"role": "system", "content": "be helpful"}, {"role": "user", "content": "hi"}],
     "chosen": [{"role": "assistant", "content": "hello"}], "rejected": [{"role": "assistant", "content": "go"}]},
    {"prompt": [{"role": "user", "content": "why"}],
     "chosen": [{"role": "assistant", "content": "because"}], "rejected": [{"role": "assistant", "content": "no"}]},
]


def write_jsonl(path, rows, blank_lines_after: tuple[int, ...] = ()):
    lines = []
    for i, row in enumerate(rows):
        lines.append(json.dumps(row))
        if i in blank_lines_after:
            lines.append("   ")
    path.write_text("\n".join(lines) + "\n")
    return path


def rows_of(dataset):
    return [dict(row) for row in dataset]


# ------------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("rows", [STANDARD_ROWS, CONVERSATION_ROWS], ids=["standard", "conversational"])
@pytest.mark.parametrize("kind", ["jsonl", "json_array", "json_lines_in_json", "parquet", "arrow_stream",
                                  "arrow_file", "saved_dataset"])
def test_file_round_trip(tmp_path, rows, kind):
    original = datasets.Dataset.from_list(rows)
    if kind == "jsonl":
        path = tmp_path / "d.jsonl"
        original.to_json(path)
    elif kind == "json_array":
        path = tmp_path / "d.json"
        original.to_json(path, lines=False)
        assert path.read_text().lstrip().startswith("[")
    elif kind == "json_lines_in_json":
        path = tmp_path / "d.json"
        original.to_json(path)  # datasets writes JSON lines by default, whatever the extension
    elif kind == "parquet":
        path = tmp_path / "d.parquet"
        original.to_parquet(path)
    elif kind == "arrow_stream":
        original.save_to_disk(tmp_path / "saved")
        (path,) = (tmp_path / "saved").glob("*.arrow")
    elif kind == "arrow_file":
        path = tmp_path / "d.arrow"
        feather.write_feather(original.data.table, path)
    else:
        path = tmp_path / "saved"
        original.save_to_disk(path)
    loaded = load_preference_dataset(str(path))
    assert rows_of(loaded) == rows


def test_saved_dataset_dict_split_selection(tmp_path):
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(STANDARD_ROWS[:2]),
                               "test": datasets.Dataset.from_list(STANDARD_ROWS[2:])})
    dd.save_to_disk(tmp_path / "dd")
    assert rows_of(load_preference_dataset(str(tmp_path / "dd"))) == STANDARD_ROWS[:2]
    assert rows_of(load_preference_dataset(str(tmp_path / "dd"), split="test")) == STANDARD_ROWS[2:]
    with pytest.raises(DataError) as info:
        load_preference_dataset(str(tmp_path / "dd"), split="dev")
    assert str(info.value) == f"{tmp_path / 'dd'}: unknown split 'dev'; available splits: test, train"


def test_directory_of_data_files_by_split(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", STANDARD_ROWS[:2])
    datasets.Dataset.from_list(STANDARD_ROWS[2:]).to_parquet(tmp_path / "test-00000-of-00001.parquet")
    assert rows_of(load_preference_dataset(str(tmp_path))) == STANDARD_ROWS[:2]
    assert rows_of(load_preference_dataset(str(tmp_path), split="test")) == STANDARD_ROWS[2:]
    with pytest.raises(DataError, match="unknown split 'validation'; available splits: test, train"):
        load_preference_dataset(str(tmp_path), split="validation")


def test_directory_of_shards_under_data_concatenates(tmp_path):
    (tmp_path / "data").mkdir()
    write_jsonl(tmp_path / "data" / "train-00000-of-00002.jsonl", STANDARD_ROWS[:1])
    write_jsonl(tmp_path / "data" / "train-00001-of-00002.jsonl", STANDARD_ROWS[1:])
    assert rows_of(load_preference_dataset(str(tmp_path))) == STANDARD_ROWS


def test_directory_without_split_names_is_all_train(tmp_path):
    write_jsonl(tmp_path / "part_a.jsonl", STANDARD_ROWS[:1])
    write_jsonl(tmp_path / "part_b.jsonl", STANDARD_ROWS[1:])
    assert rows_of(load_preference_dataset(str(tmp_path))) == STANDARD_ROWS


def test_jsonl_blank_lines_are_ignored(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", STANDARD_ROWS, blank_lines_after=(0, 1))
    assert rows_of(load_preference_dataset(str(path))) == STANDARD_ROWS


def test_jsonl_rows_with_different_keys_keep_every_column(tmp_path):
    rows = [{"prompt": "a", "chosen": "b", "rejected": "c"}, {"prompt": "a", "chosen": "b", "rejected": "c", "x": 1}]
    loaded = load_preference_dataset(str(write_jsonl(tmp_path / "d.jsonl", rows)))
    assert loaded.column_names == ["prompt", "chosen", "rejected", "x"]
    assert loaded["x"][:] == [None, 1]


def test_hub_name_goes_to_load_dataset_with_split(monkeypatch):
    calls = []

    def fake_load_dataset(name, split):
        calls.append((name, split))
        return datasets.Dataset.from_list(STANDARD_ROWS)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    assert rows_of(load_preference_dataset("trl-lib/tldr-preference", split="validation")) == STANDARD_ROWS
    assert calls == [("trl-lib/tldr-preference", "validation")]


def test_hub_failure_is_a_one_line_data_error(monkeypatch):
    def failing(name, split):
        raise ValueError('Unknown split "dev".\nShould be one of [\'train\'].')

    monkeypatch.setattr(datasets, "load_dataset", failing)
    with pytest.raises(DataError) as info:
        load_preference_dataset("org/prefs", split="dev")
    message = str(info.value)
    assert message.startswith("org/prefs: ") and "Unknown split" in message and "\n" not in message


# ------------------------------------------------------------------------------------------- bad sources


def test_missing_file(tmp_path):
    path = tmp_path / "nope.jsonl"
    with pytest.raises(DataError) as info:
        load_preference_dataset(str(path))
    assert str(info.value) == f"{path}: file not found"


def test_malformed_json_line_names_file_row_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps(STANDARD_ROWS[0])
    # Line 2 is blank (ignored), so the bad line 4 is row 2.
    path.write_text(f"{good}\n\n{good}\n{{\"prompt\": \"a\", \"chosen\": \n{good}\n")
    with pytest.raises(DataError) as info:
        load_preference_dataset(str(path))
    assert str(info.value).startswith(f"{path}: row 2 (line 4): malformed JSON")
    assert (info.value.row, info.value.line) == (2, 4)


def test_malformed_json_array_names_line(tmp_path):
    path = tmp_path / "d.json"
    path.write_text('[\n  {"prompt": "a"},\n  {"prompt": }\n]\n')
    with pytest.raises(DataError) as info:
        load_preference_dataset(str(path))
    assert str(info.value).startswith(f"{path}: line 3: malformed JSON")


def test_jsonl_line_that_is_not_an_object(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(STANDARD_ROWS[0]) + "\n[1, 2]\n")
    with pytest.raises(DataError, match=r"row 1 \(line 2\): expected a JSON object, got list"):
        load_preference_dataset(str(path))


def test_empty_file(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match="no rows"):
        load_preference_dataset(str(path))


def test_unsupported_file_type(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError, match="unsupported file type '.csv'"):
        load_preference_dataset(str(path))


def test_pickled_data_error_keeps_its_parts():
    import pickle

    err = DataError("f.jsonl", "empty response", row=3, field="chosen", line=4)
    again = pickle.loads(pickle.dumps(err))
    assert str(again) == str(err) == "f.jsonl: row 3 (line 4), field 'chosen': empty response"
    assert (again.source, again.row, again.field, again.line) == ("f.jsonl", 3, "chosen", 4)


# ------------------------------------------------------------------------------------------- splits of single files


def test_single_file_has_only_its_split(tmp_path):
    """A lone file is the train split: eval_split=validation on it must not silently evaluate on training rows."""
    path = write_jsonl(tmp_path / "prefs.jsonl", STANDARD_ROWS)
    assert rows_of(load_preference_dataset(str(path), split="train")) == STANDARD_ROWS
    assert rows_of(load_preference_dataset(str(path), split=None)) == STANDARD_ROWS
    for split in ("validation", "test"):
        with pytest.raises(DataError) as info:
            load_preference_dataset(str(path), split=split)
        assert str(info.value) == f"{path}: unknown split {split!r}; available splits: train"


def test_file_named_after_a_split_answers_to_it(tmp_path):
    path = write_jsonl(tmp_path / "test.jsonl", STANDARD_ROWS)
    assert rows_of(load_preference_dataset(str(path), split="test")) == STANDARD_ROWS
    with pytest.raises(DataError, match="unknown split 'validation'; available splits: test, train"):
        load_preference_dataset(str(path), split="validation")


def test_no_split_takes_the_only_one_and_refuses_to_guess_among_several(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", STANDARD_ROWS[:2])
    write_jsonl(tmp_path / "test.jsonl", STANDARD_ROWS[2:])
    with pytest.raises(DataError, match="no split given and the source has several; available splits: test, train"):
        load_preference_dataset(str(tmp_path), split=None)
    (tmp_path / "test.jsonl").unlink()
    assert rows_of(load_preference_dataset(str(tmp_path), split=None)) == STANDARD_ROWS[:2]


def test_hub_without_split_takes_the_only_one(monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", lambda name, split: datasets.DatasetDict(
        {"test": datasets.Dataset.from_list(STANDARD_ROWS)}))
    assert rows_of(load_preference_dataset("org/prefs", split=None)) == STANDARD_ROWS


# ------------------------------------------------------------------------------------------- BOM, duplicate keys


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_utf8_byte_order_mark_is_accepted(tmp_path, suffix):
    path = tmp_path / f"d{suffix}"
    text = "\n".join(json.dumps(r) for r in STANDARD_ROWS) if suffix == ".jsonl" else json.dumps(STANDARD_ROWS)
    path.write_bytes(b"\xef\xbb\xbf" + text.encode())
    assert rows_of(load_preference_dataset(str(path))) == STANDARD_ROWS


def test_duplicate_key_in_a_jsonl_row_names_row_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(STANDARD_ROWS[0]) + "\n\n" + '{"prompt": "a", "chosen": "b", "chosen": "c", '
                    '"rejected": "d"}\n')
    with pytest.raises(DataError) as info:
        load_preference_dataset(str(path))
    assert str(info.value).startswith(f"{path}: row 1 (line 3): duplicate key 'chosen'")


def test_duplicate_key_in_a_json_array_names_the_row_even_when_nested(tmp_path):
    path = tmp_path / "d.json"
    bad = '{"prompt": [{"role": "user", "content": "a", "role": "system"}], "chosen": [], "rejected": []}'
    path.write_text("[" + json.dumps(CONVERSATION_ROWS[0]) + ",\n" + bad + "]")
    with pytest.raises(DataError) as info:
        load_preference_dataset(str(path))
    assert str(info.value).startswith(f"{path}: row 1: duplicate key 'role'")
