"""The lab's verdicts: small pure functions of the results table, each one test of ``chipo.stats``.

Every function takes the table (``chipo.lab.tables.results_table``) and what to compare, and returns a ``Claim``:
the ``Verdict`` of a paired t test across seeds (a seed shares its preference data, data order and sampling
seeds across methods, so comparisons are paired), the sentence that is stated only when the test passes
(``Claim.statement``), the standard error and degrees of freedom behind the power statement, and the function
itself (``recompute``), so the same claim can be re-decided on half of the seeds (``split_half``).

Fixed before looking at any result: falls are tested from the mean of the paper's evaluation epochs 1, 2, 4
(Huang et al. 2024, arXiv 2407.13399, Table 1) to the last epoch, never from the peak of the same means; gaps at
the last epoch; the frontier at the largest sqrt(KL) level every run reaches. ``holm`` adjusts the report's
whole family of claims; a claim's word is "holds" / "significant" only when its adjusted p is at most 5%.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial

import numpy as np
import pandas as pd

from chipo import stats
from chipo.lab import tables

PAPER_EPOCHS = (1, 2, 4)
"""The evaluation epochs of the paper's Table 1 (Huang et al. 2024): the fall is measured from them."""

POWER = 0.8
STATED_EFFECT_SD = 2.0
"""The effect at which the report states every claim's power, in standard deviations of the per-seed differences
(Cohen's d of the paired test). Fixed in advance: DPO's fall at beta 0.005 measured on an earlier 3-seed run of the
demo was 25.5 points with a seed-to-seed s.d. of 7.6 (about 3.4 sd), so an effect of 2 sd is smaller than the
effect the demo exists to show; at 8 seeds and Holm's first level over 14 claims it is detected with probability
0.80 (two-sided) to 0.90 (one-sided)."""


@dataclass(frozen=True)
class Claim:
    """One checked claim. ``scale``/``unit`` only format numbers (100 and "points" for rates)."""

    verdict: stats.Verdict
    sentence: str
    se: float
    df: float
    scale: float = 1.0
    unit: str = ""
    recompute: Callable[[pd.DataFrame], Claim] | None = field(default=None, compare=False, repr=False)

    def statement(self) -> str | None:
        """The sentence when the (Holm-adjusted) test passed, else None: nothing is claimed."""
        return self.sentence if self.verdict.passed else None

    @property
    def n(self) -> int:
        """Seeds behind the test (pairs with a value on both sides)."""
        return int(self.df) + 1 if math.isfinite(self.df) else 0

    @property
    def _alternative(self) -> str:
        return "two-sided" if self.verdict.alternative == "two-sided" else "greater"

    def detectable(self, alpha: float = 0.05) -> float:
        """Smallest true difference the test detects with 80% power at level ``alpha`` (same units as the
        estimate, through the seeds' own standard deviation, an estimate; NaN without an error estimate)."""
        return stats.min_detectable_difference(self.se, self.df, alpha=alpha, power=POWER,
                                               alternative=self._alternative)

    def detectable_sd(self, alpha: float = 0.05) -> float:
        """The same in standard deviations of the per-seed differences: exact (no estimate of sigma needed)."""
        return stats.detectable_effect_sd(self.n, alpha, POWER, self._alternative) if self.n > 1 else math.nan

    def power(self, effect_sd: float = STATED_EFFECT_SD, alpha: float = 0.05) -> float:
        """Probability that the test at level ``alpha`` passes when the true effect (in the claimed direction for a
        one-sided claim) is ``effect_sd`` standard deviations of the per-seed differences (``stats.t_power``)."""
        return stats.t_power(effect_sd, self.n, alpha, self._alternative) if self.n > 1 else math.nan


def _power(diffs) -> tuple[float, float]:
    x = np.asarray(diffs, dtype=float)
    x = x[~np.isnan(x)]
    _, se = stats.mean_se(x) if x.size else (math.nan, math.nan)
    return se, float(x.size - 1) if x.size > 1 else math.nan


def _claim(verdict: stats.Verdict, sentence: str, diffs, recompute, scale=1.0, unit="") -> Claim:
    se, df = _power(diffs)
    return Claim(verdict, sentence, se, df, scale, unit, recompute)


def _direction(estimate: float, more: str = "higher", less: str = "lower") -> str:
    return more if estimate > 0 else less


def gap(df: pd.DataFrame, a: str, b: str, beta: float, metric: str, epoch: int, label: str,
        scale: float = 100.0, unit: str = "points") -> Claim:
    """Do methods ``a`` and ``b`` differ in ``metric`` at ``epoch``? Two-sided paired t across seeds."""
    seeds = tables.seeds(df)
    x = tables.at_epoch(df, a, beta, metric, epoch, seeds)
    y = tables.at_epoch(df, b, beta, metric, epoch, seeds)
    v = stats.gap_verdict(x, y, f"{a} vs {b}: {label} at epoch {epoch}, beta {beta:g}")
    sentence = (f"At beta {beta:g}, epoch {epoch}, {a}'s {label} is {_direction(v.estimate)} than {b}'s, by "
                f"{abs(v.estimate) * scale:.3g} {unit}.")
    return _claim(v, sentence, x - y, partial(gap, a=a, b=b, beta=beta, metric=metric, epoch=epoch, label=label,
                                              scale=scale, unit=unit), scale, unit)


def fall(df: pd.DataFrame, method: str, beta: float, metric: str, label: str, early=PAPER_EPOCHS,
         scale: float = 100.0, unit: str = "points") -> Claim:
    """Does ``metric`` fall from the paper's early epochs (their per-seed mean) to the last epoch? One-sided."""
    seeds = tables.seeds(df)
    es, values = tables.seed_matrix(df, method, beta, metric, seeds)
    last = max(es) if es else 0
    cols = [es.index(e) for e in early if e in es and e < last]
    early_mean = values[:, cols].mean(axis=1) if cols else np.full(len(seeds), np.nan)
    final = values[:, es.index(last)] if es else np.full(len(seeds), np.nan)
    named = "/".join(str(es[c]) for c in cols) or "none"
    v = stats.fall_verdict(early_mean, final, f"{method}: {label} falls from epochs {named} to {last}, "
                                              f"beta {beta:g}")
    sentence = (f"At beta {beta:g}, {method}'s {label} falls from epochs {named} (mean) to epoch {last}, by "
                f"{v.estimate * scale:.3g} {unit}.")
    return _claim(v, sentence, early_mean - final, partial(fall, method=method, beta=beta, metric=metric,
                                                           label=label, early=early, scale=scale, unit=unit),
                  scale, unit)


FRONTIER_LABELS = {"best": "best gold reward over training (oracle early stopping)",
                   "final": "gold reward at the last epoch",
                   "final_distance": "sqrt(KL) from pi_ref at the last epoch",
                   "matched": "gold reward at matched sqrt(KL)"}


def frontier_gap(df: pd.DataFrame, a: str, b: str, beta: float, keys: dict, kind: str) -> Claim:
    """``a`` vs ``b`` on a frontier number (``FRONTIER_LABELS``); ``matched``: gold at the largest sqrt(KL)
    level every run at this beta reaches (interpolated along each run). Two-sided paired t."""
    seeds = tables.seeds(df)
    levels = tables.distance_levels(df, beta, keys["kl"])
    x = tables.frontier(df, a, beta, keys, levels, seeds)
    y = tables.frontier(df, b, beta, keys, levels, seeds)
    column = f"at_{len(levels) - 1}" if kind == "matched" else kind
    label = FRONTIER_LABELS[kind]
    if kind == "matched":
        label += f" {levels[-1]:.3g}" if levels else " (no common level)"
    nan = np.full(len(seeds), np.nan)
    xa, ya = x.get(column, nan), y.get(column, nan)
    v = stats.gap_verdict(xa, ya, f"{a} vs {b}: {label}, beta {beta:g}")
    if kind == "final_distance":
        sentence = (f"At beta {beta:g}, {a} ends {_direction(v.estimate, 'farther from', 'closer to')} pi_ref "
                    f"than {b} (sqrt KL {abs(v.estimate):.3g} nats^1/2 {_direction(v.estimate, 'more', 'less')}).")
    else:
        sentence = (f"At beta {beta:g}, {a}'s {label} is {_direction(v.estimate)} than {b}'s, by "
                    f"{abs(v.estimate):.3g}.")
    unit = "nats^1/2" if kind == "final_distance" else "gold"
    return _claim(v, sentence, xa - ya, partial(frontier_gap, a=a, b=b, beta=beta, keys=keys, kind=kind), 1.0,
                  unit)


def interaction(df: pd.DataFrame, a: str, b: str, small: float, large: float, metric: str, epoch: int,
                label: str) -> Claim:
    """Is the per-seed gap a - b in ``metric`` at ``epoch`` larger at beta ``small`` than at ``large``?"""
    seeds = tables.seeds(df)
    g_small = tables.at_epoch(df, a, small, metric, epoch, seeds) - tables.at_epoch(df, b, small, metric, epoch,
                                                                                    seeds)
    g_large = tables.at_epoch(df, a, large, metric, epoch, seeds) - tables.at_epoch(df, b, large, metric, epoch,
                                                                                    seeds)
    v = stats.interaction_verdict(g_small, g_large, f"{a} - {b} in {label} at epoch {epoch} larger at beta "
                                                    f"{small:g} than at {large:g}")
    sentence = (f"The {a} - {b} gap in {label} at epoch {epoch} is larger at beta {small:g} than at beta "
                f"{large:g}, by {v.estimate * 100:.3g} points.")
    return _claim(v, sentence, g_small - g_large, partial(interaction, a=a, b=b, small=small, large=large,
                                                          metric=metric, epoch=epoch, label=label), 100.0, "points")


def trend(df: pd.DataFrame, a: str, b: str, beta: float, metric: str, label: str) -> Claim:
    """Does the per-seed gap a - b in ``metric`` grow with training (slope on log epoch > 0)?"""
    seeds = tables.seeds(df)
    es, x = tables.seed_matrix(df, a, beta, metric, seeds)
    es_b, y = tables.seed_matrix(df, b, beta, metric, seeds)
    common = [e for e in es if e in es_b]
    gaps = x[:, [es.index(e) for e in common]] - y[:, [es_b.index(e) for e in common]]
    if len(common) < 2:
        v = stats.Verdict(f"{a} - {b} gap grows", "too few epochs", math.nan, math.nan, math.nan, math.nan,
                          "greater")
        slopes = np.full(len(seeds), np.nan)
    else:
        v = stats.trend_verdict(gaps, common, f"{a} - {b} gap in {label} grows with training, beta {beta:g}")
        lx = np.log(np.asarray(common, dtype=float))
        xc = lx - lx.mean()
        slopes = (gaps - gaps.mean(axis=1, keepdims=True)) @ xc / (xc @ xc)
    sentence = (f"At beta {beta:g} the {a} - {b} gap in {label} grows with training, by "
                f"{v.estimate * 100:.3g} points per e-fold of epochs.")
    return _claim(v, sentence, slopes, partial(trend, a=a, b=b, beta=beta, metric=metric, label=label), 100.0,
                  "points per e-fold")


# ---------------------------------------------------------------------------------------------------- families


def comparisons(df: pd.DataFrame) -> list[tuple[str, str]]:
    """Which pairs the generic report compares: every method without options against the first such method
    (the sweep's first loss); every method with options (a remedy) against the plain method of the same loss,
    or the first method when there is none."""
    names = tables.methods(df)
    options = df.groupby("method")["options"].first().to_dict() if "options" in df else {}
    loss_of = df.groupby("method")["loss"].first().to_dict()
    plain = [m for m in names if not options.get(m)]
    first = plain[0] if plain else names[0] if names else None
    out = []
    for m in names:
        if m == first:
            continue
        if options.get(m):
            base = next((p for p in plain if loss_of.get(p) == loss_of.get(m)), first)
            out.append((m, base))
        else:
            out.append((m, first))
    return [(a, b) for a, b in out if a != b]


def report_claims(df: pd.DataFrame, keys: dict) -> list[Claim]:
    """The generic report's family: per beta, each comparison on the last-epoch win rate, oracle-early-stopped
    gold, gold at matched distance, distance at the end (and out-of-language mass for remedies); each method's
    fall from the paper's epochs to the last."""
    claims = []
    es = tables.epochs(df)
    if not es:
        return claims
    last = es[-1]
    options = df.groupby("method")["options"].first().to_dict() if "options" in df else {}
    for beta in tables.betas(df):
        for a, b in comparisons(df):
            claims.append(gap(df, a, b, beta, keys["win"], last, "gold win rate vs pi_ref"))
            for kind in ("best", "matched", "final_distance"):
                claims.append(frontier_gap(df, a, b, beta, keys, kind))
            if options.get(a) and "exact.mass_malformed" in df:
                claims.append(gap(df, a, b, beta, "exact.mass_malformed", last, "out-of-language mass"))
        if any(e < last for e in PAPER_EPOCHS if e in es):
            for m in tables.methods(df):
                claims.append(fall(df, m, beta, keys["win"], "gold win rate vs pi_ref"))
    return claims


def planned_claims(methods: list[str], options: dict[str, str], betas: list[float], epochs: list[int],
                   comparisons_: list[tuple[str, str]]) -> list[str]:
    """``report_claims``'s family described from the design alone (methods and their options, betas, evaluated
    epochs, the compared pairs), before any result exists: what ``chipo demo`` records before it trains.
    Same claims, same order (tests/lab/test_verdicts.py checks it)."""
    if not epochs:
        return []
    last = max(epochs)
    early = "/".join(str(e) for e in PAPER_EPOCHS if e in epochs and e < last)
    out = []
    for beta in sorted(betas, reverse=True):
        for a, b in comparisons_:
            out.append(f"{a} vs {b}: gold win rate vs pi_ref at epoch {last}, beta {beta:g} (two-sided)")
            out += [f"{a} vs {b}: {FRONTIER_LABELS[kind]}"
                    + (" (the largest level every run at this beta reaches)" if kind == "matched" else "")
                    + f", beta {beta:g} (two-sided)" for kind in ("best", "matched", "final_distance")]
            if options.get(a):
                out.append(f"{a} vs {b}: out-of-language mass at epoch {last}, beta {beta:g} (two-sided)")
        if early:
            out += [f"{m}: gold win rate vs pi_ref falls from epochs {early} (mean) to {last}, beta {beta:g} "
                    "(one-sided)" for m in methods]
    return out


def holm(claims: list[Claim], alpha: float = 0.05) -> list[Claim]:
    """The claims with Holm-adjusted p-values over the whole family, ``passed`` re-decided on them."""
    adjusted = stats.apply_holm([c.verdict for c in claims], alpha)
    return [replace(c, verdict=v) for c, v in zip(claims, adjusted)]


def split_half(df: pd.DataFrame, claim: Claim, alpha: float = 0.05) -> tuple[bool, bool] | None:
    """The claim re-decided (unadjusted, level ``alpha``) on the first half of the seeds and on the rest; None when
    there are fewer than 2 seeds or the claim cannot be recomputed."""
    seeds = tables.seeds(df)
    if len(seeds) < 2 or claim.recompute is None:
        return None
    halves = (seeds[: len(seeds) // 2], seeds[len(seeds) // 2:])
    out = []
    for half in halves:
        sub = df[df["seed"].isin(half) | (df["method"] == "pi_ref")]
        v = claim.recompute(sub).verdict
        out.append(bool(v.p <= alpha))
    return out[0], out[1]


def frontier_reading(claims: list[Claim], a: str, b: str, beta: float) -> str:
    """Which of "better frontier" (higher gold at matched sqrt KL) and "slower drift" (closer to pi_ref at the
    end) the Holm-adjusted claims support for ``a`` against ``b``."""
    def find(kind):
        label = FRONTIER_LABELS[kind]
        return next((c for c in claims if c.verdict.claim.startswith(f"{a} vs {b}: {label}")
                     and c.verdict.claim.endswith(f"beta {beta:g}")), None)

    matched, drift = find("matched"), find("final_distance")
    better = matched is not None and matched.verdict.passed and matched.verdict.estimate > 0
    slower = drift is not None and drift.verdict.passed and drift.verdict.estimate < 0
    if better and slower:
        return "better frontier and slower drift"
    if better:
        return "better frontier"
    if slower:
        return "slower drift"
    return "neither shown"
