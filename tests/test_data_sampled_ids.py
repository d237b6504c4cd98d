"""Preference rows that carry their sampled token ids train on exactly those ids (issue: lab pairs are samples).

Decoding a sample, stripping it and re-tokenizing the text is not the identity (BPE merges differ, whitespace is
lost) and appends an EOS even to an unfinished response; rows from ``generate_preferences`` therefore carry the ids
as sampled, and ``prepare_preference_dataset`` uses them.
"""

from __future__ import annotations

import datasets
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from chipo.data import DataError, prepare_preference_dataset
from chipo.lab.generate import generate_preferences


class _LengthGold:
    name = "length"

    def score(self, prompts, responses):
        return [len(r) / 10.0 for r in responses]


def test_generated_pairs_train_on_the_sampled_ids(tiny_dir):
    from chipo.generation import SamplingSettings

    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "model")
    rows, _ = generate_preferences(model, tokenizer, ["why is the cat short? ", "a dog"], _LengthGold(),
                                   pairs_per_prompt=4, scale=1.0, settings=SamplingSettings(max_new_tokens=3, seed=1),
                                   progress=False)
    assert rows
    unfinished = [r for r in rows if r["chosen_token_ids"][-1] != tokenizer.eos_token_id]
    assert unfinished, "with 3 new tokens some samples are cut: they must keep no EOS"
    prepared, _ = prepare_preference_dataset(datasets.Dataset.from_list(rows), tokenizer, source="pairs",
                                             max_length=64, drop_ties=True)
    kept = {row: i for i, row in enumerate(prepared["row"])}
    for row, r in enumerate(rows):
        if row in kept:
            got = prepared[kept[row]]
            assert got["prompt_input_ids"] == r["prompt_token_ids"]
            assert got["chosen_input_ids"] == r["chosen_token_ids"]
            assert got["rejected_input_ids"] == r["rejected_token_ids"]


@pytest.mark.parametrize("bad", [[], [-1]])
def test_malformed_sampled_ids_are_one_line_errors(tiny_dir, bad):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "model")
    good = {"prompt": "p", "chosen": "a", "rejected": "b", "prompt_token_ids": [1, 2], "chosen_token_ids": [3],
            "rejected_token_ids": [4]}
    rows = [good, dict(good, rejected_token_ids=bad)]
    with pytest.raises(DataError) as info:
        prepare_preference_dataset(datasets.Dataset.from_list(rows), tokenizer, source="pairs.jsonl", max_length=64)
    message = str(info.value)
    assert message.startswith("pairs.jsonl: row 1") and "rejected_token_ids" in message and "\n" not in message
