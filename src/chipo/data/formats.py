"""The three preference-data layouts (TRL's), how to tell them apart, and row-by-row validation.

- ``standard``: ``prompt``, ``chosen``, ``rejected`` are strings; the text is ``prompt + response``.
- ``conversational``: ``prompt`` is a list of ``{"role", "content"}`` messages, ``chosen`` and ``rejected`` are
  lists of messages (usually one assistant message) that continue it.
- ``implicit_prompt``: only ``chosen`` and ``rejected``, each a whole conversation; the prompt is their longest
  common prefix of messages and the responses are what follows it.

Extra columns are ignored. Validation runs over every row before any tokenization, so a bad row 90,000 fails in
seconds, not after an hour of preprocessing, and the error names the file, row, line and field.
"""

from __future__ import annotations

from collections.abc import Iterator

from .origin import RowLocator

STANDARD = "standard"
CONVERSATIONAL = "conversational"
IMPLICIT_PROMPT = "implicit_prompt"
FORMATS = (STANDARD, CONVERSATIONAL, IMPLICIT_PROMPT)

Messages = list[dict]


def detect_format(dataset, source: str) -> str:
    """``"standard"``, ``"conversational"`` or ``"implicit_prompt"``, from the columns and the first row.

    Raises ``DataError`` (naming row 0 and the field) when ``chosen`` or ``rejected`` is missing, when the data is
    empty, or when ``prompt`` is missing but the responses are strings (only whole conversations carry an implicit
    prompt). Later rows are checked against the detected layout by ``validate_rows``.
    """
    locator = RowLocator(dataset, source)
    if len(dataset) == 0:
        raise locator.error("dataset has no rows")
    columns = dataset.column_names
    for name in ("chosen", "rejected"):
        if name not in columns:
            raise locator.error(f"missing column {name!r} (columns: {', '.join(columns) or 'none'})", row=0,
                                field=name)
    first = dataset[0]
    if "prompt" in columns:
        prompt = first["prompt"]
        if isinstance(prompt, str):
            return STANDARD
        if isinstance(prompt, list):
            return CONVERSATIONAL
        raise locator.error(f"expected a string or a list of messages, got {describe(prompt)}", row=0,
                            field="prompt")
    if isinstance(first["chosen"], list):
        return IMPLICIT_PROMPT
    raise locator.error("missing column 'prompt' (string responses need one; only whole conversations in 'chosen' "
                        "and 'rejected' carry an implicit prompt)", row=0, field="prompt")


def validate_rows(dataset, fmt: str, locator: RowLocator, batch_size: int = 1024) -> list[int]:
    """Check every row against layout ``fmt``; raise ``DataError`` at the first bad one. Returns the rows whose
    chosen == rejected (well-formed, but a pair that states no preference; the caller decides what to do)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {FORMATS}")
    columns = ["chosen", "rejected"] + ([] if fmt == IMPLICIT_PROMPT else ["prompt"])
    ties = []
    for row, record in _rows(dataset, columns, batch_size):
        found = row_problem(record, fmt)
        if found:
            field, problem = found
            raise locator.error(problem, row=row, field=field)
        if record["chosen"] == record["rejected"]:
            ties.append(row)
    return ties


def row_problem(record: dict, fmt: str) -> tuple[str, str] | None:
    """(field, why) for the first problem of one row in layout ``fmt``, or None if the row is fine."""
    if fmt == STANDARD:
        if not isinstance(record["prompt"], str):
            return "prompt", f"expected a string, got {describe(record['prompt'])}"
        return _first(("chosen", text_problem(record["chosen"])), ("rejected", text_problem(record["rejected"])))
    if fmt == CONVERSATIONAL:
        return _first(("prompt", messages_problem(record["prompt"])),
                      ("chosen", messages_problem(record["chosen"]) or response_problem(record["chosen"])),
                      ("rejected", messages_problem(record["rejected"]) or response_problem(record["rejected"])))
    # implicit prompt
    found = _first(("chosen", messages_problem(record["chosen"])), ("rejected", messages_problem(record["rejected"])))
    if found:
        return found
    _, chosen, rejected, problem = split_implicit_prompt(record["chosen"], record["rejected"])
    return _first(("chosen/rejected", problem), ("chosen", response_problem(chosen)),
                  ("rejected", response_problem(rejected)))


def _first(*checks: tuple[str, str | None]) -> tuple[str, str] | None:
    # Checks are evaluated eagerly; they are cheap, and this keeps the per-format rules one readable expression.
    return next(((field, problem) for field, problem in checks if problem), None)


def _rows(dataset, columns: list[str], batch_size: int) -> Iterator[tuple[int, dict]]:
    # Batched column reads: one Arrow-to-Python conversion per batch instead of one per row.
    row = 0
    for batch in dataset.select_columns(columns).iter(batch_size=batch_size):
        for i in range(len(batch[columns[0]])):
            yield row, {name: batch[name][i] for name in columns}
            row += 1


def describe(value) -> str:
    """A short description of an unexpected value for error messages."""
    if value is None:
        return "null (missing value)"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def text_problem(value) -> str | None:
    """Why ``value`` is not a usable string response, or None."""
    if not isinstance(value, str):
        return f"expected a string, got {describe(value)}"
    if not value.strip():
        return "empty response"
    return None


def messages_problem(value) -> str | None:
    """Why ``value`` is not a non-empty list of ``{"role": str, "content": str}`` messages, or None."""
    if not isinstance(value, list):
        return f"malformed message list: expected a list of messages, got {describe(value)}"
    if not value:
        return "malformed message list: empty"
    for j, message in enumerate(value):
        if not isinstance(message, dict):
            return f"malformed message list: message {j} is {describe(message)}, expected a dict"
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not role.strip():
            return f"malformed message list: message {j} 'role' must be a non-empty string, got {describe(role)}"
        if not isinstance(content, str):
            return f"malformed message list: message {j} 'content' must be a string, got {describe(content)}"
    return None


def response_problem(messages: Messages) -> str | None:
    """A response (list of well-formed messages) must exist and say something."""
    if not messages or all(not m["content"].strip() for m in messages):
        return "empty response"
    return None


def split_implicit_prompt(chosen: Messages, rejected: Messages) -> tuple[Messages, Messages, Messages, str | None]:
    """Split two whole conversations into (prompt, chosen response, rejected response, problem).

    The prompt is the longest common prefix of messages. An identical pair (chosen == rejected) keeps its final
    message as the (shared) response, so it stays a valid, if uninformative, pair. ``problem`` is None or why the
    pair cannot be split: no shared prefix, or one conversation is a prefix of the other (an empty response).
    """
    n, limit = 0, min(len(chosen), len(rejected))
    while n < limit and chosen[n] == rejected[n]:
        n += 1
    if chosen == rejected:
        n = len(chosen) - 1
    prompt, chosen_response, rejected_response = chosen[:n], chosen[n:], rejected[n:]
    problem = None
    if not prompt:
        problem = "implicit prompt: chosen and rejected share no leading message, so there is no prompt"
    elif not chosen_response or not rejected_response:
        shorter = "chosen" if not chosen_response else "rejected"
        problem = f"implicit prompt: empty response (the {shorter} conversation is a prefix of the other)"
    return prompt, chosen_response, rejected_response, problem
