"""Files that are never half-written: atomic text / JSON / JSON-lines writes and directories, and readers.

Every writer goes through a temporary file (or directory) beside the target and ``os.replace``: a reader, a
crash or a full disk never leaves a truncated file behind, only the old one or the new one. The argument order
is always ``(path, data)``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path`` and rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would have
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def json_default(obj: Any) -> Any:
    """``json.dumps`` fallback for numpy scalars and arrays, tensors of one element and paths."""
    import numpy as np

    if isinstance(obj, (np.floating, np.integer, np.bool_)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Atomic JSON write (indented, numpy values converted)."""
    atomic_write_text(path, json.dumps(data, indent=2, default=json_default) + "\n")


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Atomic JSON-lines write: one object per line."""
    atomic_write_text(path, "".join(json.dumps(row, default=json_default) + "\n" for row in rows))


def read_json(path: str | os.PathLike) -> Any | None:
    """A JSON file's content, or None when it does not exist or does not parse (treated as not written)."""
    try:
        return json.loads(Path(path).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """All records of a JSON-lines file such as ``metrics.jsonl`` (blank lines skipped)."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Build a directory in a temporary sibling and rename it to ``final`` when the block succeeds.

    An existing ``final`` is replaced (moved aside, then deleted); if the block raises, the temporary directory is
    removed and ``final`` is left as it was, so readers never see a half-written directory.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}-old-{os.getpid()}")
            os.replace(final, old)
            shutil.rmtree(old, ignore_errors=True)
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def move_contents(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename every entry of ``src`` into ``dst`` (replacing same-named files), then remove ``src``."""
    src, dst = Path(src), Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    for entry in src.iterdir():
        target = dst / entry.name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        os.replace(entry, target)
    src.rmdir()


@contextlib.contextmanager
def staged_into(out: str | os.PathLike, prefix: str = ".final-") -> Iterator[Path]:
    """A temporary directory inside ``out`` whose contents are moved into ``out`` when the block succeeds.

    For final models saved beside checkpoints in an output directory: ``out`` keeps its other entries, and a
    crash mid-save leaves only the hidden temporary directory (removed here on failure).
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out, prefix=prefix))
    try:
        yield tmp
        move_contents(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
