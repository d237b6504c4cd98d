"""``RewardModelScorer``: an HF ``AutoModelForSequenceClassification`` with one output as a reward r(x, y).

The tokenization rule (the one rule, used by every entry point): prompt and response are tokenized exactly as
``chipo.data`` prepares standard-format training pairs for ``chipo reward`` -- the prompt with the tokenizer's
special tokens, the response without them plus EOS, each tokenized *separately* (``encode_text_pairs``) -- and
right-padded, so the model reads its score at the same token (the last non-pad one, EOS) as in training. Scoring
the concatenated text instead (as a generic HF reward pipeline does) would move that token and can merge BPE
tokens across the prompt/response boundary.

``template`` (optional) is for hub reward models trained on another text format: the model then scores
``template.format(prompt=..., response=...)`` tokenized as one text with special tokens, no EOS added.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from chipo.data.collator import right_pad
from chipo.data.tokenize import encode_text_pairs, token_ids
from chipo.models import load_sequence_classifier, load_tokenizer


class RewardModelScorer:
    """Score = the model's single logit at the last real token of each (prompt, response) row."""

    def __init__(self, name_or_path: str, batch_size: int = 64, device: str | torch.device | None = None,
                 max_length: int | None = None, template: str | None = None):
        self.tokenizer = load_tokenizer(name_or_path)
        self.model = load_sequence_classifier(name_or_path, "reward model")
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.eval().to(device or "cpu")
        self.batch_size = batch_size
        self.max_length = max_length
        self.template = template
        self.name = f"rm:{name_or_path}"

    def encode(self, prompts: Sequence[str], responses: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
        """(prompt ids, response ids) under the module's tokenization rule."""
        if self.template is None:
            return encode_text_pairs(self.tokenizer, list(prompts), list(responses))
        texts = [self.template.format(prompt=p, response=r) for p, r in zip(prompts, responses, strict=True)]
        return token_ids(self.tokenizer, texts, add_special_tokens=True), [[] for _ in texts]

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
            ids, attention, _ = right_pad(rows, [[] for _ in rows], pad)
            logits = self.model(input_ids=ids.to(device), attention_mask=attention.to(device)).logits
            out.append(logits[:, 0].float().cpu())
        return torch.cat(out).double().numpy() if out else np.zeros(0)

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        return self.score_ids(*self.encode(prompts, responses))
