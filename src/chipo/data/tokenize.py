"""Validate, render, tokenize and truncate preference data into prompt / chosen / rejected token ids.

Tokenization
    standard: the prompt is tokenized with the tokenizer's special tokens (``add_special_tokens=True``: a BOS if
    the tokenizer adds one); each response without them, followed by ``eos_token_id`` so the policy learns to stop.
    conversational and implicit_prompt: the prompt is rendered with
    ``apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)``, each response is the text that
    ``apply_chat_template(prompt + response, tokenize=False)`` adds after it (the row fails if the rendered
    conversation does not start with the rendered prompt). Rendered text is tokenized with
    ``add_special_tokens=False``, since chat templates write their own BOS and markers. EOS is appended to a
    response unless its tokens already end (ignoring trailing whitespace) with the EOS token.
    Prompt and responses are tokenized separately, so a BPE merge never straddles the prompt/response boundary
    and the response tokens are exactly those the policy is scored on.

Special tokens
    Data text is text: a string such as ``"<|eos|>"`` inside a prompt, response or message content is tokenized
    as its characters, never as the special token (``split_special_tokens=True``), so data cannot end a response
    early or forge a chat turn. Only the markers the chat template writes are special tokens: where a message's
    content holds a special-token string, the rendered text is tokenized piecewise (template text with special
    tokens, content without). Pairs with chosen == rejected state no preference: an error naming the rows, or
    dropped and counted with ``drop_ties=True``.

Truncation, in this order
    1. ``max_prompt_length`` (if set): a longer prompt keeps its LAST ``max_prompt_length`` tokens, since the
       end of the prompt is what the response answers (a leading BOS is dropped with the rest);
    2. a prompt of ``max_length`` tokens or more leaves no room for the response: ``DataError``;
    3. each response keeps its FIRST ``max_length - len(prompt)`` tokens (a cut response loses its EOS: it did
       not finish).
    So every ``prompt + response`` fits in ``max_length`` tokens.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import datasets
import pyarrow.compute as pc

from .errors import DataError
from .formats import CONVERSATIONAL, IMPLICIT_PROMPT, STANDARD, detect_format, split_implicit_prompt, validate_rows
from .origin import RowLocator

logger = logging.getLogger(__name__)

ID_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
_PROMPT_CUT, _RESPONSES_CUT = "__prompt_truncated", "__responses_truncated"


@dataclass(frozen=True)
class PrepStats:
    """Counts from ``prepare_preference_dataset``."""

    rows: int
    """Rows prepared (all rows but the dropped ties)."""
    dropped_ties: int
    """Rows with chosen == rejected dropped under ``drop_ties=True`` (their margin is identically 0: no gradient)."""
    truncated_prompts: int
    """Prompts cut to ``max_prompt_length`` (their start dropped)."""
    truncated_responses: int
    """Responses cut to fit ``max_length`` (their end dropped); a row can count twice, once per response."""
    format: str
    """``"standard"``, ``"conversational"`` or ``"implicit_prompt"``."""


def prepare_preference_dataset(
    dataset: datasets.Dataset,
    tokenizer,
    *,
    source: str,
    max_length: int,
    max_prompt_length: int | None = None,
    num_proc: int | None = None,
    drop_ties: bool = False,
) -> tuple[datasets.Dataset, PrepStats]:
    """Validate every row, then render, tokenize and truncate (see the module docstring for the exact rules).

    Args:
        dataset: rows in one of the layouts of ``chipo.data.formats``; extra columns are ignored.
        tokenizer: a ``transformers`` tokenizer with an EOS token (and a chat template for conversations).
        source: the file path or hub name the rows came from, named in every ``DataError``.
        max_length: the most tokens of ``prompt + response``.
        max_prompt_length: if set, longer prompts keep their last ``max_prompt_length`` tokens.
        num_proc: worker processes for the tokenizing ``Dataset.map``.
        drop_ties: drop rows with chosen == rejected (counted in ``PrepStats.dropped_ties``) instead of raising.

    Returns:
        A dataset with int-list columns ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids``
        (responses without the prompt) and ``row`` (the 0-based index of the row in ``dataset``, so dropped ties
        leave gaps), and ``PrepStats``.

    Raises:
        DataError: the first bad row (naming source, row, line for JSON lines, and field): missing column, wrong
            type, empty response, malformed message list, an implicit-prompt pair that cannot be split, a chat
            template that does not extend the prompt, a prompt with no tokens, a prompt that leaves no room for
            the response under ``max_length``; conversational data with a tokenizer lacking a chat template; rows
            with chosen == rejected unless ``drop_ties``.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be at least 2 (one prompt and one response token), got {max_length}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be positive, got {max_prompt_length}")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; responses need one so the policy learns to stop")
    locator = RowLocator(dataset, source)
    fmt = detect_format(dataset, source)
    if fmt != STANDARD and not getattr(tokenizer, "chat_template", None):
        raise DataError(source, f"{fmt} rows (lists of messages) need a tokenizer with a chat template, and "
                                f"{getattr(tokenizer, 'name_or_path', '') or 'this tokenizer'} has none (set "
                                "`tokenizer` to one that has, or use prompt/chosen/rejected strings)")
    ties = validate_rows(dataset, fmt, locator)
    keep = None
    if ties and not drop_ties:
        shown = ", ".join(map(str, ties[:10])) + (f" and {len(ties) - 10} more" if len(ties) > 10 else "")
        raise locator.error(f"{len(ties)} of {len(dataset)} rows have chosen == rejected (rows {shown}): such a pair "
                            "states no preference; fix the data or set drop_ties=true to drop them", row=ties[0])
    if ties:
        tied = set(ties)
        keep = [i for i in range(len(dataset)) if i not in tied]
        if not keep:
            raise locator.error("every row has chosen == rejected; nothing is left after drop_ties")
        logger.warning("%s: dropped %d of %d rows with chosen == rejected (drop_ties)", source, len(ties),
                       len(dataset))
        dataset_to_encode = dataset.select(keep)
    else:
        dataset_to_encode = dataset

    encode = functools.partial(_encode_batch, tokenizer=tokenizer, fmt=fmt, max_length=max_length,
                               max_prompt_length=max_prompt_length, rows=keep)
    try:
        prepared = dataset_to_encode.map(encode, batched=True, with_indices=True,
                                         remove_columns=dataset.column_names, num_proc=num_proc,
                                         desc="Tokenizing preference pairs")
    except DataError as err:  # raised with the row only; name the file and line here, in the parent process
        raise locator.relocate(err) from None
    stats = PrepStats(
        rows=len(prepared),
        dropped_ties=len(ties) if drop_ties else 0,
        truncated_prompts=_count(prepared, _PROMPT_CUT),
        truncated_responses=_count(prepared, _RESPONSES_CUT),
        format=fmt,
    )
    logger.info("%s: prepared %s", source, stats)
    return prepared.remove_columns([_PROMPT_CUT, _RESPONSES_CUT]), stats


def lengths(dataset: datasets.Dataset) -> list[int]:
    """Per row of a prepared dataset, ``len(prompt) + max(len(chosen), len(rejected))``: the padded length of its
    pair in a batch, for grouping rows of similar length."""
    table = dataset.select_columns(list(ID_COLUMNS)).with_format("arrow")[:]
    prompt, chosen, rejected = (pc.list_value_length(table.column(name)) for name in ID_COLUMNS)
    return pc.add(prompt, pc.max_element_wise(chosen, rejected)).to_pylist()


def _count(dataset: datasets.Dataset, column: str) -> int:
    return int(pc.sum(dataset.with_format("arrow")[:].column(column)).as_py() or 0)


def _encode_batch(batch: dict, indices: list[int], *, tokenizer, fmt: str, max_length: int,
                  max_prompt_length: int | None, rows: list[int] | None = None) -> dict:
    # Runs inside Dataset.map (maybe in worker processes): errors carry only the row; prepare_preference_dataset
    # fills in the file and line (RowLocator.relocate), so the source is left empty here. ``rows`` maps positions
    # in the encoded dataset back to rows of the original one (when ties were dropped).
    eos_id = tokenizer.eos_token_id
    indices = list(indices) if rows is None else [rows[i] for i in indices]
    out = {"row": indices, **{name: [] for name in ID_COLUMNS}, _PROMPT_CUT: [], _RESPONSES_CUT: []}
    if not indices:
        return out
    if fmt == STANDARD and SAMPLED_ID_COLUMNS[0] in batch:
        # Rows written from samples (chipo lab generate-prefs) carry the token ids as sampled: use them, so the pair
        # is exactly what pi_ref drew (decoding and re-tokenizing text can change tokens, and an unfinished
        # response has no EOS to add).
        prompts, chosen, rejected = ([_token_list(batch[name][i], row, name) for i, row in enumerate(indices)]
                                     for name in SAMPLED_ID_COLUMNS)
    elif fmt == STANDARD:
        prompts = text_ids(tokenizer, batch["prompt"], add_special_tokens=True)
        chosen = [ids + [eos_id] for ids in text_ids(tokenizer, batch["chosen"])]
        rejected = [ids + [eos_id] for ids in text_ids(tokenizer, batch["rejected"])]
    else:
        rendered = [_render_row(tokenizer, fmt, batch, i, row) for i, row in enumerate(indices)]
        prompts, chosen, rejected = (_rendered_ids(tokenizer, [r[part] for r in rendered]) for part in range(3))
        chosen, rejected = ([_with_eos(tokenizer, ids) for ids in part] for part in (chosen, rejected))

    for row, prompt, chosen_ids, rejected_ids in zip(indices, prompts, chosen, rejected, strict=True):
        prompt, prompt_cut, budget = truncate_prompt(prompt, row, max_length, max_prompt_length)
        out["prompt_input_ids"].append(prompt)
        out["chosen_input_ids"].append(chosen_ids[:budget])
        out["rejected_input_ids"].append(rejected_ids[:budget])
        out[_PROMPT_CUT].append(int(prompt_cut))
        out[_RESPONSES_CUT].append(int(len(chosen_ids) > budget) + int(len(rejected_ids) > budget))
    return out


SAMPLED_ID_COLUMNS = ("prompt_token_ids", "chosen_token_ids", "rejected_token_ids")
"""Optional columns of standard rows: token ids exactly as sampled (prompt with its special tokens; responses with
EOS only when the sample finished). When present they are used instead of tokenizing the text."""


def _token_list(value, row: int, field: str) -> list[int]:
    ids = value.tolist() if hasattr(value, "tolist") else value
    if not isinstance(ids, list) or not ids or not all(isinstance(t, int) and t >= 0 for t in ids):
        raise DataError("", "expected a non-empty list of token ids (non-negative integers)", row=row, field=field)
    return ids


def truncate_prompt(prompt: list[int], row: int, max_length: int, max_prompt_length: int | None,
                    what: str = "response", field: str = "prompt") -> tuple[list[int], bool, int]:
    """The truncation policy's prompt half: (kept prompt ids, whether it was cut, tokens left for the ``what``).

    A prompt longer than ``max_prompt_length`` keeps its last tokens (the end is what the answer follows); an
    empty prompt, or one that leaves no room under ``max_length``, is a ``DataError`` naming ``row`` and ``field``.
    """
    prompt_cut = max_prompt_length is not None and len(prompt) > max_prompt_length
    if prompt_cut:
        prompt = prompt[-max_prompt_length:]
    if not prompt:
        # The first answer token must be predicted from something; with no BOS and an empty prompt it is not.
        raise DataError("", "the prompt has no tokens (use a non-empty prompt or a tokenizer that adds BOS)",
                        row=row, field=field)
    if len(prompt) >= max_length:
        raise DataError("", f"prompt leaves no room for the {what}: it has {len(prompt)} tokens"
                            f"{' after max_prompt_length truncation' if prompt_cut else ''}, "
                            f"max_length is {max_length} (raise max_length or set max_prompt_length)",
                        row=row, field=field)
    return prompt, prompt_cut, max_length - len(prompt)


def token_ids(tokenizer, texts: list[str], add_special_tokens: bool = False,
              split_special_tokens: bool = False) -> list[list[int]]:
    """Token ids of each text (no attention masks); BOS/EOS added only when asked for. Special-token strings in
    the text become special tokens unless ``split_special_tokens`` (then they are tokenized as characters)."""
    kwargs = {"split_special_tokens": True} if split_special_tokens else {}
    return tokenizer(texts, add_special_tokens=add_special_tokens, return_attention_mask=False, **kwargs)["input_ids"]


def text_ids(tokenizer, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
    """Token ids of data text: a special-token string in it stays text (see "Special tokens" above)."""
    return token_ids(tokenizer, texts, add_special_tokens=add_special_tokens, split_special_tokens=True)


def _special_strings(tokenizer) -> list[str]:
    return [t for t in getattr(tokenizer, "all_special_tokens", []) if t]


def _holds_special(tokenizer, contents: list[str]) -> bool:
    return any(s in c for c in contents for s in _special_strings(tokenizer))


def _rendered_ids(tokenizer, pieces: list[tuple[str, list[str]]]) -> list[list[int]]:
    """Token ids of chat-template output ``(text, contents)``: the template's markers are special tokens, the
    message contents (found in ``text`` in order, as ``_render_row`` checked) are data text. Texts whose contents
    hold no special-token string are tokenized whole, as plain rendered text; the others piece by piece."""
    out = token_ids(tokenizer, [text for text, _ in pieces])
    for k, (text, contents) in enumerate(pieces):
        if not _holds_special(tokenizer, contents):
            continue
        ids, cursor = [], 0
        for content in contents:
            start = text.find(content, cursor) if content else -1
            if start < 0:
                continue  # no special string in it (see _render_row): tokenized with the template text around it
            if start > cursor:
                ids += token_ids(tokenizer, [text[cursor:start]])[0]
            ids += text_ids(tokenizer, [content])[0]
            cursor = start + len(content)
        if cursor < len(text):
            ids += token_ids(tokenizer, [text[cursor:]])[0]
        out[k] = ids
    return out


def _contents_in_order(text: str, contents: list[str]) -> bool:
    cursor = 0
    for content in contents:
        start = text.find(content, cursor)
        if start < 0:
            return False
        cursor = start + len(content)
    return True


def _render_row(tokenizer, fmt: str, batch: dict, i: int, row: int):
    """(prompt, chosen response, rejected response) of one conversational row, each as (rendered text, contents
    of the messages it renders), for ``_rendered_ids``."""
    if fmt == CONVERSATIONAL:
        prompt, chosen, rejected = batch["prompt"][i], batch["chosen"][i], batch["rejected"][i]
    elif fmt == IMPLICIT_PROMPT:
        prompt, chosen, rejected, _ = split_implicit_prompt(batch["chosen"][i], batch["rejected"][i])
    else:
        raise ValueError(f"not a conversational format: {fmt!r}")
    prompt = clean_messages(prompt)
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    parts = [(prompt_text, [m["content"] for m in prompt], "prompt")]
    for field, response in (("chosen", chosen), ("rejected", rejected)):
        response = clean_messages(response)
        text = render_reply(tokenizer, prompt, prompt_text, response, row=row, field=field)
        parts.append((text, [m["content"] for m in response], field))
    for text, contents, field in parts:
        # A special-token string in content is kept as text by finding the content in the rendered text; a
        # template that rewrites content (trims, escapes) makes that impossible, so such a row is refused.
        if _holds_special(tokenizer, contents) and not _contents_in_order(text, contents):
            raise DataError("", "a message holds a special-token string and the chat template rewrites message "
                                "content, so it cannot be kept as text", row=row, field=field)
    return tuple((text, contents) for text, contents, _ in parts)


def clean_messages(messages: list[dict]) -> list[dict]:
    """Messages without None-valued keys: Arrow stores a list of messages as structs with the union of all keys, so
    a message that had no "name" comes back with "name": None, and templates test `'name' in message`."""
    return [{key: value for key, value in message.items() if value is not None} for message in messages]


def render_reply(tokenizer, prompt: list[dict], prompt_text: str, reply: list[dict], *, row: int, field: str,
                 what: str = "response") -> str:
    """The text the chat template adds for ``reply`` after ``prompt`` (rendered with the generation prompt as
    ``prompt_text``); ``DataError`` when the template does not extend the prompt or adds nothing."""
    full = tokenizer.apply_chat_template(prompt + reply, tokenize=False)
    if not full.startswith(prompt_text):
        raise DataError("", "the chat template does not extend the prompt: the rendered conversation does not start "
                            "with the prompt rendered with add_generation_prompt=True", row=row, field=field)
    text = full[len(prompt_text):]
    if not text.strip():
        raise DataError("", f"empty {what} after rendering the chat template", row=row, field=field)
    return text


def _with_eos(tokenizer, ids: list[int]) -> list[int]:
    """``ids`` + EOS, unless the template already ended the turn with the EOS token (trailing whitespace tokens
    ignored). Decided on token ids, not text: an "<|eos|>" typed in the content is text and does not count."""
    eos = tokenizer.eos_token_id
    end = len(ids)
    while end and ids[end - 1] != eos and not tokenizer.decode([ids[end - 1]]).strip():
        end -= 1
    return ids if end and ids[end - 1] == eos else ids + [eos]


def encode_text_pairs(tokenizer, prompts: list[str], responses: list[str]) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, response ids + EOS) of text pairs, exactly as standard-format preference rows are tokenized.

    The one rule every scorer of text uses (reward models, log-probs of text in the lab): the prompt with the
    tokenizer's special tokens (none when it already starts with the BOS text, i.e. was rendered by a chat
    template), the response without them plus EOS, each tokenized separately so no BPE merge crosses the boundary.
    """
    bos = tokenizer.bos_token
    prompt_ids = [text_ids(tokenizer, [p], add_special_tokens=not (bos and p.startswith(bos)))[0] for p in prompts]
    response_ids = [ids + [tokenizer.eos_token_id] for ids in text_ids(tokenizer, list(responses))]
    return prompt_ids, response_ids
