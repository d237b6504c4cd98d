"""PreferenceCollator: one [2B, T] batch, chosen rows first, masks marking exactly the response tokens."""

from __future__ import annotations

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

from chipo.data import PreferenceCollator

PAD = 0
FEATURES = [
    # lengths: chosen 2 + 3 = 5, rejected 2 + 1 = 3
    {"row": 7, "prompt_input_ids": [11, 12], "chosen_input_ids": [21, 22, 23], "rejected_input_ids": [31]},
    # lengths: chosen 3 + 1 = 4, rejected 3 + 4 = 7 (the longest)
    {"row": 3, "prompt_input_ids": [13, 14, 15], "chosen_input_ids": [24], "rejected_input_ids": [32, 33, 34, 35]},
]


def test_shapes_order_and_padding():
    batch = PreferenceCollator(pad_token_id=PAD)(FEATURES)
    assert set(batch) == {"input_ids", "attention_mask", "response_mask", "row"}
    assert batch["input_ids"].shape == batch["attention_mask"].shape == batch["response_mask"].shape == (4, 7)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == batch["row"].dtype == torch.long
    assert batch["response_mask"].dtype == torch.bool
    assert batch["input_ids"].tolist() == [
        [11, 12, 21, 22, 23, PAD, PAD],  # chosen of row 7
        [13, 14, 15, 24, PAD, PAD, PAD],  # chosen of row 3
        [11, 12, 31, PAD, PAD, PAD, PAD],  # rejected of row 7
        [13, 14, 15, 32, 33, 34, 35],  # rejected of row 3
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 1]]
    assert batch["row"].tolist() == [7, 3]


def test_response_mask_marks_exactly_the_response_tokens():
    batch = PreferenceCollator(pad_token_id=PAD)(FEATURES)
    assert batch["response_mask"].int().tolist() == [
        [0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0], [0, 0, 0, 1, 1, 1, 1]]
    responses = [f["chosen_input_ids"] for f in FEATURES] + [f["rejected_input_ids"] for f in FEATURES]
    for i, response in enumerate(responses):
        assert batch["input_ids"][i][batch["response_mask"][i]].tolist() == response
    # Never padding, never the first position (a prompt token).
    assert not (batch["response_mask"] & (batch["attention_mask"] == 0)).any()
    assert not batch["response_mask"][:, 0].any()


@pytest.mark.parametrize(("multiple", "width"), [(None, 7), (1, 7), (4, 8), (7, 7), (16, 16)])
def test_pad_to_multiple_of(multiple, width):
    batch = PreferenceCollator(pad_token_id=PAD, pad_to_multiple_of=multiple)(FEATURES)
    assert batch["input_ids"].shape == (4, width)
    assert (batch["input_ids"][:, 7:] == PAD).all() and not batch["attention_mask"][:, 7:].any()


def test_non_zero_pad_id_is_used():
    batch = PreferenceCollator(pad_token_id=99)(FEATURES)
    assert batch["input_ids"][0, 5:].tolist() == [99, 99]


def test_reference_logps_pass_through_when_every_feature_has_them():
    features = [{**f, "ref_chosen_logps": -1.5 - i, "ref_rejected_logps": -2.5 - i} for i, f in enumerate(FEATURES)]
    batch = PreferenceCollator(pad_token_id=PAD)(features)
    assert batch["ref_chosen_logps"].dtype == torch.float32
    assert batch["ref_chosen_logps"].tolist() == [-1.5, -2.5]
    assert batch["ref_rejected_logps"].tolist() == [-2.5, -3.5]


def test_reference_logps_in_some_features_only_is_an_error():
    features = [{**FEATURES[0], "ref_chosen_logps": -1.0}, FEATURES[1]]
    with pytest.raises(ValueError, match="ref_chosen_logps is present in 1 of 2 features"):
        PreferenceCollator(pad_token_id=PAD)(features)


def test_accepts_tensor_features():
    # A dataset with with_format("torch") yields tensors rather than lists.
    features = [{k: torch.tensor(v) for k, v in f.items()} for f in FEATURES]
    expected = PreferenceCollator(pad_token_id=PAD)(FEATURES)
    batch = PreferenceCollator(pad_token_id=PAD)(features)
    assert all(torch.equal(batch[k], expected[k]) for k in expected)


def test_prepared_rows_collate_back_to_the_text():
    import datasets

    from chipo.data import prepare_preference_dataset
    from chipo.toy import build_tokenizer

    tokenizer = build_tokenizer()
    rows = [{"prompt": "the cat", "chosen": " sat on the mat.", "rejected": " bad."},
            {"prompt": "why is this short", "chosen": " good.", "rejected": " a long long answer."}]
    prepared, _ = prepare_preference_dataset(datasets.Dataset.from_list(rows), tokenizer, source="mem", max_length=64)
    batch = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)([prepared[0], prepared[1]])
    texts = [r["chosen"] for r in rows] + [r["rejected"] for r in rows]
    for i, text in enumerate(texts):
        response = batch["input_ids"][i][batch["response_mask"][i]].tolist()
        assert tokenizer.decode(response) == text + tokenizer.eos_token
        prompt = batch["input_ids"][i][(batch["attention_mask"][i] == 1) & ~batch["response_mask"][i]].tolist()
        assert tokenizer.decode(prompt) == rows[i % 2]["prompt"]


@given(st.lists(st.tuples(st.lists(st.integers(1, 99), max_size=6), st.lists(st.integers(1, 99), max_size=6)),
                min_size=1, max_size=8),
       st.sampled_from([None, 1, 4]))
def test_right_pad_places_each_row_from_column_zero(rows, multiple):
    """Row i holds prompt_i + response_i from column 0, then PAD; attention 1 exactly on those tokens, the response
    mask on the response part; width = the longest row rounded up to ``multiple`` (checked row by row against
    that definition, so the vectorised scatter cannot shift tokens between rows)."""
    from chipo.data.collator import right_pad

    assume(any(p or r for p, r in rows))
    prompts, responses = [p for p, _ in rows], [r for _, r in rows]
    input_ids, attention_mask, response_mask = right_pad(prompts, responses, PAD, multiple)
    longest = max(len(p) + len(r) for p, r in rows)
    assert input_ids.shape[1] == (-(-longest // multiple) * multiple if multiple else longest)
    for i, (p, r) in enumerate(rows):
        end = len(p) + len(r)
        assert input_ids[i].tolist() == p + r + [PAD] * (input_ids.shape[1] - end)
        assert attention_mask[i].tolist() == [1] * end + [0] * (input_ids.shape[1] - end)
        assert response_mask[i].tolist() == [False] * len(p) + [True] * len(r) + [False] * (input_ids.shape[1] - end)
    assert input_ids.dtype == attention_mask.dtype == torch.long and response_mask.dtype == torch.bool


def test_right_pad_rejects_mismatched_lists():
    from chipo.data.collator import right_pad

    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        right_pad([[1], [2]], [[3]], PAD)
