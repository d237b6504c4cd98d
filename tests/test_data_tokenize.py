"""Tokenization, chat-template rendering, implicit prompts and the truncation policy, against hand counts."""

from __future__ import annotations

import datasets
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from chipo.data import (
    CONVERSATIONAL,
    IMPLICIT_PROMPT,
    DataError,
    lengths,
    prepare_preference_dataset,
    split_implicit_prompt,
)
from chipo.toy import build_tokenizer

PAD, BOS, EOS = 0, 1, 2
WORDS = ["<pad>", "<bos>", "<eos>"] + list("abcdefghijklmnopqrstuvwxyz")


def word_tokenizer() -> PreTrainedTokenizerFast:
    """One token per space-separated letter, BOS added by add_special_tokens=True: lengths count by hand."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", BOS)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<bos>", eos_token="<eos>")


def ids(text: str) -> list[int]:
    return [WORDS.index(w) for w in text.split()]


@pytest.fixture(scope="module")
def words():
    return word_tokenizer()


@pytest.fixture(scope="module")
def toy():
    return build_tokenizer()


def prepare(rows, tokenizer, **kwargs):
    return prepare_preference_dataset(datasets.Dataset.from_list(rows), tokenizer, source="mem", **kwargs)


def msgs(*pairs: tuple[str, str]) -> list[dict]:
    return [{"role": role, "content": content} for role, content in pairs]


# ------------------------------------------------------------------------------------------- standard


def test_standard_prompt_gets_bos_responses_get_eos(words):
    prepared, stats = prepare([{"prompt": "a b", "chosen": "c d", "rejected": "e"}], words, max_length=32)
    assert prepared[0] == {"row": 0, "prompt_input_ids": [BOS] + ids("a b"), "chosen_input_ids": ids("c d") + [EOS],
                           "rejected_input_ids": ids("e") + [EOS]}
    assert (stats.truncated_prompts, stats.truncated_responses, stats.dropped_ties) == (0, 0, 0)


# Prompt "a b c d e" is 6 tokens with BOS; chosen "x y z" is 4 with EOS; rejected "x" is 2 with EOS.
TRUNCATION_ROW = {"prompt": "a b c d e", "chosen": "x y z", "rejected": "x"}


@pytest.mark.parametrize(("max_length", "max_prompt_length", "prompt", "chosen", "rejected", "cut_prompts",
                          "cut_responses"), [
    # fits exactly: 6 + 4 = 10
    (10, None, "<bos> a b c d e", "x y z <eos>", "x <eos>", 0, 0),
    # budget 8 - 6 = 2: chosen keeps its first 2 tokens (and loses EOS); rejected (2) fits
    (8, None, "<bos> a b c d e", "x y", "x <eos>", 0, 1),
    # budget 7 - 6 = 1: both responses cut
    (7, None, "<bos> a b c d e", "x", "x", 0, 2),
    # prompt keeps its LAST 4 tokens (BOS and "a" dropped); budget 8 - 4 = 4 fits chosen exactly
    (8, 4, "b c d e", "x y z <eos>", "x <eos>", 1, 0),
    # both rules: prompt to 3, budget 5 - 3 = 2
    (5, 3, "c d e", "x y", "x <eos>", 1, 1),
    # max_prompt_length longer than the prompt: no cut
    (10, 6, "<bos> a b c d e", "x y z <eos>", "x <eos>", 0, 0),
])
def test_truncation_rules(words, max_length, max_prompt_length, prompt, chosen, rejected, cut_prompts, cut_responses):
    def to_ids(text):
        return [WORDS.index(w) for w in text.split()]

    prepared, stats = prepare([TRUNCATION_ROW], words, max_length=max_length, max_prompt_length=max_prompt_length)
    row = prepared[0]
    assert row["prompt_input_ids"] == to_ids(prompt)
    assert row["chosen_input_ids"] == to_ids(chosen)
    assert row["rejected_input_ids"] == to_ids(rejected)
    assert (stats.truncated_prompts, stats.truncated_responses) == (cut_prompts, cut_responses)
    assert lengths(prepared) == [len(to_ids(prompt)) + max(len(to_ids(chosen)), len(to_ids(rejected)))]
    assert lengths(prepared)[0] <= max_length


@pytest.mark.parametrize(("max_length", "max_prompt_length"), [(6, None), (3, 3)])
def test_prompt_filling_max_length_is_an_error(words, max_length, max_prompt_length):
    with pytest.raises(DataError) as info:
        prepare([{"prompt": "z", "chosen": "a", "rejected": "b"}, TRUNCATION_ROW], words, max_length=max_length,
                max_prompt_length=max_prompt_length)
    expected_tokens = 6 if max_prompt_length is None else max_prompt_length
    assert info.value.row == 1 and info.value.field == "prompt"
    assert f"it has {expected_tokens} tokens" in info.value.message
    assert f"max_length is {max_length}" in info.value.message


def test_empty_prompt_without_bos_is_an_error(toy):
    # The toy tokenizer adds no BOS, so an empty prompt leaves nothing to predict the first response token from.
    with pytest.raises(DataError, match="row 0, field 'prompt': the prompt has no tokens"):
        prepare([{"prompt": "", "chosen": " good", "rejected": " bad"}], toy, max_length=32)


def test_empty_prompt_with_bos_is_fine(words):
    prepared, _ = prepare([{"prompt": "", "chosen": "a", "rejected": "b"}], words, max_length=8)
    assert prepared[0]["prompt_input_ids"] == [BOS]


def test_lengths_follow_a_selection(words):
    rows = [{"prompt": "a", "chosen": "b c d", "rejected": "e"}, {"prompt": "a b c", "chosen": "d", "rejected": "e f"}]
    prepared, _ = prepare(rows, words, max_length=32)
    assert lengths(prepared) == [2 + 4, 4 + 3]
    assert lengths(prepared.select([1, 0])) == [7, 6]


def test_row_column_is_the_original_index_and_num_proc_keeps_order(words):
    rows = [{"prompt": "a " * (i + 1), "chosen": "b", "rejected": "c"} for i in range(6)]
    prepared, stats = prepare(rows, words, max_length=32, num_proc=2)
    assert prepared["row"][:] == list(range(6))
    assert [len(p) for p in prepared["prompt_input_ids"]] == [i + 2 for i in range(6)]
    assert stats.rows == 6


# ------------------------------------------------------------------------------------------- conversations


def test_conversational_rendering_equals_manual_chat_template(toy):
    prompt = msgs(("system", "be short"), ("user", "why is the cat on the mat"))
    chosen, rejected = msgs(("assistant", "a good answer")), msgs(("assistant", "bad dog"))
    prepared, stats = prepare([{"prompt": prompt, "chosen": chosen, "rejected": rejected}], toy, max_length=256)
    assert stats.format == CONVERSATIONAL

    prompt_text = toy.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    row = prepared[0]
    assert row["prompt_input_ids"] == toy(prompt_text, add_special_tokens=False)["input_ids"]
    for field, response in (("chosen", chosen), ("rejected", rejected)):
        full = toy.apply_chat_template(prompt + response, tokenize=False)
        response_text = full[len(prompt_text):]
        assert response_text == f"{response[0]['content']}<|end|>\n"  # what the toy template adds
        expected = toy(response_text, add_special_tokens=False)["input_ids"] + [toy.eos_token_id]
        assert row[f"{field}_input_ids"] == expected
        assert toy.decode(row["prompt_input_ids"] + row[f"{field}_input_ids"]) == full + toy.eos_token


def test_no_extra_eos_when_the_template_ends_responses_with_it():
    tokenizer = build_tokenizer()
    # Assistant turns end with the EOS token text (as Qwen/Llama-3 style templates do), then a newline.
    tokenizer.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
        "{% if m['role'] == 'assistant' %}<|eos|>\n{% else %}<|end|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    prompt, chosen, rejected = msgs(("user", "hi")), msgs(("assistant", "good")), msgs(("assistant", "bad"))
    prepared, _ = prepare([{"prompt": prompt, "chosen": chosen, "rejected": rejected}], tokenizer, max_length=64)
    expected = tokenizer("good<|eos|>\n", add_special_tokens=False)["input_ids"]
    assert prepared[0]["chosen_input_ids"] == expected
    assert expected.count(tokenizer.eos_token_id) == 1


def test_message_keys_missing_in_some_rows_are_not_passed_as_none(toy):
    # Arrow gives every message the union of keys; a template that tests `'name' in m` must not see name=None.
    toy_named = build_tokenizer()
    named = "{% if 'name' in message %}[{{ message['name'] }}]{% endif %}{{ message['content'] }}"
    toy_named.chat_template = toy.chat_template.replace("{{ message['content'] }}", named)
    rows = [{"prompt": msgs(("user", "hi")), "chosen": msgs(("assistant", "a")), "rejected": msgs(("assistant", "b"))},
            {"prompt": [{"role": "user", "content": "hi", "name": "bob"}], "chosen": msgs(("assistant", "a")),
             "rejected": msgs(("assistant", "b"))}]
    prepared, _ = prepare(rows, toy_named, max_length=64)
    assert "[None]" not in toy_named.decode(prepared[0]["prompt_input_ids"])
    assert "[bob]" in toy_named.decode(prepared[1]["prompt_input_ids"])


# ------------------------------------------------------------------------------------------- implicit prompt


def test_split_implicit_prompt_takes_the_longest_common_prefix():
    u1, a1, u2 = ("user", "hi"), ("assistant", "hello"), ("user", "why")
    prompt, chosen, rejected, problem = split_implicit_prompt(msgs(u1, a1, u2, ("assistant", "because")),
                                                              msgs(u1, a1, u2, ("assistant", "no")))
    assert problem is None
    assert prompt == msgs(u1, a1, u2)
    assert chosen == msgs(("assistant", "because")) and rejected == msgs(("assistant", "no"))


def test_split_implicit_prompt_edge_cases():
    conversation = msgs(("user", "hi"), ("assistant", "a"))
    prompt, chosen, rejected, problem = split_implicit_prompt(conversation, conversation)
    assert (prompt, chosen, rejected, problem) == (conversation[:1], conversation[1:], conversation[1:], None)
    assert "share no leading" in split_implicit_prompt(msgs(("user", "x")), msgs(("user", "y")))[3]
    assert "the chosen conversation is a prefix" in split_implicit_prompt(conversation[:1], conversation)[3]


def test_implicit_prompt_prepares_like_the_explicit_conversation(toy):
    shared = msgs(("system", "be short"), ("user", "why"))
    chosen, rejected = msgs(("assistant", "because")), msgs(("assistant", "no"))
    implicit, stats = prepare([{"chosen": shared + chosen, "rejected": shared + rejected}], toy, max_length=64)
    explicit, _ = prepare([{"prompt": shared, "chosen": chosen, "rejected": rejected}], toy, max_length=64)
    assert stats.format == IMPLICIT_PROMPT
    assert implicit[0] == explicit[0]


# ------------------------------------------------------------------------------------------- special-token strings


def test_special_token_strings_in_standard_text_stay_text(toy):
    """"<|eos|>" typed in a response is the 7 characters, not EOS (id 2): it must not end the response early, and
    the response still gets its one real EOS at the end. Expected ids: the text tokenized with special-token
    parsing off, plus EOS."""
    row = {"prompt": "why <|user|> is", "chosen": " good <|eos|> answer", "rejected": " bad<|end|>"}
    prepared, _ = prepare([row], toy, max_length=256)
    eos = toy.eos_token_id
    specials = set(toy.all_special_ids)
    for field in ("prompt", "chosen", "rejected"):
        got = prepared[0][f"{field}_input_ids"]
        plain = toy([row[field]], add_special_tokens=field == "prompt", split_special_tokens=True)["input_ids"][0]
        assert got == (plain if field == "prompt" else plain + [eos])
        assert not specials & set(got[:-1] if field != "prompt" else got)
    assert toy.decode(prepared[0]["chosen_input_ids"][:-1]) == " good <|eos|> answer"


def test_special_token_strings_in_message_content_stay_text_template_markers_stay_special(toy):
    """Conversational data: the template's <|user|>/<|assistant|>/<|end|> are special tokens; the same strings
    inside message content are characters. Expected prompt ids: [<|user|>] + text_ids(content) + [<|end|>] +
    ids("\n") + [<|assistant|>]."""
    content = "say <|end|> and <|eos|>"
    row = {"prompt": msgs(("user", content)), "chosen": msgs(("assistant", "ok <|eos|>")),
           "rejected": msgs(("assistant", "no"))}
    prepared, _ = prepare([row], toy, max_length=256)
    tid = toy.convert_tokens_to_ids
    plain = lambda text: toy([text], add_special_tokens=False, split_special_tokens=True)["input_ids"][0]  # noqa: E731
    newline = toy(["\n"], add_special_tokens=False)["input_ids"][0]
    assert prepared[0]["prompt_input_ids"] == [tid("<|user|>"), *plain(content), tid("<|end|>"), *newline,
                                               tid("<|assistant|>")]
    # chosen: content as text, the template's <|end|> and newline, then EOS (the template wrote no EOS; the typed
    # "<|eos|>" at the end of the content does not count as one)
    assert prepared[0]["chosen_input_ids"] == [*plain("ok <|eos|>"), tid("<|end|>"), *newline, toy.eos_token_id]


def test_rows_without_special_strings_tokenize_as_before(toy):
    """The piecewise path is only taken for content holding a special-token string: ordinary rows are the whole
    rendered text tokenized once (the chat-template equality test above pins that too)."""
    row = {"prompt": msgs(("user", "hi there")), "chosen": msgs(("assistant", "hello")),
           "rejected": msgs(("assistant", "go"))}
    prepared, _ = prepare([row], toy, max_length=256)
    text = toy.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
    assert prepared[0]["prompt_input_ids"] == toy([text], add_special_tokens=False)["input_ids"][0]


def test_template_that_rewrites_content_holding_a_special_string_is_refused():
    tokenizer = build_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] | upper }}<|end|>"
                               "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")
    row = {"prompt": msgs(("user", "a <|eos|> b")), "chosen": msgs(("assistant", "x")),
           "rejected": msgs(("assistant", "y"))}
    with pytest.raises(DataError, match=r"row 0, field 'prompt': .*rewrites message content"):
        prepare([row], tokenizer, max_length=256)


def test_conversational_rows_need_a_chat_template(words):
    row = {"prompt": msgs(("user", "a")), "chosen": msgs(("assistant", "b")), "rejected": msgs(("assistant", "c"))}
    with pytest.raises(DataError) as info:
        prepare([row], words, max_length=32)
    assert str(info.value).startswith("mem: conversational rows") and "chat template" in str(info.value)
    assert "\n" not in str(info.value)
