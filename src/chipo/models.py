"""Loading models and tokenizers (hub names or local HF directories), with one-line errors.

Every command loads through these three functions, so a missing or malformed model is reported the same way
everywhere: ``ConfigError("cannot load model 'x': <first line of the cause>")``.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch

from chipo.config import ConfigError


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False):
    """``AutoTokenizer`` with a pad token (EOS when the tokenizer has none)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load tokenizer {name_or_path!r}: {_first_line(e)}") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def pad_id(tokenizer) -> int:
    """The id that pads a batch: the tokenizer's pad token, else its EOS (``load_tokenizer`` sets the same; a
    tokenizer from elsewhere may have none). Padded positions are masked, so the choice never changes a value."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def load_causal_lm(name_or_path: str, *, dtype: torch.dtype | str | None = None,
                   device: str | torch.device | None = None, eval_mode: bool = False, **from_pretrained: Any):
    """``AutoModelForCausalLM`` (optionally cast, moved and put in eval mode: dropout off); ``from_pretrained``:
    further keyword arguments of ``from_pretrained`` (``quantization_config``, ``attn_implementation``, ...)."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **({"dtype": dtype} if dtype else {}),
                                                     **from_pretrained)
    except (OSError, ValueError, ImportError) as e:  # ImportError: a quantization backend that is not installed
        raise ConfigError(f"cannot load model {name_or_path!r}: {_first_line(e)}") from None
    if device is not None:
        model.to(device)
    return model.eval() if eval_mode else model


def load_sequence_classifier(name_or_path: str, what: str = "reward model", *, num_labels: int | None = None,
                             pad_token_id: int | None = None):
    """A one-output ``AutoModelForSequenceClassification`` (a reward model or gold scorer).

    ``num_labels=1`` turns a causal LM checkpoint into a fresh reward head (training); without it the checkpoint
    must already have exactly one output (scoring). The pad id is set on the model config because sequence
    classifiers pool at the rightmost non-pad token.
    """
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, **({"num_labels": num_labels} if num_labels else {}))
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load {what} {name_or_path!r}: {_first_line(e)}") from None
    if model.config.num_labels != 1:
        raise ConfigError(f"{what} {name_or_path!r} has {model.config.num_labels} outputs; a reward model has "
                          "exactly one (num_labels=1)")
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model


def forward_with_cache(model, cache=None, **inputs):
    """``model(**inputs, use_cache=True)`` with ``cache`` as the KV cache; returns (output, the updated cache).

    transformers >= 5.2x names the KV-cache argument and output field ``cache``, earlier versions
    ``past_key_values``: the one place that knows (the signature is looked up once per model class).
    """
    name = _cache_argument(type(model))
    out = model(**inputs, use_cache=True, **{name: cache})
    return out, getattr(out, name)


@functools.cache
def _cache_argument(model_class) -> str:
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"
