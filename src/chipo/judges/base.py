"""The pairwise judge interface: ``Judge.judge(prompts, a, b) -> JudgeResult``.

A judge compares two responses ``a[i]`` and ``b[i]`` to the same prompt ``prompts[i]`` and returns one outcome per
item, from a's point of view:

- ``1.0``: a wins, ``0.0``: b wins, ``0.5``: a tie (the judge said so, the scores were equal, or a == b);
- ``None``: no verdict. Either the judge's answer could not be parsed (``malformed``) or the request failed after
  its retries (``error``). A missing verdict is counted and reported, never replaced by a guess: a guess would bias
  the win rate towards whatever the guess favours, and a judge that fails on, say, long responses would then
  quietly hand those items to one side.

The win rate is the mean outcome over items with a verdict (ties count half). ``JudgeResult.summary()`` gives the
counts next to it, so a win rate computed from 40% of the items cannot be mistaken for one computed from all.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

OK, IDENTICAL, MALFORMED, ERROR, CACHED = "ok", "identical", "malformed", "error", "cached"
STATUSES = (OK, IDENTICAL, MALFORMED, ERROR, CACHED)
"""Per-item status: ``ok`` (fresh verdict), ``cached`` (verdict from the disk cache), ``identical`` (a == b: a tie
without asking), ``malformed`` (answer unparseable: outcome None), ``error`` (request failed: outcome None)."""


class JudgeError(RuntimeError):
    """The judge cannot work at all (every request failed, or the server is unusable); one line."""


@dataclass
class JudgeResult:
    """Per-item outcomes of one ``Judge.judge`` call, plus what happened to each item.

    ``outcomes[i]`` is 1.0 (a wins), 0.0 (b wins), 0.5 (tie) or None (no verdict; see ``status[i]``).
    ``status[i]`` is one of ``STATUSES``; ``raw[i]`` is the judge's raw answer (an LLM's reply text, a reward
    model's "score_a score_b"), or the error message for a failed item, or None.
    """

    outcomes: list[float | None]
    status: list[str]
    raw: list[str | None] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.raw:
            self.raw = [None] * len(self.outcomes)
        if not len(self.outcomes) == len(self.status) == len(self.raw):
            raise ValueError("outcomes, status and raw must have one entry per item")

    @property
    def n(self) -> int:
        """Items judged (with or without a verdict)."""
        return len(self.outcomes)

    @property
    def malformed(self) -> int:
        """Items whose answer could not be parsed (outcome None)."""
        return self.status.count(MALFORMED)

    @property
    def errors(self) -> int:
        """Items whose request failed after every retry (outcome None)."""
        return self.status.count(ERROR)

    @property
    def cached(self) -> int:
        """Items answered from the disk cache (no request made)."""
        return self.status.count(CACHED)

    @property
    def valid(self) -> int:
        """Items with a verdict."""
        return sum(o is not None for o in self.outcomes)

    @property
    def win_rate(self) -> float:
        """Mean outcome over items with a verdict (a's win rate, ties count half); NaN if there are none."""
        values = [o for o in self.outcomes if o is not None]
        return sum(values) / len(values) if values else math.nan

    @property
    def stderr(self) -> float:
        """Standard error of ``win_rate`` (sample std / sqrt(valid)); NaN with fewer than 2 verdicts."""
        values = [o for o in self.outcomes if o is not None]
        if len(values) < 2:
            return math.nan
        mean = sum(values) / len(values)
        var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
        return math.sqrt(var / len(values))

    def summary(self) -> dict:
        """Counts and the win rate, JSON-ready (NaN becomes None)."""
        def finite(x: float) -> float | None:
            return None if math.isnan(x) else x

        return {
            "n": self.n, "valid": self.valid, "malformed": self.malformed, "errors": self.errors,
            "cached": self.cached, "a_wins": self.outcomes.count(1.0), "b_wins": self.outcomes.count(0.0),
            "ties": self.outcomes.count(0.5), "win_rate_a": finite(self.win_rate), "stderr": finite(self.stderr),
        }


@runtime_checkable
class Judge(Protocol):
    """Compares ``a[i]`` with ``b[i]`` as responses to ``prompts[i]`` (see the module docstring for outcomes)."""

    name: str

    def judge(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> JudgeResult: ...


def check_lengths(prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> None:
    """Judges take aligned lists; a silent zip over unequal lengths would drop items."""
    if not len(prompts) == len(a) == len(b):
        raise ValueError(f"prompts, a and b must have the same length, got {len(prompts)}, {len(a)}, {len(b)}")
