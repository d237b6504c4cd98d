"""Every bad row is refused before anything trains, with a DataError naming the file, row (line) and field."""

from __future__ import annotations

import json
import warnings

import datasets
import pytest

from chipo.data import (
    CONVERSATIONAL,
    IMPLICIT_PROMPT,
    STANDARD,
    DataError,
    detect_format,
    load_preference_dataset,
    prepare_preference_dataset,
)
from chipo.toy import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def good_row(i: int = 0) -> dict:
    return {"prompt": f"the cat {i}", "chosen": " sat on the mat.", "rejected": " bad dog."}


def msgs(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


def good_conversation() -> dict:
    return {"prompt": msgs(("user", "hi")), "chosen": msgs(("assistant", "hello")),
            "rejected": msgs(("assistant", "go away"))}


def prepare_file(tmp_path, rows, tokenizer, **kwargs):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dataset = load_preference_dataset(str(path))
    kwargs.setdefault("max_length", 64)
    return path, prepare_preference_dataset(dataset, tokenizer, source=str(path), **kwargs)


def expect_error(tmp_path, rows, tokenizer, *, row: int, field: str, match: str, **kwargs) -> DataError:
    """The error names the file, the row with its 1-based line (rows are written one per line) and the field."""
    with pytest.raises(DataError) as info:
        prepare_file(tmp_path, rows, tokenizer, **kwargs)
    path = tmp_path / "train.jsonl"
    assert str(info.value).startswith(f"{path}: row {row} (line {row + 1}), field '{field}': ")
    assert match in info.value.message
    assert "\n" not in str(info.value)
    return info.value


# ------------------------------------------------------------------------------------------- format detection


@pytest.mark.parametrize(("row", "expected"), [
    (good_row(), STANDARD),
    (good_conversation(), CONVERSATIONAL),
    ({"chosen": msgs(("user", "hi"), ("assistant", "a")), "rejected": msgs(("user", "hi"), ("assistant", "b"))},
     IMPLICIT_PROMPT),
])
def test_detect_format(row, expected):
    assert detect_format(datasets.Dataset.from_list([row]), "mem") == expected


def test_extra_columns_are_ignored(tmp_path, tokenizer):
    _, (prepared, stats) = prepare_file(tmp_path, [{**good_row(), "score": 3.5, "meta": {"a": 1}}], tokenizer)
    assert prepared.column_names == ["row", "prompt_input_ids", "chosen_input_ids", "rejected_input_ids"]
    assert stats.format == STANDARD


# ------------------------------------------------------------------------------------------- bad rows


def test_missing_column(tmp_path, tokenizer):
    rows = [{"prompt": "a", "chosen": "b"}] * 2
    expect_error(tmp_path, rows, tokenizer, row=0, field="rejected", match="missing column 'rejected'")


def test_string_responses_without_prompt_column(tmp_path, tokenizer):
    rows = [{"chosen": "b", "rejected": "c"}]
    expect_error(tmp_path, rows, tokenizer, row=0, field="prompt", match="missing column 'prompt'")


def test_value_missing_from_one_row(tmp_path, tokenizer):
    rows = [good_row(0), good_row(1), {"prompt": "a", "chosen": "b"}]
    expect_error(tmp_path, rows, tokenizer, row=2, field="rejected", match="expected a string, got null")


@pytest.mark.parametrize("empty", ["", "   \n\t"])
def test_empty_response(tmp_path, tokenizer, empty):
    rows = [good_row(0), good_row(1), good_row(2), {**good_row(3), "chosen": empty}]
    err = expect_error(tmp_path, rows, tokenizer, row=3, field="chosen", match="empty response")
    assert err.row == 3 and err.line == 4 and err.field == "chosen"


def test_non_string_response(tmp_path, tokenizer):
    rows = [good_row(0), {**good_row(1), "rejected": 5}]
    expect_error(tmp_path, rows, tokenizer, row=1, field="rejected", match="expected a string, got int 5")


def test_prompt_of_wrong_type(tmp_path, tokenizer):
    rows = [good_row(0), {**good_row(1), "prompt": ["not", "a", "string"]}]
    expect_error(tmp_path, rows, tokenizer, row=1, field="prompt", match="expected a string, got list")


@pytest.mark.parametrize(("field", "value", "match"), [
    ("prompt", [], "malformed message list: empty"),
    ("prompt", [{"role": "user"}], "message 0 'content' must be a string, got null"),
    ("prompt", [{"role": "user", "content": "hi"}, {"content": "x"}], "message 1 'role' must be a non-empty string"),
    ("chosen", [{"role": "assistant", "content": 3}], "message 0 'content' must be a string, got int 3"),
    ("chosen", ["hello"], "message 0 is str 'hello', expected a dict"),
    ("rejected", "plain text", "malformed message list: expected a list of messages, got str"),
    ("rejected", [{"role": "assistant", "content": "  "}], "empty response"),
])
def test_malformed_message_list(tmp_path, tokenizer, field, value, match):
    rows = [good_conversation(), {**good_conversation(), field: value}]
    expect_error(tmp_path, rows, tokenizer, row=1, field=field, match=match)


def test_implicit_prompt_pair_sharing_no_prefix(tmp_path, tokenizer):
    rows = [{"chosen": msgs(("user", "hi"), ("assistant", "a")), "rejected": msgs(("user", "hi"), ("assistant", "b"))},
            {"chosen": msgs(("user", "hi"), ("assistant", "a")), "rejected": msgs(("user", "yo"), ("assistant", "b"))}]
    expect_error(tmp_path, rows, tokenizer, row=1, field="chosen/rejected", match="share no leading message")


def test_implicit_prompt_pair_with_empty_response(tmp_path, tokenizer):
    rows = [{"chosen": msgs(("user", "hi")), "rejected": msgs(("user", "hi"), ("assistant", "b"))}]
    expect_error(tmp_path, rows, tokenizer, row=0, field="chosen/rejected", match="empty response")


def test_prompt_too_long(tmp_path, tokenizer):
    rows = [good_row(0), {**good_row(1), "prompt": "the cat sat on the mat " * 20}]
    err = expect_error(tmp_path, rows, tokenizer, row=1, field="prompt",
                       match="prompt leaves no room for the response", max_length=16)
    assert "max_length is 16" in err.message


def test_prompt_too_long_through_worker_processes(tmp_path, tokenizer):
    rows = [good_row(i) for i in range(4)] + [{**good_row(4), "prompt": "the cat sat on the mat " * 20}]
    expect_error(tmp_path, rows, tokenizer, row=4, field="prompt", match="no room", max_length=16, num_proc=2)


def test_chat_template_that_does_not_extend_the_prompt(tmp_path):
    tokenizer = build_tokenizer()
    # The generation prompt opens with "<|assistant|>\n" but assistant turns are rendered without the newline.
    generation_prompt = "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    tokenizer.chat_template = tokenizer.chat_template.replace(
        generation_prompt, generation_prompt.replace("<|assistant|>", "<|assistant|>\n"))
    expect_error(tmp_path, [good_conversation()], tokenizer, row=0, field="chosen",
                 match="the chat template does not extend the prompt")


def test_transformed_dataset_is_reported_by_row_without_a_stale_line(tmp_path, tokenizer):
    path = tmp_path / "train.jsonl"
    rows = [{**good_row(0), "chosen": ""}, good_row(1)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    reordered = load_preference_dataset(str(path)).select([1, 0])
    with pytest.raises(DataError) as info:
        prepare_preference_dataset(reordered, tokenizer, source=str(path), max_length=64)
    assert str(info.value) == f"{path}: row 1, field 'chosen': empty response"


def test_in_memory_dataset_names_the_given_source(tokenizer):
    dataset = datasets.Dataset.from_list([good_row(0), {**good_row(1), "rejected": " "}])
    with pytest.raises(DataError) as info:
        prepare_preference_dataset(dataset, tokenizer, source="my-prefs", max_length=64)
    assert str(info.value) == "my-prefs: row 1, field 'rejected': empty response"


# ------------------------------------------------------------------------------------------- identical pairs


def test_ties_are_an_error_naming_the_rows(tmp_path, tokenizer):
    same = good_row(0)["chosen"]
    rows = [good_row(0), {**good_row(1), "rejected": same}, good_row(2), {**good_row(3), "rejected": same}]
    with pytest.raises(DataError) as info:
        prepare_file(tmp_path, rows, tokenizer)
    path = tmp_path / "train.jsonl"
    assert str(info.value).startswith(f"{path}: row 1 (line 2): 2 of 4 rows have chosen == rejected (rows 1, 3)")
    assert "drop_ties=true" in str(info.value)


def test_conversational_ties_are_an_error(tmp_path, tokenizer):
    row = good_conversation()
    with pytest.raises(DataError, match=r"row 1 \(line 2\): 1 of 2 rows have chosen == rejected \(rows 1\)"):
        prepare_file(tmp_path, [row, {**row, "rejected": row["chosen"]}], tokenizer)


def test_drop_ties_drops_and_counts_and_rows_keep_their_index(tmp_path, tokenizer, caplog):
    same = good_row(0)["chosen"]
    rows = [good_row(0), {**good_row(1), "rejected": same}, good_row(2), {**good_row(3), "rejected": same}]
    _, (prepared, stats) = prepare_file(tmp_path, rows, tokenizer, drop_ties=True)
    assert (stats.rows, stats.dropped_ties, len(prepared)) == (2, 2, 2)
    assert prepared["row"] == [0, 2]  # the original row numbers, for errors and NaN reports
    assert "dropped 2 of 4 rows with chosen == rejected" in caplog.text
    # A later error still names the original row and line.
    rows[2] = {**good_row(2), "prompt": "the cat " * 80}
    with pytest.raises(DataError, match=r"row 2 \(line 3\), field 'prompt'"):
        prepare_file(tmp_path, rows, tokenizer, drop_ties=True, max_length=32)


def test_no_warning_without_ties(tmp_path, tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, (_, stats) = prepare_file(tmp_path, [good_row(0), good_row(1)], tokenizer)
    assert stats.dropped_ties == 0 and stats.rows == 2


def test_error_in_a_later_shard_names_that_file_and_its_line(tmp_path, tokenizer):
    (tmp_path / "data").mkdir()
    first, second = tmp_path / "data" / "train-00000-of-00002.jsonl", tmp_path / "data" / "train-00001-of-00002.jsonl"
    first.write_text("".join(json.dumps(good_row(i)) + "\n" for i in range(3)))
    second.write_text("\n" + json.dumps(good_row(3)) + "\n" + json.dumps({**good_row(4), "chosen": ""}) + "\n")
    dataset = load_preference_dataset(str(tmp_path))
    with pytest.raises(DataError) as info:
        prepare_preference_dataset(dataset, tokenizer, source=str(tmp_path), max_length=64)
    # Row 4 of the split is the second row of the second file, on its line 3 (line 1 is blank).
    assert str(info.value) == f"{second}: row 4 (line 3), field 'chosen': empty response"


def test_two_files_with_the_same_rows_keep_their_own_lines(tmp_path, tokenizer):
    rows = [good_row(0), {**good_row(1), "chosen": ""}]
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(row) + "\n" for row in rows))
    b.write_text("\n\n" + "".join(json.dumps(row) + "\n" for row in rows))  # same rows, two lines further down
    loaded_a, loaded_b = load_preference_dataset(str(a)), load_preference_dataset(str(b))
    for path, dataset, line in ((a, loaded_a, 2), (b, loaded_b, 4)):
        with pytest.raises(DataError) as info:
            prepare_preference_dataset(dataset, tokenizer, source=str(path), max_length=64)
        assert str(info.value) == f"{path}: row 1 (line {line}), field 'chosen': empty response"
