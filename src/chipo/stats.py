"""Small tests for the lab's claims over a few seeds: mean and standard error, paired t, Holm, verdicts.

A sweep trains each loss (chiPO, Huang et al. 2024, arXiv 2407.13399, and DPO) with the same few seeds at several
betas and evaluates it at several epochs. Runs that share a seed share data order and initialisation, so a claim
comparing two of them is tested *paired across seeds* (Student's t on per-seed differences, df = seeds - 1), not by
"a gap above 2 standard errors" of unpaired means with a normal cutoff: with 3 seeds and no true effect that rule
passes about 12% of the time, and a peak-vs-last fall with the peak picked from the same means about 16% (21% with
10 epochs); ``tests/test_stats_null.py`` shows both and that every verdict here stays at its nominal level.

Every function is pure (numpy arrays in, numbers out). NaN inputs are dropped pairwise (a seed missing a value
drops out of that comparison) and a test that cannot be computed (fewer than 2 seeds, zero variance) reports
``p = nan`` and is never passed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import numpy as np
from scipy import optimize, special
from scipy import stats as sps

ALTERNATIVES = ("two-sided", "greater", "less")


def mean_se(values, axis: int | None = None):
    r"""Mean and standard error of the mean.

    .. math:: \bar x = \frac1n \sum_i x_i, \qquad
       \mathrm{se} = \sqrt{\frac{1}{n(n-1)} \sum_i (x_i - \bar x)^2}

    NaN when ``n < 2`` (and both NaN when ``n = 0``); NaN values are not dropped (drop them first).

    Examples:
      >>> mean_se([1.0, 2.0, 3.0])
      (2.0, 0.5773502691896257)

    Args:
      values: array-like.
      axis: reduce over this axis (arrays returned); ``None`` flattens and returns two floats.

    Returns:
      ``(mean, se)``.
    """
    x = np.asarray(values, dtype=float)
    if axis is None:
        x = x.ravel()
        n = x.size
        if n < 2:
            return (float(x[0]) if n else math.nan), math.nan
        mean = float(x.sum()) / n
        dev = x - mean
        return mean, math.sqrt(float(dev @ dev) / ((n - 1) * n))
    n = x.shape[axis]
    shape = tuple(np.delete(np.array(x.shape), axis % x.ndim))
    mean = x.mean(axis=axis) if n else np.full(shape, math.nan)
    return mean, x.std(axis=axis, ddof=1) / math.sqrt(n) if n > 1 else np.full(shape, math.nan)


def clustered_mean_se(values, clusters) -> tuple[float, float]:
    r"""Mean and cluster-robust (CR1) standard error, for samples correlated within a cluster (e.g. a prompt).

    With :math:`G` clusters, :math:`N` samples and :math:`s_g = \sum_{i \in g} (x_i - \bar x)`:

    .. math:: \mathrm{se}^2 = \frac{G}{G-1} \, \frac{\sum_g s_g^2}{N^2}

    With one sample per cluster (:math:`G = N`) the factor :math:`G/(G-1)` makes this exactly the plain
    ``ddof=1`` standard error; repeating every sample k times in its cluster leaves it unchanged (the plain s.e.
    would shrink by :math:`\sqrt k`). NaN with fewer than 2 clusters.

    Examples:
      >>> clustered_mean_se([1.0, 1.0, 3.0, 3.0], ["a", "a", "b", "b"])
      (2.0, 1.0)

    References:
      Cameron & Miller, `A Practitioner's Guide to Cluster-Robust Inference
      <https://doi.org/10.3368/jhr.50.2.317>`_, J. Human Resources 50(2), 2015 (Stata's CR1 with one regressor).
    """
    x = np.asarray(values, dtype=float).ravel()
    labels = np.asarray(clusters).ravel()
    if labels.size != x.size:
        raise ValueError(f"clustered_mean_se: {x.size} values but {labels.size} cluster labels")
    if x.size == 0:
        return math.nan, math.nan
    _, group = np.unique(labels, return_inverse=True)
    g = int(group.max()) + 1
    mean = float(x.mean())
    if g < 2:
        return mean, math.nan
    sums = np.bincount(group, weights=x - mean, minlength=g)
    return mean, math.sqrt(g / (g - 1) * float(sums @ sums)) / x.size


@dataclass(frozen=True)
class TTest:
    """Result of a one-sample or paired t test (``estimate`` is the mean (difference))."""

    estimate: float
    se: float
    t: float
    df: float
    p: float
    ci: tuple[float, float]
    n: int
    alternative: str


def _check_alternative(alternative: str) -> None:
    if alternative not in ALTERNATIVES:
        raise ValueError(f"alternative must be one of {', '.join(ALTERNATIVES)}, got {alternative!r}")


def one_sample_t(values, alternative: str = "two-sided", confidence: float = 0.95) -> TTest:
    r"""Student's t test of :math:`E[x] = 0`: :math:`t = \bar x / \mathrm{se}`, ``df = n - 1``.

    NaN values are dropped. ``p`` (and the interval) is NaN for ``n < 2`` or zero variance: no error estimate,
    so no claim. The interval matches ``alternative`` (one-sided intervals have an infinite end), as in scipy.

    Examples:
      >>> round(one_sample_t([1.0, 2.0, 3.0]).p, 4)
      0.0742

    References:
      Student, `The probable error of a mean <https://doi.org/10.2307/2331554>`_, Biometrika 6(1), 1908.
    """
    _check_alternative(alternative)
    x = np.asarray(values, dtype=float).ravel()
    x = x[~np.isnan(x)]
    n = x.size
    mean, se = mean_se(x)
    df = float(n - 1) if n > 1 else math.nan
    if not (n > 1 and se > 0 and math.isfinite(se)):
        return TTest(mean, se, math.nan, df, math.nan, (math.nan, math.nan), n, alternative)
    t = mean / se
    if alternative == "two-sided":
        p = 2.0 * special.stdtr(df, -abs(t))
        half = special.stdtrit(df, 0.5 + confidence / 2) * se
        ci = (mean - half, mean + half)
    else:
        p = special.stdtr(df, -t if alternative == "greater" else t)
        half = special.stdtrit(df, confidence) * se
        ci = (mean - half, math.inf) if alternative == "greater" else (-math.inf, mean + half)
    return TTest(mean, se, float(t), df, float(min(p, 1.0)), (float(ci[0]), float(ci[1])), n, alternative)


def paired_t(a, b, alternative: str = "two-sided", confidence: float = 0.95) -> TTest:
    """Paired t test of ``mean(a - b) = 0`` (``a[i]``, ``b[i]`` from the same seed); same as scipy.stats.ttest_rel.

    Pairs with a NaN on either side are dropped. See :func:`one_sample_t`.

    Examples:
      >>> r = paired_t([2.0, 3.0, 5.0], [1.0, 1.0, 2.0])
      >>> r.estimate, r.df, round(r.p, 4)
      (2.0, 2.0, 0.0742)
    """
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a.shape != b.shape:
        raise ValueError(f"paired_t: a has shape {a.shape}, b has {b.shape}; pairs need one value of each per seed")
    return one_sample_t(a - b, alternative, confidence)


def holm(pvalues, alpha: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    r"""Holm-Bonferroni step-down: adjusted p-values and which hypotheses are rejected (family-wise error <= alpha).

    Sort :math:`p_{(1)} \le \dots \le p_{(m)}`; :math:`\tilde p_{(i)} = \min(1, \max_{j \le i} (m - j + 1)
    p_{(j)})`; reject where :math:`\tilde p \le \alpha`. A NaN p-value (a test that could not be computed) still
    counts in m (conservative), is never rejected and stays NaN.

    Examples:
      >>> adj, reject = holm([0.01, 0.04, 0.03, 0.005])
      >>> adj.round(3).tolist(), reject.tolist()
      ([0.03, 0.06, 0.06, 0.02], [True, False, False, True])

    References:
      Holm, `A simple sequentially rejective multiple test procedure <https://www.jstor.org/stable/4615733>`_,
      Scand. J. Statist. 6(2), 1979.
    """
    p = np.asarray(pvalues, dtype=float)
    if np.any((p < 0) | (p > 1)):
        raise ValueError("holm: p-values must lie in [0, 1] (or be NaN)")
    flat = np.where(np.isnan(p), 1.0, p).ravel()
    m = flat.size
    order = np.argsort(flat, kind="stable")
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * flat[order]))
    adjusted = np.where(np.isnan(p), math.nan, adjusted.reshape(p.shape))
    return adjusted, adjusted <= alpha  # NaN compares False


def _tails(alternative: str) -> int:
    _check_alternative(alternative)
    return 2 if alternative == "two-sided" else 1


def _rejection_probability(ncp: float, df: float, crit: float, tails: int) -> float:
    """P(T > crit) (+ P(T < -crit) two-sided) for T noncentral t with ``df`` and noncentrality ``ncp``."""
    far = float(sps.nct.cdf(-crit, df, ncp)) if tails == 2 else 0.0
    if math.isnan(far):  # scipy gives NaN deep in the tail, where P(T < -crit) <= P(T < 0) = Phi(-ncp) ~ 0
        far = float(special.ndtr(-ncp))
    return float(sps.nct.sf(crit, df, ncp)) + far


def _ncp_for_power(df: float, alpha: float, power: float, tails: int) -> float:
    """The noncentrality at which the t test (``df``, level ``alpha``) rejects with probability ``power``."""
    if not (0 < alpha < power < 1):
        raise ValueError(f"need 0 < alpha < power < 1, got alpha {alpha} and power {power}")
    crit = float(special.stdtrit(df, 1 - alpha / tails))
    shortfall = lambda ncp: _rejection_probability(ncp, df, crit, tails) - power  # noqa: E731
    high = crit + 4.0
    while shortfall(high) < 0:  # at ncp = 0 the test rejects with probability alpha < power
        high *= 2
    return optimize.brentq(shortfall, 0.0, high, xtol=1e-10)


def min_detectable_difference(se: float, df: float, alpha: float = 0.05, power: float = 0.8,
                              alternative: str = "two-sided") -> float:
    r"""Smallest true mean (paired) difference the t test at level ``alpha`` detects with probability ``power``.

    Solves :math:`P(|T| > t_{1-\alpha/2,\,df}) = \text{power}` for :math:`T` noncentral t with ``df`` and
    noncentrality :math:`\delta / \mathrm{se}` (one tail for one-sided), and returns :math:`\delta`. The
    approximation: ``se`` is treated as the true standard error :math:`\sigma/\sqrt n` (it is an estimate with
    ``df`` degrees of freedom). The textbook shortcut :math:`(t_{1-\alpha/2} + t_{\text{power}})\,\mathrm{se}`
    is smaller at few seeds (power 0.77, not 0.8, at df = 2); for large df both tend to 2.80 se.

    Examples:
      >>> round(min_detectable_difference(1.0, 1e6), 2)
      2.8

    References:
      Cohen, Statistical Power Analysis for the Behavioral Sciences, 2nd ed., 1988, ch. 2.
    """
    tails = _tails(alternative)
    if not (0 < alpha < power < 1):
        raise ValueError(f"need 0 < alpha < power < 1, got alpha {alpha} and power {power}")
    if not (math.isfinite(se) and se > 0 and df > 0):
        return math.nan
    return float(_ncp_for_power(df, alpha, power, tails) * se)


def t_power(effect_sd: float, n: int, alpha: float = 0.05, alternative: str = "greater") -> float:
    r"""Power of the one-sample (paired) t test with ``n`` seeds at level ``alpha`` when the true mean difference
    is ``effect_sd`` standard deviations of the per-seed differences (Cohen's d).

    .. math:: \text{power} = P(T > t_{1-\alpha/k,\,n-1}) \;(+\, P(T < -t_{1-\alpha/2,\,n-1}) \text{ if two-sided}),
       \qquad T \sim t'_{n-1}(\delta = d \sqrt n)

    with k = 2 two-sided, 1 one-sided ("greater"; "less" is its mirror: pass the effect with its sign). Exact
    for normal per-seed differences: it needs no estimate of sigma, because both the effect and the test are in
    units of it. NaN for n < 2.

    Examples:
      >>> round(t_power(0.0, 8, alpha=0.05), 3)  # no effect: the test's own level
      0.05
      >>> round(t_power(1.91, 8, alpha=0.05 / 14, alternative="two-sided"), 2)  # Holm's first step, 14 claims
      0.8
      >>> round(t_power(3.26, 3, alpha=0.05 / 14, alternative="two-sided"), 2)  # the same rule with 3 seeds
      0.11

    References:
      Cohen, Statistical Power Analysis for the Behavioral Sciences, 2nd ed., 1988, ch. 2.
    """
    tails = _tails(alternative)
    if not 0 < alpha < 1:
        raise ValueError(f"need 0 < alpha < 1, got {alpha}")
    if n < 2:
        return math.nan
    df = float(n - 1)
    ncp = (-effect_sd if alternative == "less" else effect_sd) * math.sqrt(n)
    return _rejection_probability(ncp, df, float(special.stdtrit(df, 1 - alpha / tails)), tails)


def detectable_effect_sd(n: int, alpha: float = 0.05, power: float = 0.8, alternative: str = "greater") -> float:
    """The smallest true effect, in standard deviations of the per-seed differences, that the t test with ``n``
    seeds at level ``alpha`` detects with probability ``power``: the inverse of :func:`t_power` in the effect.

    Examples:
      >>> round(detectable_effect_sd(8, alpha=0.05 / 14, alternative="two-sided"), 2)
      1.91
      >>> round(detectable_effect_sd(3, alpha=0.05 / 14, alternative="two-sided"), 2)
      12.25
    """
    tails = _tails(alternative)
    if n < 2:
        return math.nan
    return float(_ncp_for_power(float(n - 1), alpha, power, tails) / math.sqrt(n))


def holm_first_level(alpha: float, m: int) -> float:
    """The level Holm's procedure applies to the smallest of ``m`` p-values, alpha / m: the level at which a
    claim is sure to be judged (a claim tested later in the step-down gets alpha / (m - j + 1) >= this only
    after every smaller p-value passed), so power computed at it is a lower bound (conservative)."""
    return alpha / max(int(m), 1)


@dataclass(frozen=True)
class Verdict:
    """One claim checked on the numbers: the test, its statistic, p (and Holm-adjusted p) and whether it passed."""

    claim: str
    test: str
    estimate: float
    statistic: float
    df: float
    p: float
    alternative: str
    alpha: float = 0.05
    p_adjusted: float = math.nan
    passed: bool = False

    def word(self) -> str:
        """The claim's word: "significant" (two-sided difference) or "holds" (one-sided claim) if passed."""
        if not self.passed:
            return "not shown"
        return "significant" if self.alternative == "two-sided" else "holds"


def _verdict(claim: str, test: str, result: TTest, alpha: float) -> Verdict:
    return Verdict(claim, f"{test} ({result.alternative}, n={result.n})", result.estimate, result.t, result.df,
                   result.p, result.alternative, alpha, passed=bool(result.p <= alpha))


def gap_verdict(a_by_seed, b_by_seed, claim: str, alpha: float = 0.05, alternative: str = "two-sided") -> Verdict:
    """Is ``a`` different from ``b`` (e.g. chiPO's and DPO's gold win rate at one beta and epoch)? Paired across
    seeds; ``estimate`` is mean(a - b)."""
    return _verdict(claim, "paired t across seeds", paired_t(a_by_seed, b_by_seed, alternative), alpha)


def fall_verdict(early_by_seed, last_by_seed, claim: str, alpha: float = 0.05) -> Verdict:
    """Does a metric fall from an early epoch to the last? One-sided paired t of early - last > 0.

    The early epoch must be fixed in advance (e.g. where the paper reports the peak), NOT chosen as the peak of
    the same means: picking the maximum of noisy means and testing it against the last passes about 16% of the
    time with no true fall at 5 epochs (21% at 10)."""
    return _verdict(claim, "paired t across seeds", paired_t(early_by_seed, last_by_seed, "greater"), alpha)


def interaction_verdict(gap_small_beta_by_seed, gap_large_beta_by_seed, claim: str, alpha: float = 0.05) -> Verdict:
    """Is the per-seed gap (e.g. chiPO - DPO) larger at the smaller beta? One-sided paired t of the gap
    difference; pairing assumes seed i is the same seed at both betas."""
    result = paired_t(gap_small_beta_by_seed, gap_large_beta_by_seed, "greater")
    return _verdict(claim, "paired t of gap differences", result, alpha)


def trend_verdict(gaps_by_epoch_by_seed, epochs: Sequence[float], claim: str, alpha: float = 0.05) -> Verdict:
    r"""Does the gap grow with training? Per seed, the least-squares slope of gap on log(epoch); then a
    one-sided t test that the mean slope is > 0 (seeds are the replicates, df = seeds - 1).

    ``gaps_by_epoch_by_seed`` has shape (seeds, epochs); a seed with a NaN gap is dropped. ``estimate`` is the
    mean slope per unit log(epoch) (per e-fold of training)."""
    y = np.asarray(gaps_by_epoch_by_seed, dtype=float)
    x = np.log(np.asarray(epochs, dtype=float))
    if y.ndim != 2 or y.shape[1] != x.size:
        raise ValueError(f"trend_verdict: gaps have shape {y.shape}; expected (seeds, {x.size} epochs)")
    if not np.all(np.isfinite(x)) or np.ptp(x) == 0:
        raise ValueError("trend_verdict: epochs must be positive and not all equal")
    xc = x - x.mean()
    slopes = (y - y.mean(axis=1, keepdims=True)) @ xc / (xc @ xc)
    return _verdict(claim, "t of per-seed slopes vs log epoch", one_sample_t(slopes, "greater"), alpha)


def apply_holm(verdicts: Sequence[Verdict], alpha: float = 0.05) -> list[Verdict]:
    """The verdicts with Holm-adjusted p-values over the family, and ``passed`` re-decided on them."""
    adjusted, reject = holm([v.p for v in verdicts], alpha)
    return [replace(v, p_adjusted=float(q), alpha=alpha, passed=bool(r)) for v, q, r in zip(verdicts, adjusted,
                                                                                               reject)]


@dataclass(frozen=True)
class SplitHalf:
    """A verdict on the first half of the seeds, on the second half, and whether they agree (both passed or not)."""

    first: Verdict
    second: Verdict
    agree: bool


def split_half(values_by_seed, verdict_fn: Callable[..., Verdict]) -> SplitHalf:
    """Replication check: ``verdict_fn`` on seeds ``[:n // 2]`` and on ``[n // 2:]`` (seeds on axis 0).

    ``values_by_seed`` is one array or a tuple of arrays (each split, then passed as separate arguments), e.g.
    ``split_half((chipo, dpo), lambda a, b: gap_verdict(a, b, "chiPO differs from DPO"))``. With few seeds a half
    rarely has the power to pass; agreement then mostly means "neither shown".
    """
    arrays = values_by_seed if isinstance(values_by_seed, tuple) else (values_by_seed,)
    arrays = tuple(np.asarray(v, dtype=float) for v in arrays)
    n = arrays[0].shape[0]
    if any(v.shape[0] != n for v in arrays):
        raise ValueError("split_half: every array needs the same number of seeds on axis 0")
    first = verdict_fn(*(v[: n // 2] for v in arrays))
    second = verdict_fn(*(v[n // 2:] for v in arrays))
    return SplitHalf(first, second, first.passed == second.passed)
