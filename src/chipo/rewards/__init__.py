"""Reward functions r(x, y): one ``Scorer`` protocol and one spec grammar for every command.

A scorer is anything with ``name`` and ``score(prompts, responses) -> array [N]``. The same scorer serves as the
RL reward (``chipo rl reward=...``), the gold scorer of the lab (``chipo lab ... --gold ...``), the reward-model
judge (``chipo judge``) and best-of-n / pessimism (``chipo.inference``), so one spec scores identically through
every entry point. ``load_scorer(spec)`` resolves:

* a scorer name, ``NAME`` or ``NAME:ARG``: one registered in this process (``register_scorer``), else a
  ``chipo.scorers`` entry point of an installed package (``importlib.metadata``; chipo's own ``pyproject.toml``
  declares the lab's ``world`` / ``world:DIR`` and ``world-scaled:SCALE[:DIR]``). The entry point's module is
  imported only when its scorer is asked for, so nobody has to import the lab first and the core never does;
* ``module:function``: a Python callable ``function(prompts: list[str], responses: list[str]) -> list[float]``;
* otherwise a local directory or hub name of an HF reward model (``RewardModelScorer``: one tokenization rule,
  documented in ``chipo.rewards.reward_model``).
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np

from chipo.config import ConfigError
from chipo.rewards.reward_model import RewardModelScorer


@runtime_checkable
class Scorer(Protocol):
    """r(x, y) for a batch of (prompt, response) text pairs."""

    name: str

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray: ...


class CallableScorer:
    """Wraps ``fn(prompts, responses) -> list[float]`` (given as ``module:function`` on the command line)."""

    def __init__(self, fn: Callable, name: str):
        self.fn = fn
        self.name = name

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
        return np.asarray(self.fn(list(prompts), list(responses)), dtype=np.float64)


_REGISTRY: dict[str, tuple[Callable[[str | None], Scorer], str]] = {}
_CALLABLE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")


ENTRY_POINT_GROUP = "chipo.scorers"
"""Packages add scorers under this entry-point group: ``NAME = "module:factory"``, ``factory(arg: str | None)``."""


def register_scorer(name: str, factory: Callable[[str | None], Scorer], description: str = "") -> None:
    """Make ``NAME`` and ``NAME:ARG`` specs resolve to ``factory(None)`` and ``factory("ARG")`` in this process
    (an installed package declares a ``chipo.scorers`` entry point instead: module docstring)."""
    _REGISTRY[name] = (factory, description)


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def registered_scorers() -> dict[str, str]:
    """Scorer names and their descriptions: those registered in this process, then the entry points (described
    by their target, which is not imported here)."""
    names = {name: f"{ep.value} (entry point)" for name, ep in _entry_points().items()}
    names.update({name: description for name, (_, description) in _REGISTRY.items()})
    return dict(sorted(names.items()))


def _named_factory(name: str) -> Callable[[str | None], Scorer] | None:
    if name in _REGISTRY:
        return _REGISTRY[name][0]
    ep = _entry_points().get(name)
    if ep is None:
        return None
    try:
        return ep.load()
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"scorer {name!r} (entry point {ep.value}) cannot be loaded: {e}") from None


def load_scorer(spec: str, *, batch_size: int = 64, device=None, max_length: int | None = None,
                template: str | None = None) -> Scorer:
    """Resolve a scorer spec (module docstring). ``template`` applies to reward models only (see
    ``RewardModelScorer``); ``ConfigError`` with one line when the spec cannot be resolved."""
    if not spec:
        raise ConfigError("empty reward spec")
    name, _, arg = spec.partition(":")
    path = Path(spec).expanduser()
    if not path.exists():
        factory = _named_factory(name)
        if factory is not None:
            return factory(arg or None)
    if _CALLABLE.match(spec) and not path.exists():
        module_name, fn_name = spec.split(":")
        try:
            fn = getattr(importlib.import_module(module_name), fn_name)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"cannot load reward {spec!r}: {e}") from None
        if not callable(fn):
            raise ConfigError(f"reward {spec!r} is not callable")
        return CallableScorer(fn, spec)
    if path.exists() and not (path / "config.json").is_file():
        raise ConfigError(f"reward {spec!r} is a path but not an HF model directory (no config.json)")
    return RewardModelScorer(str(path) if path.exists() else spec, batch_size=batch_size, device=device,
                             max_length=max_length, template=template)


def score_checked(scorer: Scorer, prompts: Sequence[str], responses: Sequence[str]) -> np.ndarray:
    """``scorer.score`` as float64 [N], rejecting wrong shapes and non-finite values with a clear error."""
    values = np.asarray(scorer.score(list(prompts), list(responses)), dtype=np.float64)
    name = getattr(scorer, "name", type(scorer).__name__)
    if values.shape != (len(prompts),):
        raise ValueError(f"reward {name} returned shape {values.shape}, expected ({len(prompts)},)")
    if not np.isfinite(values).all():
        raise ValueError(f"reward {name} returned non-finite values")
    return values


__all__ = ["CallableScorer", "RewardModelScorer", "Scorer", "load_scorer", "register_scorer", "registered_scorers",
           "score_checked"]
