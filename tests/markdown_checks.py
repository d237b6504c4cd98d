"""Checks on the markdown tables of a rendered report (imported by the report tests)."""

from __future__ import annotations

import re

_UNESCAPED_PIPE = re.compile(r"(?<!\\)\|")


def table_blocks(text: str) -> list[list[str]]:
    """The tables of ``text``: runs of consecutive lines that start with '|'."""
    blocks, current = [], []
    for line in text.splitlines() + [""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            blocks.append(current)
            current = []
    return blocks


def cells(line: str) -> list[str]:
    """The cells of one table line: split at every '|' that is not escaped as '\\|'."""
    parts = _UNESCAPED_PIPE.split(line)
    assert parts[0] == "" and parts[-1] == "", f"a table line must start and end with '|': {line!r}"
    return parts[1:-1]


def assert_tables_well_formed(text: str) -> int:
    """Every table has a header, a '|---|' rule of the header's width and rows of that width; returns how many
    tables ``text`` holds, so a caller can also check that the report has the tables it should."""
    blocks = table_blocks(text)
    for block in blocks:
        width = len(cells(block[0]))
        assert len(block) >= 2 and block[1] == "|" + "---|" * width, f"no rule of {width} columns under {block[0]!r}"
        for line in block[2:]:
            assert len(cells(line)) == width, f"{len(cells(line))} cells for {width} columns: {line!r}"
    return len(blocks)
