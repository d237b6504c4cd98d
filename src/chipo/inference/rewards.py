"""Reward functions r(x, y) for RL, best-of-n and the lab: ``load_reward(spec)``.

A reward is anything with ``name`` and ``score(prompts, responses) -> np.ndarray`` (float64, one value per pair):
the lab's ``GoldScorer`` protocol (``chipo.lab.gold``), so proxies and gold scorers are interchangeable. Specs:

* a directory (or hub name) of an HF sequence-classification model with one output, e.g. one trained by
  ``chipo reward``: ``RewardModelScorer``;
* ``"module:function"``: ``function(prompts: list[str], responses: list[str]) -> list[float]``;
* ``"world"``: the lab's embedded-world gold reward.

The last two are the lab's own scorers (``chipo.lab.gold.load_gold_scorer``), reused rather than duplicated.

``RewardModelScorer`` tokenizes exactly as ``chipo.data`` prepares standard-format training pairs for
``chipo reward`` -- prompt with the tokenizer's special tokens, response without them, then EOS, prompt and
response tokenized *separately* -- and right-pads, so the model reads its score at the same token (the last
non-pad one, EOS) as in training. Scoring the concatenated text instead (as a generic HF reward pipeline does)
would move that token and can merge BPE tokens across the prompt/response boundary.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from chipo.config import ConfigError

_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def load_sequence_classifier(name_or_path: str, what: str = "reward model"):
    """(tokenizer, model) of a one-output ``AutoModelForSequenceClassification``, ready to score right-padded rows.

    One-line ``ConfigError`` when it cannot be loaded or has more than one output. The pad id is set on the model
    config because sequence classifiers pool at the rightmost non-pad token.
    """
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForSequenceClassification.from_pretrained(name_or_path)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load {what} {name_or_path!r}: {str(e).splitlines()[0]}") from None
    if model.config.num_labels != 1:
        raise ConfigError(f"{what} {name_or_path!r} has {model.config.num_labels} outputs; a reward model has "
                          "exactly one (num_labels=1)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    tokenizer.padding_side = "right"
    return tokenizer, model


class RewardModelScorer:
    """An HF ``AutoModelForSequenceClassification`` with one output; score = that logit at the last real token."""

    def __init__(self, name_or_path: str, batch_size: int = 64, device: str | torch.device | None = None,
                 max_length: int | None = None):
        self.tokenizer, self.model = load_sequence_classifier(name_or_path, "reward model")
        self.model.eval().to(device or "cpu")
        self.batch_size = batch_size
        self.max_length = max_length
        self.name = f"rm:{name_or_path}"

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
        """(prompt ids, response ids + EOS) as ``chipo.data`` tokenizes standard rows."""
        tok = self.tokenizer
        bos = tok.bos_token
        # A prompt already rendered by a chat template carries its own BOS / markers: add no special tokens then.
        prompt_ids = [tok(p, add_special_tokens=not (bos and p.startswith(bos)))["input_ids"] for p in prompts]
        response_ids = [ids + [tok.eos_token_id] for ids in tok(list(responses), add_special_tokens=False)["input_ids"]]
        return prompt_ids, response_ids

    @torch.no_grad()
    def score_ids(self, prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]]) -> np.ndarray:
        """Scores [N] of token-id pairs (right-padded batches; too-long pairs keep their last ``max_length``)."""
        device = next(self.model.parameters()).device
        pad = self.model.config.pad_token_id
        out = []
        for start in range(0, len(prompt_ids), self.batch_size):
            rows = [list(p) + list(r) for p, r in zip(prompt_ids[start:start + self.batch_size],
                                                     response_ids[start:start + self.batch_size], strict=True)]
            if self.max_length is not None:
                rows = [row[-self.max_length:] for row in rows]
            width = max(len(row) for row in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention = torch.zeros_like(ids)
            for i, row in enumerate(rows):
                ids[i, :len(row)] = torch.tensor(row)
                attention[i, :len(row)] = 1
            logits = self.model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
            out.append(logits[:, 0].float().cpu())
        return torch.cat(out).double().numpy() if out else np.zeros(0)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return self.score_ids(*self.encode(prompts, responses))


def load_reward(spec: str, *, batch_size: int = 64, device: str | torch.device | None = None):
    """Resolve a reward spec (module docstring): ``world``, ``module:function``, a local or hub reward model."""
    if not spec:
        raise ConfigError("empty reward spec")
    if spec == "world" or (_CALLABLE.match(spec) and not Path(spec).expanduser().exists()):
        from chipo.lab.gold import load_gold_scorer

        return load_gold_scorer(spec)
    path = Path(spec).expanduser()
    if path.exists() and not (path / "config.json").is_file():
        raise ConfigError(f"reward {spec!r} is a path but not an HF model directory (no config.json)")
    return RewardModelScorer(str(path) if path.exists() else spec, batch_size=batch_size, device=device)


def score_checked(scorer, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """``scorer.score`` as float64 [N], rejecting wrong shapes and non-finite values with a clear error."""
    values = np.asarray(scorer.score(list(prompts), list(responses)), dtype=np.float64)
    name = getattr(scorer, "name", type(scorer).__name__)
    if values.shape != (len(prompts),):
        raise ValueError(f"reward {name} returned shape {values.shape}, expected ({len(prompts)},)")
    if not np.isfinite(values).all():
        raise ValueError(f"reward {name} returned non-finite values")
    return values
