"""The lab's experiments, one shape: settings -> a results table on disk -> a rendered report section.

An ``Experiment`` is a record: its name, a one-line title, its settings dataclass (``Settings()`` the protocol,
``Settings.quick()`` the smoke-test size), ``run(context, settings, out_dir)``, which writes its results into
``out_dir`` (rows in a jsonl / json file), and ``render(out_dir, context) -> str``, a markdown section computed from
what is on disk only, so a report can be rendered again without running anything. ``needs`` names the experiments
whose results it reads (through ``context.dir(name)``).

Experiments are found by name: ``get(name)``, ``names()``. The lab's own are listed in ``BUILTIN`` as
``module:attribute`` of their records (loaded on first use: their modules import this one for ``Experiment``, so
this module cannot import them); ``register`` adds one in this process. ``chipo demo`` composes a list of them
(``run_all``, ``compose_report``); a new experiment is one record and one registration, no new branch anywhere.

Every experiment's directory is run under one protocol (``run_experiment``, through
``chipo.train.experiment_dir.open_experiment``): one run at a time (a lock), the settings it ran with kept in
``experiment.json``, other settings refused (one line naming the keys) unless ``overwrite`` (which clears what the
experiment wrote), a finished experiment with the same settings not run again; its settings, wall and CPU time are
recorded the same way for all, in ``timing.json``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chipo.config import ConfigError
from chipo.lab.protocol import DemoSettings

RECORD = "timing.json"
MACHINE_HEADING = "## Machine, versions, time"


@dataclass
class Context:
    """What a composed run shares: its root directory (each experiment's under it), the world, how to report
    progress and how many worker processes to use (how to run, never what: not part of any experiment's key)."""

    out: Path
    world_cache: str | None = None
    progress: bool = True
    echo: Callable[[str], None] = print
    workers: int = DemoSettings.workers
    overwrite: bool = False
    _world: Any = field(default=None, repr=False)

    def world(self):
        """The embedded world (built and cached on first use), loaded once per context."""
        if self._world is None:
            from chipo.lab.world import load_or_build_world

            self._world = load_or_build_world(cache_dir=self.world_cache, quiet=True)
        return self._world

    def dir(self, name: str) -> Path:
        """The directory of experiment ``name`` under this run's root."""
        return Path(self.out) / get(name).directory

    @property
    def report_dir(self) -> Path:
        return Path(self.out) / "report"


@dataclass(frozen=True)
class Experiment:
    """One experiment of the lab (module docstring). ``directory``: under the run's root (default: the name).
    ``key``: the settings that must match to resume (default: all of them). ``owns_directory``: the run applies
    the directory protocol itself (the offline sweep: ``chipo.lab.sweep.Sweep``), so the runner does not.
    ``headline(out_dir)``: a few lines for the terminal after the run, from its results on disk."""

    name: str
    title: str
    settings: type
    run: Callable[[Context, Any, Path], None]
    render: Callable[[Path, Context], str]
    needs: tuple[str, ...] = ()
    directory: str = ""
    key: Callable[[Any], dict] | None = None
    owns_directory: bool = False
    headline: Callable[[Path], str] | None = None

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[a-z][a-z0-9-]*", self.name):
            raise ValueError(f"experiment name {self.name!r}: lower-case letters, digits and '-' only")
        if not self.directory:
            object.__setattr__(self, "directory", self.name)

    def settings_for(self, quick: bool = False):
        """The protocol's settings, or the smoke-test size."""
        return self.settings.quick() if quick else self.settings()

    def settings_key(self, settings) -> dict:
        return _jsonable(self.key(settings) if self.key else dataclasses.asdict(settings))


# ------------------------------------------------------------------------------------------------- the registry

BUILTIN = {
    "offline": "chipo.lab.offline:EXPERIMENT",
    "rlhf": "chipo.lab.rlhf:EXPERIMENT",
    "online": "chipo.lab.online:EXPERIMENT",
    "methods": "chipo.lab.methods:EXPERIMENT",
    "monitor-validation": "chipo.lab.monitor_validation:EXPERIMENT",
}
_REGISTRY: dict[str, Experiment] = {}


def register(experiment: Experiment) -> Experiment:
    """Make ``experiment`` available by its name in this process (replacing one of the same name)."""
    _REGISTRY[experiment.name] = experiment
    return experiment


def names() -> list[str]:
    """Every experiment's name: the lab's own, then those registered in this process."""
    return list(dict.fromkeys([*BUILTIN, *_REGISTRY]))


def check_names(requested) -> None:
    """One ConfigError line, listing the valid names, for the first unknown name in ``requested``."""
    for name in requested:
        if name not in _REGISTRY and name not in BUILTIN:
            raise ConfigError(f"unknown experiment {name!r}; valid: {', '.join(names())}")


def get(name: str) -> Experiment:
    """The experiment called ``name``; one ConfigError line listing the names otherwise."""
    check_names([name])
    if name in _REGISTRY:
        return _REGISTRY[name]
    module, _, attribute = BUILTIN[name].partition(":")
    return getattr(importlib.import_module(module), attribute)


def with_needs(requested: list[str]) -> list[str]:
    """``requested`` in order, each preceded by the experiments it needs (once each)."""
    order: list[str] = []

    def add(name: str, chain: tuple[str, ...]) -> None:
        if name in chain:
            raise ConfigError(f"experiments: {' -> '.join((*chain, name))} need each other")
        if name in order:
            return
        for need in get(name).needs:
            add(need, (*chain, name))
        order.append(name)

    for name in requested:
        add(name, ())
    return order


# ------------------------------------------------------------------------------------------------- the runner


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children (worker processes): an
    experiment's cost on a shared machine, where wall time depends on the load."""
    import resource

    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def load_average() -> str:
    """The machine's load average: wall times on a shared machine mean little without it."""
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def _jsonable(value) -> Any:
    return json.loads(json.dumps(value, default=str))


def record(out_dir: Path) -> dict:
    """What ``run_experiment`` recorded for the experiment in ``out_dir`` (empty if it never finished)."""
    from chipo.io import read_json

    return read_json(Path(out_dir) / RECORD) or {}


def timing_text(timing: dict) -> str:
    """One sentence from a recorded timing: wall, CPU (all processes) and the load at the start."""
    if not timing:
        return ""
    return (f"{timing['wall_s']:.0f} s ({timing['wall_s'] / 60:.1f} min), CPU time of all its processes "
            f"{timing['cpu_s']:.0f} s (user + system, workers included, from the experiment's start: the command's "
            f"start-up, a few seconds, is not counted); load average at the start "
            f"{timing['load_at_start']}")


def _timed(experiment: Experiment, context: Context, settings, out_dir: Path) -> dict:
    """Run the experiment; its wall time, CPU time (this process and its finished children) and the load."""
    start, cpu_start, load = time.perf_counter(), cpu_seconds(), load_average()
    experiment.run(context, settings, out_dir)
    return {"wall_s": time.perf_counter() - start, "cpu_s": cpu_seconds() - cpu_start, "load_at_start": load}


def _finished_record(out_dir: Path, settings: dict) -> dict | None:
    """The record of the run that did the work, when the directory's marker (``experiment.json``) says the
    experiment finished and that record (``RECORD``) holds the same ``settings``; else None."""
    from chipo.io import read_json
    from chipo.train.experiment_dir import MARKER

    marker, done = read_json(out_dir / MARKER), read_json(out_dir / RECORD)
    if isinstance(marker, dict) and marker.get("finished") and isinstance(done, dict) \
            and done.get("settings") == settings:
        return done
    return None


def run_experiment(experiment: Experiment, context: Context, settings) -> dict:
    """Run ``experiment`` into its directory under the directory protocol (module docstring); returns its record
    (name, settings, timing), also written to ``RECORD`` in the directory.

    The protocol is ``chipo.train.experiment_dir.open_experiment`` (lock, stale entries, the key's check, overwrite,
    a failed empty start leaves nothing), here unless the experiment applies it itself (``owns_directory``). A
    finished experiment with the same settings is not run again: the record of the run that did the work is
    returned."""
    from chipo.io import write_json
    from chipo.train.experiment_dir import open_experiment

    out_dir = context.dir(experiment.name)
    full = _jsonable(dataclasses.asdict(settings))
    directory = contextlib.nullcontext() if experiment.owns_directory else open_experiment(
        out_dir, experiment.settings_key(settings), overwrite=context.overwrite,
        what=f"{experiment.name} experiment", label="out")
    with directory as exp:
        done = None if context.overwrite else _finished_record(out_dir, full)
        if done is not None:
            context.echo(f"      {experiment.name}: finished in {out_dir} with these settings; nothing to do")
            return done
        entry = {"name": experiment.name, "settings": full, "timing": _timed(experiment, context, settings, out_dir)}
        write_json(out_dir / RECORD, entry)
        if exp is not None:
            exp.finish(entry)
    return entry


def run_all(context: Context, settings: dict[str, Any]) -> dict[str, dict]:
    """Run the experiments named in ``settings`` (name -> settings, in order); returns their records. Each after
    the first is announced by its title (the first announces its own steps)."""
    records = {}
    for i, (name, value) in enumerate(settings.items()):
        experiment = get(name)
        if i:
            context.echo(f"[+] {name}: {experiment.title}")
        records[name] = run_experiment(experiment, context, value)
    return records


# ------------------------------------------------------------------------------------------------- the report


def template(name: str, **values) -> str:
    """The report text ``chipo/lab/templates/<name>.md`` (package data), its ``$key`` placeholders filled from
    ``values`` (``string.Template``; a missing value is an error, not a silent gap)."""
    from importlib.resources import files
    from string import Template

    text = files("chipo.lab").joinpath("templates", f"{name}.md").read_text(encoding="utf-8")
    return Template(text).substitute(values).rstrip("\n")


def demote(text: str) -> str:
    """A page's headings one level down (``# T`` -> ``## T``), so a whole report reads as a section of another."""
    return re.sub(r"(?m)^(#{1,5}) ", r"#\1 ", text)


def as_section(page: Path, report_dir: Path) -> str:
    """A report page of its own (``page``) as a section of the report in ``report_dir``: headings one level down
    if it starts with a title, and its relative links (figures, files) rewritten to point from there."""
    text = page.read_text()
    if text.startswith("# "):
        text = demote(text)
    prefix = os.path.relpath(page.parent, report_dir)

    def link(match: re.Match) -> str:
        target = match.group(2)
        if re.match(r"[a-z]+:|/|#", target):
            return match.group(0)
        return f"{match.group(1)}({prefix}/{target})"

    return re.sub(r"(\[[^\]]*\])\(([^)\s]+)\)", link, text)


def insert_section(text: str, section: str) -> str:
    """``section`` placed before the report's machine section (the report's last), or at the end."""
    section = section.strip("\n") + "\n\n"
    if MACHINE_HEADING in text:
        return text.replace(MACHINE_HEADING, section + MACHINE_HEADING, 1)
    return text.rstrip("\n") + "\n\n" + section


def compose_report(context: Context, names_: list[str]) -> Path:
    """The report of a composed run, one loop: the first experiment's page (its render writes
    ``context.report_dir``: report.md, plots, tables; it states its own time), then every experiment's section with
    its recorded time. A first experiment that renders a section, not a page, gets a title above it."""
    from chipo.io import atomic_write_text

    text = ""
    for name in names_:
        experiment = get(name)
        section = experiment.render(context.dir(name), context)
        if not text and section.startswith("# "):
            text = section
            continue
        if not text:
            text = f"# chipo lab: {', '.join(names_)}\n"
        timing = timing_text(record(context.dir(name)).get("timing", {}))
        if timing:
            section = section.rstrip("\n") + f"\n\nTime of the {name} experiment: {timing}.\n"
        text = insert_section(text, section)
    path = context.report_dir / "report.md"
    atomic_write_text(path, text)
    return path
