"""The one exception type of the data pipeline.

A bad row in a 100k-row file must be findable without a debugger, so every error names where it is:
the source (file path or hub name), the 0-based row, the 1-based line for JSON-lines files, and the field.
"""

from __future__ import annotations


class DataError(ValueError):
    """A problem with the preference data, reported as one line, e.g.

    ``data/train.jsonl: row 3 (line 4), field 'chosen': empty response``

    The parts are also kept as attributes (``source``, ``message``, ``row``, ``field``, ``line``) so callers and
    tests can inspect them without parsing the text.
    """

    def __init__(self, source: str, message: str, row: int | None = None, field: str | None = None,
                 line: int | None = None):
        self.source = str(source)
        # Wrapped library messages can span lines; the contract is one line, so fold whitespace.
        self.message = " ".join(str(message).split())
        self.row = row
        self.field = field
        self.line = line
        super().__init__(self._format())

    def _format(self) -> str:
        location = []
        if self.row is not None:
            location.append(f"row {self.row}" + (f" (line {self.line})" if self.line is not None else ""))
        elif self.line is not None:
            location.append(f"line {self.line}")
        if self.field is not None:
            location.append(f"field '{self.field}'")
        prefix = self.source
        if location:
            prefix += ": " + ", ".join(location)
        return f"{prefix}: {self.message}"

    def with_line(self, line: int | None) -> DataError:
        """A copy that also names the file line (used when the row's line is known only to the caller)."""
        return DataError(self.source, self.message, row=self.row, field=self.field, line=line)

    def __reduce__(self):
        # Errors raised inside ``Dataset.map(num_proc=...)`` workers are pickled back to the parent; the default
        # exception pickling would call ``DataError(text)`` and fail on the missing arguments.
        return (self.__class__, (self.source, self.message, self.row, self.field, self.line))
