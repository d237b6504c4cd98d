"""``chipo bandit ...``: the exact tabular testbed's experiments (see chipo/bandit/README.md)."""

from __future__ import annotations

from chipo.bandit.cli import main

__all__ = ["main"]
