"""Loading models and tokenizers (hub names or local HF directories), with one-line errors.

Every command loads through these functions, so a missing or malformed model is reported the same way
everywhere: ``ConfigError("cannot load model 'x': <first line of the cause>")``. The trainers' TRL-style arguments
(a model given by name with ``model_init_kwargs`` / ``quantization_config``, ``processing_class`` defaulting to the
model's own tokenizer, ``peft_config``) are resolved here too, once for every trainer.
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
                             pad_token_id: int | None = None, **from_pretrained: Any):
    """A one-output ``AutoModelForSequenceClassification`` (a reward model or gold scorer).

    ``num_labels=1`` turns a causal LM checkpoint into a fresh reward head (training); without it the checkpoint
    must already have exactly one output (scoring). The pad id is set on the model config because sequence
    classifiers pool at the rightmost non-pad token. ``from_pretrained``: further keyword arguments of
    ``from_pretrained`` (``dtype``, ``quantization_config``, ...).
    """
    from transformers import AutoModelForSequenceClassification

    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            name_or_path, **({"num_labels": num_labels} if num_labels else {}), **from_pretrained)
    except (OSError, ValueError, ImportError) as e:  # ImportError: a quantization backend that is not installed
        raise ConfigError(f"cannot load {what} {name_or_path!r}: {_first_line(e)}") from None
    check_one_output(model, f"{what} {name_or_path!r}")
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    return model


def check_one_output(model, what: str) -> None:
    """One-line ``ConfigError`` unless ``model`` (a sequence classifier) has exactly one output: a reward."""
    labels = getattr(model.config, "num_labels", None)
    if labels != 1:
        raise ConfigError(f"{what} has {labels} outputs; a reward model has exactly one (num_labels=1)")


# ------------------------------------------------------------------------------- TRL's trainer arguments


def from_pretrained_kwargs(model_init_kwargs: dict | None = None, *, trust_remote_code: bool = False,
                           quantization_config=None) -> dict[str, Any]:
    """The ``from_pretrained`` keyword arguments of a model given by name, as TRL's trainers build them: the
    config's ``model_init_kwargs``, the trainer's ``quantization_config`` (set in both places: refused, as in
    TRL), ``trust_remote_code`` unless ``model_init_kwargs`` sets it, and a ``dtype`` named by a string
    ("bfloat16", as TRL's ``create_model_from_path`` accepts) turned into the torch dtype."""
    kwargs = dict(model_init_kwargs or {})
    if quantization_config is not None:
        if "quantization_config" in kwargs:
            raise ConfigError("quantization_config is set both as a trainer argument and in model_init_kwargs; "
                              "set it in one place")
        kwargs["quantization_config"] = quantization_config
    kwargs.setdefault("trust_remote_code", trust_remote_code)
    dtype = kwargs.pop("dtype", None)
    if isinstance(dtype, str) and dtype != "auto":
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ConfigError(f"model_init_kwargs: dtype must be 'auto' or a torch dtype name, got {dtype!r}")
        dtype = getattr(torch, dtype)
    return {**kwargs, **({"dtype": dtype} if dtype is not None else {})}


def is_loaded(model) -> bool:
    """A trainer's ``model`` argument is a model object (not a name, not None: loaded by the trainer)."""
    return model is not None and not isinstance(model, str)


def refuse_quantizing_loaded(model, quantization_config) -> None:
    """As TRL's DPOTrainer: ``quantization_config`` is applied by ``from_pretrained``, so with a model that is
    already loaded it could only be ignored; one-line ``ConfigError`` instead."""
    if quantization_config is not None and is_loaded(model):
        raise ConfigError("quantization_config applies when the model is given by name (it is passed to "
                          "from_pretrained); this model is already loaded: quantize it yourself or pass its name")


def model_name(model) -> str | None:
    """The name or path a trainer's ``model`` argument stands for: the string itself, or the loaded model's
    ``config._name_or_path`` (None when neither)."""
    if isinstance(model, str):
        return model
    return getattr(getattr(model, "config", None), "_name_or_path", None) or None


def default_tokenizer(model, *, tokenizer: str | None = None, fallback: str | None = None,
                      trust_remote_code: bool = False):
    """TRL's default ``processing_class``: the tokenizer ``tokenizer`` names, else the model's own
    (``model_name``), else ``fallback`` (a config's ``model``), loaded by ``load_tokenizer``."""
    name = tokenizer or model_name(model) or fallback
    if not name:
        raise ConfigError("processing_class is required: the model does not say where it was loaded from")
    return load_tokenizer(name, trust_remote_code=trust_remote_code)


def is_peft(model) -> bool:
    """Whether ``model`` is a peft model (it has adapters that can be disabled)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def add_adapters(model, peft_config, seed: int | None = None):
    """``peft.get_peft_model(model, peft_config)``; a model that already has adapters is refused, as in TRL (merge
    and unload them first). ``seed``: the adapters' random initialisation is drawn under it (TRL seeds before it
    creates the PEFT model), so two runs with one seed start from the same adapters."""
    import warnings

    from peft import get_peft_model
    from transformers import set_seed

    if is_peft(model):
        raise ConfigError("peft_config was given for a model that already has adapters; merge and unload them "
                          "(merge_and_unload) and pass the base model, or omit peft_config")
    if seed is not None:
        set_seed(seed)
    with warnings.catch_warnings():  # peft still calls transformers' deprecated is_gradient_checkpointing
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, peft_config)


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
