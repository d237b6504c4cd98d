"""Package names imported on first use (PEP 562): the one implementation behind ``chipo.data``, ``chipo.train``
and ``chipo.bandit``, whose re-exports would otherwise import torch, datasets or scipy for every command that only
needs a light submodule (``chipo bandit --help``, ``chipo judge`` with an LLM; tests/test_cli_startup.py)."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterable


def lazy_exports(package: str, names: dict[str, str], exported: Iterable[str]
                 ) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package``: ``names`` maps a name to its submodule (relative to
    ``package``), imported when the name is first read; the value is then stored on the package, so later lookups
    are plain attribute reads. ``exported``: the package's ``__all__``, listed by ``dir()``."""
    exported = tuple(exported)

    def __getattr__(name: str) -> object:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{names[name]}", package), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exported})

    return __getattr__, __dir__
