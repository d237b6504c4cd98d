"""Gold reward scorers r*(x, y): the lab's judge, never shown to the policy except through preference labels.

A scorer is anything with ``name`` and ``score(prompts, responses) -> np.ndarray`` (``GoldScorer``). Three kinds,
chosen by ``load_gold_scorer(spec)``:

* ``"world"`` (the default world) or ``"world:DIR"`` (a world directory): the embedded world's gold reward
  (``chipo.lab.world``); it can also enumerate a partition of all responses on which its reward is constant,
  which lets the lab compute exact metrics.
* a directory or hub name: an HF sequence-classification reward model (``AutoModelForSequenceClassification``
  with one output; the score is that logit on ``template.format(prompt=..., response=...)``, by default the
  concatenation ``prompt + response`` that standard-format preference data denotes).
* ``"module:function"``: a Python callable ``function(prompts: list[str], responses: list[str]) -> list[float]``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch


@runtime_checkable
class GoldScorer(Protocol):
    """r*(x, y) for a batch of (prompt, response) text pairs."""

    name: str

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray: ...


class CallableScorer:
    """Wraps ``fn(prompts, responses) -> list[float]`` (given as ``module:function`` on the command line)."""

    def __init__(self, fn, name: str):
        self.fn = fn
        self.name = name

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        values = np.asarray(self.fn(list(prompts), list(responses)), dtype=float)
        if values.shape != (len(prompts),):
            raise ValueError(f"gold scorer {self.name} returned shape {values.shape}, expected ({len(prompts)},)")
        return values


class HFRewardModelScorer:
    """An HF sequence-classification reward model; score = its single logit on the formatted text."""

    def __init__(self, name_or_path: str, template: str = "{prompt}{response}", batch_size: int = 64,
                 device: str | None = None, max_length: int | None = None):
        from chipo.inference.rewards import load_sequence_classifier

        self.tokenizer, self.model = load_sequence_classifier(name_or_path, "gold reward model")
        self.model.eval().to(device or "cpu")
        self.template = template
        self.batch_size = batch_size
        self.max_length = max_length
        self.name = f"hf:{name_or_path}"

    @torch.no_grad()
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        texts = [self.template.format(prompt=p, response=r) for p, r in zip(prompts, responses, strict=True)]
        out = []
        device = next(self.model.parameters()).device
        for start in range(0, len(texts), self.batch_size):
            enc = self.tokenizer(texts[start:start + self.batch_size], return_tensors="pt", padding=True,
                                 truncation=self.max_length is not None, max_length=self.max_length)
            logits = self.model(**{k: v.to(device) for k, v in enc.items()}).logits
            out.append(logits[:, 0].float().cpu())
        return torch.cat(out).numpy().astype(float) if out else np.zeros(0)


class WorldScorer:
    """The embedded world's gold reward, with its enumerable response space (for exact evaluation)."""

    def __init__(self, language):
        self.language = language
        self.name = "world"

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        return np.array([self.language.gold_text(p, r) for p, r in zip(prompts, responses, strict=True)])

    def exact_partition(self, model, tokenizer, prompts: Sequence[str]):
        """(log pi [P, C], rewards [P, C], well-formed [P, C]) on a partition of all sequences (see world)."""
        return self.language.exact_partition(model, tokenizer, list(prompts))

    @property
    def reward_range(self) -> tuple[float, float]:
        return 0.0, 1.0


_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


def load_gold_scorer(spec: str, template: str = "{prompt}{response}", batch_size: int = 64) -> GoldScorer:
    """Resolve a gold-scorer spec: ``world``, an existing path (reward model), ``module:function``, or a hub name."""
    from chipo.config import ConfigError

    if spec == "world":
        from chipo.lab.world import default_language

        return WorldScorer(default_language())
    if spec.startswith("world:"):  # a world built with another spec: its directory holds language.json
        import json

        from chipo.lab.world import Language

        path = Path(spec[len("world:"):]).expanduser() / "language.json"
        if not path.is_file():
            raise ConfigError(f"gold scorer {spec!r}: {path} not found (expected a world directory)")
        return WorldScorer(Language.from_json(json.loads(path.read_text())))
    if Path(spec).expanduser().exists():
        return HFRewardModelScorer(str(Path(spec).expanduser()), template=template, batch_size=batch_size)
    if _CALLABLE.match(spec):
        module_name, fn_name = spec.split(":")
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"cannot load gold scorer {spec!r}: {e}") from None
        if not callable(fn):
            raise ConfigError(f"gold scorer {spec!r} is not callable")
        return CallableScorer(fn, spec)
    return HFRewardModelScorer(spec, template=template, batch_size=batch_size)
