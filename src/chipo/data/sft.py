"""SFT data: prompt/completion rows validated, tokenized, truncated and collated (used by ``chipo sft``).

Data layouts (TRL's, e.g. ``trl-lib/tldr``; extra columns are ignored)
    ``prompt_completion``: ``prompt`` and ``completion`` strings; the text is ``prompt + completion``.
    ``conversational``: ``prompt`` and ``completion`` lists of ``{"role", "content"}`` messages.
    ``messages``: one conversation per row; its final message must be the assistant's and is the completion, the
    messages before it are the prompt (earlier assistant turns are context, not trained on).
Every row is validated before tokenization; a bad row raises ``DataError`` naming file, row, line and field.

Tokenization (as ``chipo.data.tokenize`` does for preference data, so SFT and preference training see the same
tokens for the same text): a string prompt is tokenized with the tokenizer's special tokens (a BOS if it adds
one), the completion without them plus EOS, so the model learns to stop. Conversations are rendered with the
tokenizer's chat template; the completion is the text the template adds after the prompt rendered with
``add_generation_prompt=True`` (the row fails if it does not extend it), with EOS appended unless the rendered
completion already ends with the EOS text. Prompt and completion are tokenized separately, so no BPE merge crosses
the boundary and the loss mask is exact.

Truncation, in this order
    1. ``max_prompt_length`` (if set): a longer prompt keeps its LAST tokens (the end is what the completion
       continues);
    2. a prompt of ``max_length`` tokens or more leaves no room for the completion: ``DataError`` (raise
       ``max_length`` or set ``max_prompt_length``);
    3. the completion keeps its FIRST ``max_length - len(prompt)`` tokens (a cut completion loses its EOS).
    The counts of cut prompts and completions are logged.

Labels: ``-100`` on prompt tokens (unless ``completion_only_loss=false``) and on padding, the token ids elsewhere.
Padding is located by length, not by comparing ids with ``pad_token_id``: when pad == EOS (a common fallback) the
completion's EOS keeps its label. Packed batches (``SFTCollator(packing=True)``) also put ``-100`` at each
sequence's first token (see ``SFTCollator``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import datasets
import torch

from chipo.config import ConfigError
from chipo.data.collator import _as_list, pack_rows, right_pad
from chipo.data.errors import DataError
from chipo.data.formats import describe, messages_problem, response_problem, text_problem
from chipo.data.origin import RowLocator
from chipo.data.tokenize import clean_messages, render_reply, text_ids, token_ids, truncate_prompt

PROMPT_COMPLETION, CONVERSATIONAL, MESSAGES = "prompt_completion", "conversational", "messages"
SFT_FORMATS = (PROMPT_COMPLETION, CONVERSATIONAL, MESSAGES)
IGNORE_INDEX = -100
_PROMPT_CUT, _COMPLETION_CUT = "__prompt_truncated", "__completion_truncated"


# ------------------------------------------------------------------------------------------------ layouts


def detect_sft_format(dataset: datasets.Dataset, source: str) -> str:
    """``prompt_completion``, ``conversational`` or ``messages`` from the columns and row 0 (``DataError`` if
    none fits)."""
    locator = RowLocator(dataset, source)
    columns = dataset.column_names
    if "prompt" in columns and "completion" in columns:
        prompt = dataset[0]["prompt"]
        if isinstance(prompt, str):
            return PROMPT_COMPLETION
        if isinstance(prompt, list):
            return CONVERSATIONAL
        raise locator.error(f"expected a string or a list of messages, got {describe(prompt)}", row=0,
                            field="prompt")
    if "messages" in columns:
        return MESSAGES
    missing = "completion" if "prompt" in columns else "prompt"
    raise locator.error(f"missing column {missing!r}: SFT data needs prompt and completion, or messages "
                        f"(columns: {', '.join(columns) or 'none'})", row=0, field=missing)


def sft_row_problem(record: dict, fmt: str) -> tuple[str, str] | None:
    """(field, why) for the first problem of one row in layout ``fmt``, or None if the row is fine."""
    if fmt == PROMPT_COMPLETION:
        if not isinstance(record["prompt"], str):
            return "prompt", f"expected a string, got {describe(record['prompt'])}"
        problem = text_problem(record["completion"])
        return ("completion", problem.replace("response", "completion")) if problem else None
    if fmt == CONVERSATIONAL:
        for field in ("prompt", "completion"):
            problem = messages_problem(record[field])
            if problem:
                return field, problem
        problem = response_problem(record["completion"])
        return ("completion", "empty completion") if problem else None
    problem = messages_problem(record["messages"])
    if problem:
        return "messages", problem
    messages = record["messages"]
    if len(messages) < 2 or messages[-1]["role"] != "assistant":
        return "messages", ("need a prompt and a final assistant message (the completion), got roles "
                            f"{[m['role'] for m in messages]}")
    if not messages[-1]["content"].strip():
        return "messages", "empty completion (the final assistant message has no content)"
    return None


def validate_sft_rows(dataset: datasets.Dataset, fmt: str, source: str, batch_size: int = 1024) -> None:
    """Check every row before any tokenization: a bad row 90,000 fails in seconds, naming file, row and line."""
    locator = RowLocator(dataset, source)
    columns = ["messages"] if fmt == MESSAGES else ["prompt", "completion"]
    for start in range(0, len(dataset), batch_size):
        # Batched column reads: one Arrow-to-Python conversion per batch instead of one per row.
        batch = dataset.select_columns(columns)[start:start + batch_size]
        for i in range(len(batch[columns[0]])):
            found = sft_row_problem({name: batch[name][i] for name in columns}, fmt)
            if found:
                raise locator.error(found[1], row=start + i, field=found[0])


# ------------------------------------------------------------------------------------------------ tokenization


@dataclass(frozen=True)
class SFTStats:
    """Counts from ``prepare_sft_dataset``."""

    rows: int
    truncated_prompts: int
    truncated_completions: int
    completion_tokens: int
    format: str


def prepare_sft_dataset(dataset: datasets.Dataset, tokenizer, *, source: str, max_length: int,
                        max_prompt_length: int | None = None, num_proc: int | None = None
                        ) -> tuple[datasets.Dataset, SFTStats]:
    """Validate, render, tokenize and truncate (rules in the module docstring).

    Returns a dataset with int-list columns ``prompt_input_ids`` and ``completion_input_ids`` and ``row`` (the
    row's index in ``dataset``), and ``SFTStats``. Raises ``DataError`` for the first bad row, ``ConfigError``
    for conversational data with a tokenizer that has no chat template.
    """
    if len(dataset) == 0:
        raise DataError(source, "no rows")
    if tokenizer.eos_token_id is None:
        raise ConfigError("the tokenizer has no EOS token; completions need one so the model learns to stop")
    fmt = detect_sft_format(dataset, source)
    if fmt != PROMPT_COMPLETION and not getattr(tokenizer, "chat_template", None):
        raise ConfigError(f"{source}: {fmt} data needs a tokenizer with a chat template")
    validate_sft_rows(dataset, fmt, source)
    encode = functools.partial(_encode_batch, tokenizer=tokenizer, fmt=fmt, max_length=max_length,
                               max_prompt_length=max_prompt_length)
    try:
        prepared = dataset.map(encode, batched=True, with_indices=True, remove_columns=dataset.column_names,
                               num_proc=num_proc, desc="Tokenizing SFT rows")
    except DataError as err:  # raised with the row only (maybe in a worker); name the file and line here
        raise RowLocator(dataset, source).relocate(err) from None
    stats = SFTStats(rows=len(prepared), truncated_prompts=sum(prepared[_PROMPT_CUT]),
                     truncated_completions=sum(prepared[_COMPLETION_CUT]),
                     completion_tokens=sum(len(ids) for ids in prepared["completion_input_ids"]), format=fmt)
    return prepared.remove_columns([_PROMPT_CUT, _COMPLETION_CUT]), stats


def _encode_batch(batch: dict, indices: list[int], *, tokenizer, fmt: str, max_length: int,
                  max_prompt_length: int | None) -> dict:
    out = {"row": list(indices), "prompt_input_ids": [], "completion_input_ids": [], _PROMPT_CUT: [],
           _COMPLETION_CUT: []}
    if not indices:
        return out
    eos = tokenizer.eos_token_id
    if fmt == PROMPT_COMPLETION:
        prompts = text_ids(tokenizer, batch["prompt"], add_special_tokens=True)
        completions = [ids + [eos] for ids in text_ids(tokenizer, batch["completion"])]
    else:
        rendered = [_render(tokenizer, fmt, batch, i, row) for i, row in enumerate(indices)]
        prompts = token_ids(tokenizer, [p for p, _ in rendered])
        texts = [c for _, c in rendered]
        # Templates that close the assistant turn with the EOS text already carry it; do not add a second.
        completions = [ids if tokenizer.eos_token and text.rstrip().endswith(tokenizer.eos_token) else ids + [eos]
                       for text, ids in zip(texts, token_ids(tokenizer, texts), strict=True)]
    for row, prompt, completion in zip(indices, prompts, completions, strict=True):
        prompt, prompt_cut, budget = truncate_prompt(prompt, row, max_length, max_prompt_length, what="completion",
                                                     field="messages" if fmt == MESSAGES else "prompt")
        out["prompt_input_ids"].append(prompt)
        out["completion_input_ids"].append(completion[:budget])
        out[_PROMPT_CUT].append(int(prompt_cut))
        out[_COMPLETION_CUT].append(int(len(completion) > budget))
    return out


def _render(tokenizer, fmt: str, batch: dict, i: int, row: int) -> tuple[str, str]:
    """(prompt text, completion text) of one conversational row, via the tokenizer's chat template."""
    if fmt == CONVERSATIONAL:
        prompt, completion = clean_messages(batch["prompt"][i]), clean_messages(batch["completion"][i])
    else:
        messages = clean_messages(batch["messages"][i])
        prompt, completion = messages[:-1], messages[-1:]
    field = "completion" if fmt == CONVERSATIONAL else "messages"
    prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    return prompt_text, render_reply(tokenizer, prompt, prompt_text, completion, row=row, field=field,
                                     what="completion")


# ------------------------------------------------------------------------------------------------ batches


@dataclass
class SFTCollator:
    """Collate rows of ``prepare_sft_dataset``: right-padded rows, or (``packing``) padding-free packed rows.

    Padded (``packing=False``): ``input_ids``, ``attention_mask`` and ``labels``, all ``[B, T]`` (T the longest
    ``prompt + completion``, rounded up to ``pad_to_multiple_of`` if set). ``labels`` are the input ids on
    completion tokens (and prompt tokens when ``completion_only_loss`` is False), ``-100`` elsewhere; the model
    shifts them itself (token t is predicted from position t - 1).

    Packed (``packing=True``): ``input_ids``, ``position_ids`` and ``labels``, all ``[R, L]``, no attention mask.
    The sequences lie side by side in rows of at most the longest sequence's length (first-fit decreasing,
    ``pack_rows``; all in one row with ``single_row``, which flash attention needs), ``position_ids`` counting
    0, 1, ... within each sequence, so transformers' masking builds a block-diagonal causal mask from them.
    Labels as above, and additionally ``-100`` at each sequence's FIRST token: in a packed row that token follows
    the previous sequence's last token, which must not be trained to predict it (in the padded layout the first
    label is never a target either: nothing precedes it). So the set of (position, target) pairs of the loss, and
    with it the mean token cross-entropy and its gradient, is exactly the padded batch's. A row's trailing padding
    (``pad_token_id``, labels ``-100``) gets positions 0, 1, ... of its own, a separate sequence nothing reads.
    The model must be called with ``use_cache=False`` (a cache disables transformers' packed-sequence masking).
    """

    pad_token_id: int
    completion_only_loss: bool = True
    pad_to_multiple_of: int | None = None
    packing: bool = False
    single_row: bool = False

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty list of features")
        prompts = [_as_list(f["prompt_input_ids"]) for f in features]
        completions = [_as_list(f["completion_input_ids"]) for f in features]
        if self.packing:
            return self._packed(prompts, completions)
        input_ids, attention_mask, completion_mask = right_pad(prompts, completions, self.pad_token_id,
                                                               self.pad_to_multiple_of)
        trained = completion_mask if self.completion_only_loss else attention_mask.bool()
        labels = torch.where(trained, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def _packed(self, prompts: list[list[int]], completions: list[list[int]]) -> dict[str, torch.Tensor]:
        sequences = [p + c for p, c in zip(prompts, completions, strict=True)]
        targets = [([IGNORE_INDEX] * len(p) if self.completion_only_loss else p) + c
                   for p, c in zip(prompts, completions, strict=True)]
        lengths = [len(s) for s in sequences]
        rows = pack_rows(lengths, sum(lengths) if self.single_row else max(lengths))
        width = max(sum(lengths[i] for i in row) for row in rows)
        if self.pad_to_multiple_of:
            width = math.ceil(width / self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        position_ids = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for r, row in enumerate(rows):
            offset = 0
            for i in row:
                end = offset + lengths[i]
                input_ids[r, offset:end] = torch.tensor(sequences[i], dtype=torch.long)
                position_ids[r, offset:end] = torch.arange(lengths[i])
                labels[r, offset + 1:end] = torch.tensor(targets[i][1:], dtype=torch.long)  # first token: none
                offset = end
            position_ids[r, offset:] = torch.arange(width - offset)  # trailing padding: a sequence of its own
        return {"input_ids": input_ids, "position_ids": position_ids, "labels": labels}
