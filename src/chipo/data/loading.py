"""Load preference data from local files, saved datasets, directories of data files or the hub.

Supported sources (``load_preference_dataset``):

- a file: one split, ``train`` (also answering to the usual split its name spells, e.g. ``test.jsonl``):
  ``.jsonl`` (one JSON object per line; blank lines ignored), ``.json`` (a JSON array of objects, as
  ``Dataset.to_json(lines=False)`` writes, or JSON lines), ``.parquet``, ``.arrow`` (the Arrow stream files that
  ``Dataset.save_to_disk`` writes, or Arrow IPC / Feather files);
- a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (``split`` picks from a dict);
- a directory of data files: a file's split is its name without extension and shard suffix
  (``train.jsonl``, ``test-00000-of-00002.parquet``) or, for files in a sub-directory, that sub-directory's name
  (``train/part-0.jsonl``; a leading ``data/`` directory is skipped, as on the hub). If no file is named after a
  usual split (train, validation, valid, dev, test, eval), all files form the ``train`` split;
- anything else is taken as a hub dataset name: ``datasets.load_dataset(source, split=split)``.

JSON is parsed here, line by line, rather than by ``datasets``: a malformed line then gives a ``DataError`` naming
the file and line, where ``datasets`` reports an Arrow parser error without either. Columns whose type differs
between rows are loaded as JSON values, so that validation can name the offending row instead of Arrow failing.
A UTF-8 byte-order mark is skipped; an object with a repeated key is an error naming the row (JSON parsers
otherwise keep the last value silently).

``split=None`` asks for the source's only split (an error listing them when there are several).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import datasets
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import DataError
from .origin import Segment, remember_origin

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".arrow")
_USUAL_SPLITS = {"train", "validation", "valid", "dev", "test", "eval"}
_SHARD_SUFFIX = re.compile(r"-\d+-of-\d+$")


def load_preference_dataset(source: str, split: str | None = "train",
                            max_rows: int | None = None) -> datasets.Dataset:
    """Load ``source`` (see the module docstring) as one ``datasets.Dataset``, its first ``max_rows`` rows if set.

    ``split`` selects from a saved ``DatasetDict``, a directory of data files or a hub dataset; a single file is
    one split (``train``, or the usual split its name spells), so asking it for another split is an error rather
    than silently its rows. ``None``: the source's only split. Raises ``DataError`` naming the source for a missing
    file, an unknown split (listing the available ones), malformed JSON (with the line), a repeated key in a JSON
    object (with the row) or an empty dataset.
    """
    path = Path(source).expanduser()
    if path.is_file():
        _check_split(source, split, _file_splits(path))
        dataset, segments = _load_file(path, source)
    elif path.is_dir():
        dataset, segments = _load_directory(path, source, split)
    elif _looks_like_a_path(source):
        raise DataError(source, "file not found")
    else:
        return _first_rows(_load_from_hub(source, split), max_rows)
    if len(dataset) == 0:
        raise DataError(source, "no rows")
    # A prefix keeps every row at its index, so the recorded files and lines still name the right rows.
    dataset = _first_rows(dataset, max_rows)
    remember_origin(dataset, source, segments)
    return dataset


def _file_splits(path: Path) -> list[str]:
    named = _split_of(Path(path.name))
    return sorted({"train", named} if named in _USUAL_SPLITS else {"train"})


def _check_split(source: str, split: str | None, available) -> str:
    """The split to load: ``split`` if the source has it, the only one when ``split`` is None; else a DataError."""
    available = sorted(available)
    if split is None:
        if len(available) == 1:
            return available[0]
        raise DataError(source, f"no split given and the source has several; available splits: {', '.join(available)}")
    if split not in available:
        raise DataError(source, f"unknown split {split!r}; available splits: {', '.join(available)}")
    return split


def _first_rows(dataset: datasets.Dataset, max_rows: int | None) -> datasets.Dataset:
    return dataset if max_rows is None else dataset.select(range(min(max_rows, len(dataset))))


def _looks_like_a_path(source: str) -> bool:
    # Hub names are "name" or "owner/name"; anything else that does not exist locally is a mistyped path, and
    # saying "file not found" beats a hub lookup error.
    return (source.lower().endswith(DATA_SUFFIXES) or source.startswith((".", "/", "~", "\\"))
            or source.count("/") > 1 or "\\" in source)


def _load_from_hub(name: str, split: str | None) -> datasets.Dataset:
    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as exc:  # network, auth, unknown split, unknown name: all become one readable line
        raise DataError(name, f"not a local file or directory, and loading it from the hub failed: "
                              f"{type(exc).__name__}: {exc}") from exc
    if split is None and isinstance(dataset, datasets.DatasetDict):
        dataset = dataset[_check_split(name, None, dataset)]
    if not isinstance(dataset, datasets.Dataset):
        raise DataError(name, f"expected one split from the hub, got {type(dataset).__name__}")
    return dataset


# ---------------------------------------------------------------------------------------------------- files


def _load_file(path: Path, source: str) -> tuple[datasets.Dataset, list[Segment]]:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows, lines = _read_json(path, source, json_lines=suffix == ".jsonl")
        return _rows_to_dataset(rows), [Segment(0, source, lines)]
    if suffix == ".parquet":
        try:
            table = pq.read_table(path)
        except (pa.ArrowException, OSError) as exc:
            raise DataError(source, f"cannot read parquet: {exc}") from exc
        return _table_to_dataset(table), [Segment(0, source)]
    if suffix == ".arrow":
        return _read_arrow(path, source), [Segment(0, source)]
    raise DataError(source, f"unsupported file type {suffix or '(none)'!r}; expected one of {', '.join(DATA_SUFFIXES)}")


def _read_json(path: Path, source: str, json_lines: bool) -> tuple[list[dict], list[int] | None]:
    """Rows of a JSON / JSON-lines file and, for JSON lines, the 1-based line of each row."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: a leading byte-order mark is skipped, not a row
    except UnicodeDecodeError as exc:
        raise DataError(source, f"not UTF-8 text: {exc}") from exc
    if not json_lines:
        duplicates = _Duplicates()
        try:
            document = json.loads(text, object_pairs_hook=duplicates.hook)
        except json.JSONDecodeError as exc:
            # A ".json" file is often JSON lines in disguise: several objects, one per line.
            if not _first_line_is_an_object(text):
                raise DataError(source, f"malformed JSON: {exc.msg} (column {exc.colno})", line=exc.lineno) from exc
        else:
            rows = _rows_of_document(document, source)
            duplicates.check(rows, source)
            return rows, None
    return _read_json_lines(text, source)


class _Duplicates:
    """An ``object_pairs_hook`` that builds dicts as usual but records every object with a repeated key."""

    def __init__(self):
        self.found: dict[int, str] = {}  # id(object) -> first repeated key

    def hook(self, pairs: list[tuple[str, object]]) -> dict:
        obj = dict(pairs)
        if len(obj) != len(pairs):
            seen: set[str] = set()
            self.found[id(obj)] = next(k for k, _ in pairs if k in seen or seen.add(k))
        return obj

    def check(self, rows: list[dict], source: str, lines: list[int] | None = None, first_row: int = 0) -> None:
        """DataError for the first row holding (at any depth) an object with a repeated key."""
        if not self.found:
            return
        for i, row in enumerate(rows):
            key = self._in(row)
            if key is not None:
                raise DataError(source, f"duplicate key {key!r} in a JSON object (JSON keeps only the last value; "
                                        "remove the repeat)", row=first_row + i, line=lines[i] if lines else None)

    def _in(self, value) -> str | None:
        if isinstance(value, dict):
            if id(value) in self.found:
                return self.found[id(value)]
            value = list(value.values())
        if isinstance(value, list):
            return next((key for key in map(self._in, value) if key is not None), None)
        return None


def _first_line_is_an_object(text: str) -> bool:
    first = next((line for line in text.split("\n") if line.strip()), "")
    try:
        return isinstance(json.loads(first), dict)
    except json.JSONDecodeError:
        return False


def _read_json_lines(text: str, source: str) -> tuple[list[dict], list[int]]:
    rows, lines = [], []
    duplicates = _Duplicates()
    # split("\n"), not splitlines(): JSON strings may hold raw U+2028 etc., which splitlines() would cut at.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line, object_pairs_hook=duplicates.hook)
        except json.JSONDecodeError as exc:
            raise DataError(source, f"malformed JSON: {exc.msg} (column {exc.colno})", row=len(rows),
                            line=number) from exc
        if not isinstance(obj, dict):
            raise DataError(source, f"expected a JSON object, got {type(obj).__name__}", row=len(rows), line=number)
        if duplicates.found:
            duplicates.check([obj], source, [number], first_row=len(rows))
        rows.append(obj)
        lines.append(number)
    return rows, lines


def _rows_of_document(document, source: str) -> list[dict]:
    if isinstance(document, dict):  # a lone object: a one-row file
        return [document]
    if not isinstance(document, list):
        raise DataError(source, f"expected a JSON array of objects or JSON lines, got {type(document).__name__}")
    for i, obj in enumerate(document):
        if not isinstance(obj, dict):
            raise DataError(source, f"expected a JSON object, got {type(obj).__name__}", row=i)
    return document


def _rows_to_dataset(rows: list[dict]) -> datasets.Dataset:
    # Columns are the union of keys in order of appearance (Dataset.from_list would use the first row's keys only
    # and silently drop the rest); a key missing from a row becomes None there, which validation reports.
    names = list(dict.fromkeys(key for row in rows for key in row))
    columns = {name: [row.get(name) for row in rows] for name in names}
    try:
        return datasets.Dataset.from_dict(columns)
    except (pa.ArrowException, TypeError, ValueError):
        # A type that differs between rows (a number where others have text): load such columns as JSON values so
        # that validation, not Arrow, reports it, with the row.
        return datasets.Dataset.from_dict(columns, on_mixed_types="use_json")


def _read_arrow(path: Path, source: str) -> datasets.Dataset:
    try:
        # save_to_disk writes the Arrow streaming format, which Dataset.from_file memory-maps.
        return datasets.Dataset.from_file(str(path))
    except (pa.ArrowException, OSError):
        pass
    try:
        # The Arrow IPC *file* format (Feather v2), as written by pyarrow.feather / ipc.new_file.
        with pa.memory_map(str(path)) as stream:
            return _table_to_dataset(pa.ipc.open_file(stream).read_all())
    except (pa.ArrowException, OSError) as exc:
        raise DataError(source, f"cannot read Arrow data: {exc}") from exc


def _table_to_dataset(table: pa.Table) -> datasets.Dataset:
    # In memory, with no cache file next to the user's data; features come from the table's "huggingface"
    # schema metadata when datasets wrote the file, else they are inferred from the Arrow types.
    return datasets.Dataset(datasets.table.InMemoryTable(table))


# ---------------------------------------------------------------------------------------------------- directories


def _load_directory(path: Path, source: str, split: str | None) -> tuple[datasets.Dataset, list[Segment]]:
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return _load_saved(path, source, split), [Segment(0, source)]
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in DATA_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(path).parts))
    if not files:
        raise DataError(source, f"directory holds no data files ({', '.join(DATA_SUFFIXES)}) and no saved dataset")
    by_split: dict[str, list[Path]] = {}
    for file in files:
        by_split.setdefault(_split_of(file.relative_to(path)), []).append(file)
    if not _USUAL_SPLITS & set(by_split):
        by_split = {"train": files}
    split = _check_split(source, split, by_split)
    parts, segments, start = [], [], 0
    for file in by_split[split]:
        file_source = str(Path(source) / file.relative_to(path))
        part, part_segments = _load_file(file, file_source)
        parts.append(part)
        segments.append(Segment(start, file_source, part_segments[0].lines))
        start += len(part)
    if len(parts) == 1:
        return parts[0], segments
    try:
        return datasets.concatenate_datasets(parts), segments
    except ValueError as exc:
        raise DataError(source, f"the files of split {split!r} do not share columns and types: {exc}") from exc


def _split_of(relative: Path) -> str:
    parts = relative.parts[1:] if relative.parts[0] == "data" and len(relative.parts) > 1 else relative.parts
    if len(parts) > 1:
        return parts[0]
    return _SHARD_SUFFIX.sub("", Path(parts[0]).name.split(".")[0])


def _load_saved(path: Path, source: str, split: str | None) -> datasets.Dataset:
    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # corrupt or version-mismatched save: one readable line
        raise DataError(source, f"cannot load saved dataset: {type(exc).__name__}: {exc}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        return loaded[_check_split(source, split, loaded)]
    _check_split(source, split, _file_splits(path))  # a saved Dataset is one split, like a single file
    return loaded
