"""Prompt datasets (RL, online training, the lab, recipes): one loader, validated row by row.

A prompt dataset is any source ``load_preference_dataset`` reads (hub name, json/jsonl/parquet/arrow file, saved
dataset) with a prompt column: strings (standard) or lists of ``{"role", "content"}`` messages (conversational).
Optional reference responses come from the first present column of ``reference_columns``.
"""

from __future__ import annotations

from dataclasses import dataclass

from chipo.data.errors import DataError
from chipo.data.loading import load_preference_dataset

REFERENCE_COLUMNS = ("reference", "completion", "chosen")


@dataclass
class PromptRows:
    """Prompts (strings or message lists) and, per prompt, a reference response or None."""

    prompts: list
    references: list[str | None]


def load_prompts(source: str, split: str = "train", max_rows: int | None = None, *, column: str = "prompt",
                 text_only: bool = False, reference_columns: tuple[str, ...] = REFERENCE_COLUMNS,
                 require_references: bool = False) -> PromptRows:
    """Read and validate the prompts of ``source``; ``DataError`` names the source, row and field of a bad row.

    ``text_only`` rejects conversational prompts (for code that scores raw text); ``require_references`` makes a
    missing or empty reference an error instead of None.
    """
    dataset = load_preference_dataset(source, split, max_rows=max_rows)
    if column not in dataset.column_names:
        raise DataError(source, f"needs a {column!r} column (columns: {', '.join(dataset.column_names)})",
                        field=column)
    prompts = list(dataset[column])
    for row, prompt in enumerate(prompts):
        if isinstance(prompt, str) and prompt.strip():
            continue
        if isinstance(prompt, list) and prompt and not text_only:
            continue
        expected = "a non-empty string" if text_only else "a non-empty string or message list"
        raise DataError(source, f"prompt must be {expected}, got {prompt!r:.60}", row=row, field=column)
    ref_column = next((c for c in reference_columns if c in dataset.column_names), None)
    if ref_column is None and require_references:
        raise DataError(source, f"needs a reference column ({' or '.join(reference_columns)}; columns: "
                                f"{', '.join(dataset.column_names)})", field=reference_columns[0])
    raw = list(dataset[ref_column]) if ref_column else [None] * len(prompts)
    references = [r if isinstance(r, str) and r.strip() else None for r in raw]
    if require_references:
        for row, ref in enumerate(references):
            if ref is None:
                raise DataError(source, "expected a non-empty string", row=row, field=ref_column)
    return PromptRows(prompts, references)
