"""Preference data: load, validate, tokenize, truncate and collate.

Typical use (what the trainer does)::

    dataset = load_preference_dataset("data/train.jsonl")
    prepared, stats = prepare_preference_dataset(dataset, tokenizer, source="data/train.jsonl", max_length=512)
    collate = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)

Every problem with the data raises ``DataError`` naming the source, row (and line for JSON lines) and field,
before anything trains. Modules: ``loading`` (sources), ``formats`` (layouts and validation), ``tokenize``
(rendering, tokenization, truncation policy), ``collator`` (batches), ``errors``, ``origin`` (row -> file/line).
"""

from .collator import PreferenceCollator
from .errors import DataError
from .formats import CONVERSATIONAL, FORMATS, IMPLICIT_PROMPT, STANDARD, detect_format, split_implicit_prompt
from .loading import load_preference_dataset
from .tokenize import PrepStats, lengths, prepare_preference_dataset

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
