"""Preference data: load, validate, tokenize, truncate and collate.

Typical use (what the trainer does)::

    dataset = load_preference_dataset("data/train.jsonl")
    prepared, stats = prepare_preference_dataset(dataset, tokenizer, source="data/train.jsonl", max_length=512)
    collate = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)

Every problem with the data raises ``DataError`` naming the source, row (and line for JSON lines) and field,
before anything trains. Modules: ``loading`` (sources), ``formats`` (layouts and validation), ``tokenize``
(rendering, tokenization, truncation policy), ``collator`` (batches), ``errors``, ``origin`` (row -> file/line).

The collator (torch), loader and tokenizer (datasets, pyarrow) are imported on first use of their names (PEP 562
``__getattr__``), so ``chipo.data.errors`` and ``chipo.data.formats`` stay cheap for code that needs only them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from chipo.lazy import lazy_exports

from .errors import DataError
from .formats import CONVERSATIONAL, FORMATS, IMPLICIT_PROMPT, STANDARD, detect_format, split_implicit_prompt

if TYPE_CHECKING:
    from .collator import PreferenceCollator
    from .loading import load_preference_dataset
    from .tokenize import PrepStats, lengths, prepare_preference_dataset

_LAZY = {"PreferenceCollator": "collator", "load_preference_dataset": "loading", "PrepStats": "tokenize",
         "lengths": "tokenize", "prepare_preference_dataset": "tokenize"}

__all__ = [
    "CONVERSATIONAL",
    "FORMATS",
    "IMPLICIT_PROMPT",
    "STANDARD",
    "DataError",
    "PrepStats",
    "PreferenceCollator",
    "detect_format",
    "lengths",
    "load_preference_dataset",
    "prepare_preference_dataset",
    "split_implicit_prompt",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
