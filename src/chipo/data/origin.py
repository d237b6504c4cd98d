"""Where each row came from, so validation errors raised long after loading can still name the file and line.

``load_preference_dataset`` records, per returned dataset, which file (and for JSON lines which line) each row
came from. The record is keyed by the dataset's fingerprint and the source string: any transform (select, shuffle,
map) makes a new fingerprint, so a stale record can never put a wrong line number in an error (such datasets are
reported by row only), and two files with the same rows (the same fingerprint) keep separate records.
``prepare_preference_dataset`` must therefore get the same ``source`` string that was loaded to name lines.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from dataclasses import dataclass

from .errors import DataError


@dataclass(frozen=True)
class Segment:
    """Rows ``start ..`` (up to the next segment) come from ``file``; ``lines[i]`` is row ``start + i``'s line."""

    start: int
    file: str
    lines: list[int] | None = None


# A handful of recent loads is enough: the record is only needed between loading and preparing a dataset.
_MAX_RECORDS = 16
_RECORDS: OrderedDict[tuple[str, str], list[Segment]] = OrderedDict()


def remember_origin(dataset, source: str, segments: list[Segment]) -> None:
    """Record the files (and lines) behind the rows of ``dataset``, loaded from ``source``."""
    fingerprint = getattr(dataset, "_fingerprint", None)
    if fingerprint is None:
        return
    key = (fingerprint, source)
    _RECORDS[key] = segments
    _RECORDS.move_to_end(key)
    while len(_RECORDS) > _MAX_RECORDS:
        _RECORDS.popitem(last=False)


class RowLocator:
    """Builds ``DataError``s for rows of one dataset, naming the file and line where they are known."""

    def __init__(self, dataset, source: str):
        self.source = source
        self.segments = _RECORDS.get((getattr(dataset, "_fingerprint", None), source))
        self._starts = [s.start for s in self.segments] if self.segments else []

    def locate(self, row: int | None) -> tuple[str, int | None]:
        """(file, line) of ``row``; the given source and no line when the origin is unknown."""
        if row is None or not self.segments:
            return self.source, None
        seg = self.segments[bisect.bisect_right(self._starts, row) - 1]
        line = seg.lines[row - seg.start] if seg.lines is not None and row - seg.start < len(seg.lines) else None
        return seg.file, line

    def error(self, message: str, row: int | None = None, field: str | None = None) -> DataError:
        file, line = self.locate(row)
        return DataError(file, message, row=row, field=field, line=line)

    def relocate(self, err: DataError) -> DataError:
        """Re-issue an error raised with only a row index (e.g. inside ``Dataset.map``) with file and line."""
        return self.error(err.message, row=err.row, field=err.field)
