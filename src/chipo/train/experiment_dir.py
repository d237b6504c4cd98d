"""Experiment directories: the run-directory protocol of ``chipo.train.rundir`` for a directory that holds many runs
or results of one experiment (``chipo lab sweep``, the lab's other experiments, the TL;DR recipe's sweep, generate,
judge and report stages).

``open_experiment(out, key)`` is a context manager. On enter it takes the directory's lock (``out/.lock``, the
same ``fcntl.flock`` a training run takes; a second process gets one line naming the directory), removes what a
killed process left half-written (``rundir.clean_stale``) and checks the marker ``out/experiment.json``, which
records the experiment's ``key`` (the settings its results depend on) and whether it finished:

- no marker, empty or new directory: the marker is written, the experiment starts;
- a marker with the same key: resume (``finished`` says whether an earlier process called ``finish``);
- a marker with another key: refused in one line naming the differing keys and the file (results of two settings
  never mix), unless ``overwrite`` (clear and start again) or ``replace_key`` (the caller redoes what the old key
  produced itself, e.g. a stage that re-judges cells whose judge changed);
- no marker but other files (a folder of the user's): adopted, and the names already there are recorded as not
  ours, so that a later ``overwrite`` leaves them alone; ``overwrite`` on such a folder is refused (nothing of a
  user's is ever deleted). ``legacy_key`` lets a caller recognise its own directories written before the marker
  (``owned``: the names such a directory holds that are the caller's; anything else there stays the user's).

``overwrite=True`` clears everything the experiment wrote (not the lock, not what was there before it). An
experiment that raises (Ctrl-C included) before writing anything into a directory it found empty or new removes
it again, so the same command can be rerun; the lock is released in every case.

``shared=True`` is for experiments that several processes fill at once, each its own part (the TL;DR sweep split
over GPUs, or every rank of an ``accelerate launch``): each holds a shared lock while it works, the marker is checked
and written under a short exclusive one, and ``overwrite`` needs the directory to itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from chipo.config import ConfigError
from chipo.io import json_default, read_json, write_json
from chipo.train.rundir import (
    LOCK,
    busy_error,
    check_output_path,
    clean_stale,
    objective_difference,
    remove_entries,
    try_lock,
)

MARKER = "experiment.json"
JOIN_WAIT_S = 10.0
"""How long a shared participant waits for another one's exclusive set-up (checking the marker: milliseconds)."""
_HELD: set[str] = set()  # directories this process has open: flock would refuse a nested open as "another run"


@dataclass
class ExperimentDir:
    """An open experiment directory. ``finished``/``summary``: the state recorded by an earlier ``finish`` with
    the same key (a caller whose key leaves part of the work out, such as a sweep's grid, checks its results too)."""

    path: Path
    key: dict
    what: str = "experiment"
    finished: bool = False
    summary: dict | None = None
    fresh: bool = False
    created: bool = False
    foreign: tuple[str, ...] = ()
    _handle: object = field(default=None, repr=False)

    @property
    def marker(self) -> Path:
        return self.path / MARKER

    def _write(self, finished: bool, summary: dict | None) -> None:
        record = {"what": self.what, "key": self.key, "finished": finished, "summary": _normalised(summary),
                  "foreign": list(self.foreign)}
        if read_json(self.marker) != record:  # a rerun with nothing to do leaves the directory untouched
            write_json(self.marker, record)

    def finish(self, summary: dict | None = None) -> None:
        """Record that the experiment is complete for this key, with an optional summary of what it holds (of the
        directory, not of this process's work: a rerun with nothing to do then rewrites nothing)."""
        self._write(True, summary)
        self.finished, self.summary = True, summary

    def entries(self) -> list[Path]:
        """What the experiment wrote: every entry but the lock, the marker and what was there before it."""
        return [p for p in self.path.iterdir() if p.name not in (LOCK, MARKER, *self.foreign)]

    def started(self) -> bool:
        """Whether anything worth keeping was written: a file (or link) among ``entries``, at any depth (empty
        folders, such as a run directory a failed first run removed again, are not results)."""
        for entry in self.entries():
            if entry.is_symlink() or not entry.is_dir():
                return True
            if any(files for _, _, files in os.walk(entry)):
                return True
        return False

    def clear(self, keep: Iterable[str] = ()) -> list[str]:
        """Remove what the experiment wrote (``entries``) except the names in ``keep``; returns the removed names."""
        keep = set(keep)
        return remove_entries(p for p in self.entries() if p.name not in keep)


def _normalised(key: dict) -> dict:
    """The key as the marker stores it (tuples become lists, numpy scalars numbers), so equal settings compare
    equal after a round trip through JSON."""
    return json.loads(json.dumps(key, default=json_default))


def _other_settings(exp: ExperimentDir, old: dict, label: str, hint: str) -> ConfigError:
    """The one line refusing a key that differs from the marker's: the differing keys, the first one's values."""
    changed = sorted(k for k in set(old) | set(exp.key) if old.get(k) != exp.key.get(k))
    first = objective_difference(old, exp.key, changed, where=str(exp.marker))
    return ConfigError(f"{exp.path} holds {_a(exp.what)} with other settings ({', '.join(changed)})"
                       f"{f': {first}' if first else ''}; use another {label}, or overwrite=true {hint}")


def _a(noun: str) -> str:
    return f"{'an' if noun[:1].lower() in 'aeiou' else 'a'} {noun}"


def _check_what(exp: ExperimentDir, marker: dict, label: str) -> None:
    """Another kind of experiment's directory is never resumed, re-keyed or cleared (a report pointed at the
    directory of the sweep it reports on would otherwise clear the sweep)."""
    if marker.get("what", exp.what) != exp.what:
        raise ConfigError(f"{label} {exp.path} holds {_a(marker['what'])} ({exp.marker}), not {_a(exp.what)}; "
                          f"choose another {label}")


def _lock(out: Path, *, shared: bool, overwrite: bool, label: str):
    """(open lock file, whether it is held exclusively). Shared participants wait up to ``JOIN_WAIT_S`` for a
    set-up in progress; everything else is refused at once when the lock is held."""
    handle = open(out / LOCK, "a+")  # noqa: SIM115 - held until the experiment closes
    try:
        deadline = time.monotonic() + JOIN_WAIT_S
        while True:
            if try_lock(handle):
                return handle, True
            if not shared or overwrite:
                raise busy_error(out, label)
            if try_lock(handle, shared=True):
                if (out / MARKER).is_file():
                    return handle, False
                # The process that held it failed before writing the marker: try to set it up ourselves.
                handle.close()
                handle = open(out / LOCK, "a+")  # noqa: SIM115
            if time.monotonic() > deadline:
                raise busy_error(out, label)
            time.sleep(0.05)
    except BaseException:
        handle.close()
        raise


def _set_up(exp: ExperimentDir, *, overwrite: bool, replace_key: bool, legacy_key, owned, label: str) -> None:
    """Under the exclusive lock: clean, check the marker against the key, clear on overwrite, write the marker."""
    out = exp.path
    clean_stale(out)
    marker = read_json(exp.marker) if exp.marker.is_file() else None
    if exp.marker.is_file() and not isinstance(marker, dict):
        raise ConfigError(f"{exp.marker} is not an experiment record (unreadable JSON); remove it or choose another "
                          f"{label}")
    if marker is None and legacy_key is not None:
        old = legacy_key(out)
        if old is not None:
            foreign = [] if owned is None else sorted(p.name for p in out.iterdir()
                                                      if p.name not in (LOCK, *owned))
            marker = {"key": _normalised(old), "finished": False, "foreign": foreign}
    if marker is None:
        others = sorted(p.name for p in out.iterdir() if p.name != LOCK)
        if others and overwrite:
            raise ConfigError(f"{label} {out} is not empty and has no {MARKER} (not a chipo {exp.what} "
                              f"directory): refusing to clear it with overwrite; empty it yourself or choose "
                              f"another {label}")
        exp.foreign = tuple(others)
    else:
        _check_what(exp, marker, label)
        exp.foreign = tuple(marker.get("foreign") or ())
        same = marker.get("key") == exp.key
        if not same and not overwrite and not replace_key:
            raise _other_settings(exp, marker.get("key") or {}, label, "to clear it and start again")
        if overwrite:
            exp.clear()
        elif same:
            exp.finished, exp.summary = bool(marker.get("finished")), marker.get("summary")
    exp._write(exp.finished, exp.summary)


def key_recorded_in(name: str, field: str = "key") -> Callable[[Path], dict | None]:
    """A ``legacy_key`` for a caller whose directories, before the marker, kept their key as ``field`` of the JSON
    file ``name`` (e.g. a sweep's ``sweep.json`` ``results_key``); None when the file or the field is missing."""
    def recorded(out: Path) -> dict | None:
        record = read_json(out / name)
        return record.get(field) if isinstance(record, dict) else None

    return recorded


@contextlib.contextmanager
def open_experiment(out: str | os.PathLike, key: dict, *, overwrite: bool = False, what: str = "experiment",
                    shared: bool = False, replace_key: bool = False,
                    legacy_key: Callable[[Path], dict | None] | None = None, owned: Iterable[str] | None = None,
                    label: str = "out_dir") -> Iterator[ExperimentDir]:
    """Open ``out`` for an experiment whose results depend on ``key`` (see the module docstring).

    ``what`` names the experiment in messages ("sweep"); ``label`` is the config key of the directory
    ("out_dir"). ``legacy_key(out)`` may return the key recorded by an older layout of the caller's own (else
    None; ``owned``: the names of such a directory that are the caller's, default all). Raises ConfigError (one
    line) for every refusal, with nothing written.
    """
    out = Path(out).expanduser()
    check_output_path(out, label)
    real = str(out.resolve())
    if real in _HELD:
        raise ConfigError(f"{label} {out} is already open in this process (an experiment inside another in the same "
                          f"directory); give the inner one its own {label}")
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    fresh = created or all(p.name == LOCK for p in out.iterdir())
    handle, exclusive = _lock(out, shared=shared, overwrite=overwrite, label=label)
    exp = ExperimentDir(out, _normalised(key), what, fresh=fresh, created=created, _handle=handle)
    _HELD.add(real)
    try:
        if exclusive:
            _set_up(exp, overwrite=overwrite, replace_key=replace_key, legacy_key=legacy_key,
                    owned=None if owned is None else tuple(owned), label=label)
            if shared:
                try_lock(handle, shared=True)  # let the other participants in
        else:
            marker = read_json(exp.marker) or {}
            _check_what(exp, marker, label)
            if marker.get("key") != exp.key and not replace_key:
                raise _other_settings(exp, marker.get("key") or {}, label, "when no other process is in it")
            exp.foreign = tuple(marker.get("foreign") or ())
            exp.finished, exp.summary = bool(marker.get("finished")), marker.get("summary")
        yield exp
    except BaseException:
        # Nothing written into a directory that was empty: remove it again, if no other participant is in it.
        if fresh and not exp.started() and try_lock(handle):
            remove_entries(out.iterdir())  # it was empty (or new): lock, marker and empty folders
            if created:
                with contextlib.suppress(OSError):
                    out.rmdir()
        raise
    finally:
        _HELD.discard(real)
        handle.close()  # closing the descriptor drops the flock
