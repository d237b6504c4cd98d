"""Markdown for reports: the one table writer every report of chipo uses (the lab, the bandit testbed, the TL;DR
recipe), so tables look the same everywhere and a cell can never break a table's columns."""

from __future__ import annotations

from collections.abc import Iterable, Sequence


def _cell(value: object) -> str:
    # A "|" inside a cell would start a new column and a newline would end the row (GitHub-flavoured markdown):
    # escape the one, fold the other.
    return str(value).replace("|", "\\|").replace("\n", " ").strip()


def markdown_table(header: Sequence[object], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub-flavoured markdown table: the header row, a ``---`` rule, one line per row; no trailing newline.

    Cells are ``str()`` of the values as given (format numbers before passing them). A row with another number
    of cells than the header raises ``ValueError`` naming the row: markdown would silently shift its columns.
    """
    header = [_cell(h) for h in header]
    if not header:
        raise ValueError("a markdown table needs at least one column")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, row in enumerate(rows):
        cells = [_cell(c) for c in row]
        if len(cells) != len(header):
            raise ValueError(f"markdown table row {i} has {len(cells)} cells for {len(header)} columns: {cells}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
