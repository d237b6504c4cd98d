"""Batch prepared preference rows into one padded tensor batch: chosen rows first, then rejected rows.

One forward pass over ``2B`` sequences instead of two over ``B`` halves the number of model calls and keeps
chosen and rejected under the same dropout / batch statistics; ``chosen = batch[:B]``, ``rejected = batch[B:]``.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")


@dataclass
class PreferenceCollator:
    """Collate rows of ``prepare_preference_dataset``'s output.

    Returns a dict with, for ``B`` features and ``T`` the longest ``prompt + response`` (rounded up to a multiple
    of ``pad_to_multiple_of`` if set):

    - ``input_ids`` LongTensor ``[2B, T]``: ``prompt + chosen`` for rows ``0..B-1``, then ``prompt + rejected``,
      right-padded with ``pad_token_id``;
    - ``attention_mask`` LongTensor ``[2B, T]``: 1 on real tokens, 0 on padding;
    - ``response_mask`` BoolTensor ``[2B, T]``: True exactly at the response tokens of ``input_ids`` (never prompt,
      never padding). These are *label* positions: token ``t`` is predicted by the logits at ``t - 1``, so a
      causal LM's per-token log-probs line up with ``response_mask[:, 1:]``. Position 0 is always a prompt token;
    - ``row`` LongTensor ``[B]``: the rows' original indices;
    - ``ref_chosen_logps`` / ``ref_rejected_logps`` FloatTensor ``[B]``: only when every feature has them (a key
      present in some features but not all raises ``ValueError``: a half-filled cache is a bug, not a choice).
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("cannot collate an empty list of features")
        prompts = [_as_list(f["prompt_input_ids"]) for f in features]
        responses = ([_as_list(f["chosen_input_ids"]) for f in features]
                     + [_as_list(f["rejected_input_ids"]) for f in features])
        input_ids, attention_mask, response_mask = right_pad(prompts + prompts, responses, self.pad_token_id,
                                                             self.pad_to_multiple_of)

        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "response_mask": response_mask,
            "row": torch.tensor([int(f["row"]) for f in features], dtype=torch.long),
        }
        for key in REF_KEYS:
            present = sum(key in f and f[key] is not None for f in features)
            if present == len(features):
                batch[key] = torch.tensor([float(f[key]) for f in features], dtype=torch.float32)
            elif present:
                raise ValueError(f"{key} is present in {present} of {len(features)} features; expected all or none")
        return batch


def right_pad(prompts: Sequence[Sequence[int]], responses: Sequence[Sequence[int]], pad_token_id: int,
              pad_to_multiple_of: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``input_ids`` [N, T], ``attention_mask`` [N, T] and ``response_mask`` [N, T] (bool) of prompt + response rows.

    Every (prompt, response) sequence of chipo is laid out this way: tokens from column 0, padding on the right
    (so causal attention never sees it), the response mask True exactly on the response tokens. T is the longest
    row, rounded up to ``pad_to_multiple_of`` if set.
    """
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    prompt_lengths = np.fromiter(map(len, prompts), dtype=np.int64, count=len(prompts))
    ends = prompt_lengths + np.fromiter(map(len, responses), dtype=np.int64, count=len(responses))
    width = int(ends.max())
    if pad_to_multiple_of:
        width = math.ceil(width / pad_to_multiple_of) * pad_to_multiple_of
    # All tokens in one array, scattered row-major onto the real positions (8x faster than a tensor per row).
    tokens = np.fromiter(itertools.chain.from_iterable(itertools.chain(p, r) for p, r in zip(prompts, responses)),
                         dtype=np.int64, count=int(ends.sum()))
    column = np.arange(width)[None, :]
    real = column < ends[:, None]
    input_ids = np.full(real.shape, pad_token_id, dtype=np.int64)
    input_ids[real] = tokens
    response_mask = real & (column >= prompt_lengths[:, None])
    input_ids, attention_mask, response_mask = (torch.from_numpy(input_ids), torch.from_numpy(real.astype(np.int64)),
                                                torch.from_numpy(response_mask))
    return input_ids, attention_mask, response_mask


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of sequences into rows of at most ``capacity`` tokens.

    A sequence longer than ``capacity`` gets a row of its own. Returns the sequence indices of each row, in
    placement order.
    """
    rows: list[list[int]] = []
    fill: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        for r, used in enumerate(fill):
            if used + lengths[i] <= capacity:
                rows[r].append(i)
                fill[r] += lengths[i]
                break
        else:
            rows.append([i])
            fill.append(lengths[i])
    return rows


def _as_list(ids) -> list[int]:
    # Rows come as lists from a plain dataset, as tensors / arrays from one with with_format("torch" / "numpy").
    return ids.tolist() if hasattr(ids, "tolist") else list(ids)
