"""chipo.stats against hand-derived values and scipy references (the null and power simulations are in
test_stats_null.py)."""

import doctest
import math

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import integrate
from scipy import stats as sps

from chipo import stats
from chipo.stats import (
    Verdict,
    apply_holm,
    clustered_mean_se,
    fall_verdict,
    gap_verdict,
    holm,
    interaction_verdict,
    mean_se,
    min_detectable_difference,
    one_sample_t,
    paired_t,
    split_half,
    trend_verdict,
)

finite = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False)


def test_docstring_examples_run():
    assert doctest.testmod(stats).failed == 0


# ------------------------------------------------------------------------------------------------------- mean_se


def test_mean_se_by_hand():
    """[1, 2, 3]: mean 2; deviations -1, 0, 1 -> sample variance 2 / (3 - 1) = 1 -> se = 1 / sqrt(3)."""
    assert mean_se([1.0, 2.0, 3.0]) == (2.0, pytest.approx(1 / math.sqrt(3)))
    mean, se = mean_se([4.0])
    assert mean == 4.0 and math.isnan(se)
    assert all(math.isnan(v) for v in mean_se([]))


def test_mean_se_axis_returns_arrays_and_nan_for_one_row():
    x = np.array([[1.0, 2.0], [3.0, 6.0]])
    mean, se = mean_se(x, axis=0)
    np.testing.assert_allclose(mean, [2.0, 4.0])
    np.testing.assert_allclose(se, [1.0, 2.0])  # |a - b| / 2 for two values: sqrt((a-b)^2 / 2) / sqrt(2)
    mean, se = mean_se(x[:1], axis=0)
    np.testing.assert_allclose(mean, [1.0, 2.0])
    assert se.shape == (2,) and np.all(np.isnan(se))


@given(arrays(float, st.integers(2, 30), elements=finite))
def test_mean_se_matches_scipy_sem(x):
    mean, se = mean_se(x)
    assert mean == pytest.approx(float(np.mean(x)))
    assert se == pytest.approx(float(sps.sem(x)), abs=1e-9)


# ------------------------------------------------------------------------------------------ clustered_mean_se


def test_clustered_by_hand():
    """[1, 1 | 3, 3]: mean 2; cluster residual sums -2, +2 -> sum of squares 8; G/(G-1) = 2; N^2 = 16 ->
    se^2 = 2 * 8 / 16 = 1. The plain s.e. treats the four as independent: sqrt(4/3) / 2 = 0.577."""
    assert clustered_mean_se([1.0, 1.0, 3.0, 3.0], ["a", "a", "b", "b"]) == (2.0, pytest.approx(1.0))
    assert mean_se([1.0, 1.0, 3.0, 3.0])[1] == pytest.approx(math.sqrt(4 / 3) / 2)


@given(arrays(float, st.integers(2, 20), elements=finite))
def test_clustered_with_one_sample_per_cluster_is_the_plain_se(x):
    """G = N: G/(G-1) * sum (x_i - mean)^2 / N^2 = sum (x_i - mean)^2 / ((N-1) N) = se^2 exactly (ddof=1)."""
    assert clustered_mean_se(x, np.arange(x.size))[1] == pytest.approx(mean_se(x)[1], rel=1e-9, abs=1e-9)


@given(arrays(float, st.integers(2, 10), elements=finite), st.integers(2, 5))
def test_clustered_se_does_not_shrink_with_duplicated_samples(x, k):
    """Each value repeated k times in its cluster: residual sums scale by k and N by k, so se is unchanged, while
    the plain s.e. of the repeated sample shrinks by about sqrt(k)."""
    assume(np.ptp(x) > 1e-3)
    base = clustered_mean_se(x, np.arange(x.size))[1]
    dup = clustered_mean_se(np.repeat(x, k), np.repeat(np.arange(x.size), k))[1]
    assert dup == pytest.approx(base, rel=1e-9)
    assert mean_se(np.repeat(x, k))[1] < base


def test_clustered_edge_cases():
    mean, se = clustered_mean_se([1.0, 2.0], ["a", "a"])
    assert mean == 1.5 and math.isnan(se)
    with pytest.raises(ValueError, match="3 values but 2 cluster labels"):
        clustered_mean_se([1.0, 2.0, 3.0], [0, 1])


# --------------------------------------------------------------------------------------------------- paired_t


def test_paired_t_by_hand():
    """a - b = [1, 2, 3]: mean 2, se 1/sqrt(3), t = 2 sqrt(3) = 3.4641, df 2. For df 2 the t CDF is closed-form,
    P(|T| > t) = 1 - t / sqrt(2 + t^2) = 1 - 3.4641 / 3.7417 = 0.07418; one-sided half of it. The 95% interval
    is 2 +- t_{0.975, 2} se = 2 +- 4.3027 * 0.57735 = 2 +- 2.4842."""
    r = paired_t([2.0, 3.0, 5.0], [1.0, 1.0, 2.0])
    t = 2 * math.sqrt(3)
    assert (r.estimate, r.df, r.n) == (2.0, 2.0, 3)
    assert r.t == pytest.approx(t)
    assert r.p == pytest.approx(1 - t / math.sqrt(2 + t * t))
    assert r.ci == pytest.approx((2 - 2.48414, 2 + 2.48414), abs=1e-4)
    assert paired_t([2.0, 3.0, 5.0], [1.0, 1.0, 2.0], "greater").p == pytest.approx(r.p / 2)
    assert paired_t([2.0, 3.0, 5.0], [1.0, 1.0, 2.0], "less").p == pytest.approx(1 - r.p / 2)


@settings(max_examples=60)
@given(st.integers(2, 12).flatmap(lambda n: st.tuples(arrays(float, n, elements=finite),
                                                       arrays(float, n, elements=finite))),
       st.sampled_from(["two-sided", "greater", "less"]))
def test_paired_t_matches_scipy_ttest_rel(ab, alternative):
    a, b = ab
    assume(np.std(a - b) > 1e-6 * (1 + np.abs(a - b).max()))
    ours = paired_t(a, b, alternative)
    ref = sps.ttest_rel(a, b, alternative=alternative)
    ci = ref.confidence_interval(0.95)
    assert ours.t == pytest.approx(ref.statistic, rel=1e-7)
    assert ours.p == pytest.approx(ref.pvalue, rel=1e-6, abs=1e-12)
    assert ours.df == ref.df
    assert ours.ci == pytest.approx((ci.low, ci.high), rel=1e-7, abs=1e-9)


def test_paired_t_degenerate_cases_are_never_significant():
    zero_var = paired_t([2.0, 3.0, 4.0], [1.0, 2.0, 3.0])  # every difference is 1: no error estimate
    assert zero_var.se == 0.0 and math.isnan(zero_var.p) and math.isnan(zero_var.t)
    one = paired_t([2.0], [1.0])
    assert one.n == 1 and math.isnan(one.p) and math.isnan(one.se)
    v = gap_verdict([2.0, 3.0, 4.0], [1.0, 2.0, 3.0], "differs")
    assert not v.passed and v.word() == "not shown"


def test_paired_t_drops_pairs_with_nan():
    with_nan = paired_t([2.0, 3.0, math.nan, 5.0], [1.0, 1.0, 0.0, 2.0])
    assert with_nan == paired_t([2.0, 3.0, 5.0], [1.0, 1.0, 2.0])


def test_paired_t_rejects_bad_input():
    with pytest.raises(ValueError, match="pairs need one value of each per seed"):
        paired_t([1.0, 2.0, 3.0], [1.0, 2.0])
    with pytest.raises(ValueError, match="alternative must be one of"):
        one_sample_t([1.0, 2.0], "bigger")


# ------------------------------------------------------------------------------------------------------- holm


def test_holm_by_hand():
    """m = 4, p = [0.01, 0.04, 0.03, 0.005]. Sorted: 0.005, 0.01, 0.03, 0.04 times m - j + 1 = 4, 3, 2, 1 gives
    0.02, 0.03, 0.06, 0.04; running maximum 0.02, 0.03, 0.06, 0.06. Step-down at alpha 0.05: 0.005 <= 0.05/4,
    0.01 <= 0.05/3, 0.03 > 0.05/2 stop -> reject the first two sorted (inputs 3 and 0)."""
    adjusted, reject = holm([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])
    assert reject.tolist() == [True, False, False, True]


@given(arrays(float, st.integers(1, 12), elements=st.floats(0, 1)), st.sampled_from([0.01, 0.05, 0.1]))
def test_holm_equals_the_step_down_procedure(p, alpha):
    adjusted, reject = holm(p, alpha)
    expected = np.zeros(p.size, dtype=bool)
    for j, i in enumerate(np.argsort(p, kind="stable")):  # reject while p_(j) <= alpha / (m - j)
        if p[i] > alpha / (p.size - j):
            break
        expected[i] = True
    assert reject.tolist() == expected.tolist()
    assert np.all(adjusted >= p) and np.all(adjusted <= 1)


def test_holm_nan_counts_in_the_family_but_never_rejects():
    """[0.02, nan]: m = 2, so 0.02 becomes 0.04 (the NaN test still counts), and the NaN is not rejected."""
    adjusted, reject = holm([0.02, math.nan])
    assert adjusted[0] == pytest.approx(0.04) and math.isnan(adjusted[1])
    assert reject.tolist() == [True, False]
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        holm([0.5, 1.5])


# ---------------------------------------------------------------------------------- min_detectable_difference


def test_mdd_large_df_is_the_normal_formula():
    """df -> inf: delta = (z_{0.975} + z_{0.8}) se = (1.959964 + 0.841621) se = 2.801585 se; one-sided
    (z_{0.95} + z_{0.8}) se = (1.644854 + 0.841621) se = 2.486475 se (the far tail adds < 1e-5 power)."""
    assert min_detectable_difference(2.0, 1e7) == pytest.approx(2 * 2.801585, rel=1e-4)
    assert min_detectable_difference(1.0, 1e7, alternative="greater") == pytest.approx(2.486475, rel=1e-4)


@pytest.mark.parametrize("df", [1.0, 2.0, 4.0, 10.0])
def test_mdd_reaches_the_power_under_the_noncentral_t(df):
    """At delta = MDD, T = (Z + lam) / sqrt(V / df) with Z ~ N(0, 1), V ~ chi2(df), lam = delta / se. Given V,
    the test rejects when Z > c sqrt(V/df) - lam or Z < -c sqrt(V/df) - lam, so the power is
    E_V[Phi(lam - c sqrt(V/df)) + Phi(-lam - c sqrt(V/df))], integrated here over V (independently of scipy's
    noncentral t). The shortcut (t_{0.975} + t_{0.8}) se is below the MDD at few seeds (power 0.766 at df 2)."""
    se = 0.3
    delta = min_detectable_difference(se, df)
    crit, lam = sps.t.ppf(0.975, df), delta / se

    def given_v(v):
        s = crit * math.sqrt(v / df)
        return (sps.norm.cdf(lam - s) + sps.norm.cdf(-lam - s)) * sps.chi2.pdf(v, df)

    reach = integrate.quad(given_v, 0, np.inf, limit=200)[0]
    assert reach == pytest.approx(0.8, abs=1e-6)
    assert delta > (crit + sps.t.ppf(0.8, df)) * se


def test_mdd_edge_cases():
    assert math.isnan(min_detectable_difference(math.nan, 2.0))
    assert math.isnan(min_detectable_difference(0.0, 2.0))
    with pytest.raises(ValueError, match="alpha < power"):
        min_detectable_difference(1.0, 2.0, alpha=0.05, power=0.01)


# ----------------------------------------------------------------------------------------------------- verdicts


def test_verdict_word():
    base = dict(claim="c", test="t", estimate=1.0, statistic=5.0, df=2.0, p=0.01)
    assert Verdict(**base, alternative="two-sided", passed=True).word() == "significant"
    assert Verdict(**base, alternative="greater", passed=True).word() == "holds"
    assert Verdict(**base, alternative="greater", passed=False).word() == "not shown"


def test_gap_and_interaction_verdicts_by_hand():
    """a - b = [1, 2, 3] (see test_paired_t_by_hand): two-sided p 0.0742 > 0.05 (not shown); one-sided 0.0371
    (the interaction claim is one-sided) holds."""
    a, b = np.array([2.0, 3.0, 5.0]), np.array([1.0, 1.0, 2.0])
    gap = gap_verdict(a, b, "chiPO differs from DPO")
    assert gap.estimate == 2.0 and gap.p == pytest.approx(0.07418, abs=1e-5) and gap.word() == "not shown"
    inter = interaction_verdict(a, b, "gap larger at the smaller beta")
    assert inter.p == pytest.approx(0.03709, abs=1e-5) and inter.passed and inter.word() == "holds"
    assert not interaction_verdict(b, a, "gap larger at the smaller beta").passed


def test_fall_verdict_is_one_sided_in_the_claimed_direction():
    early, last = np.array([0.80, 0.72, 0.75]), np.array([0.60, 0.55, 0.50])
    assert fall_verdict(early, last, "DPO falls after epoch 2").passed
    rise = fall_verdict(last, early, "DPO falls after epoch 2")
    assert not rise.passed and rise.estimate < 0 and rise.p > 0.5


def test_trend_verdict_by_hand():
    """Epochs 1, e, e^2 are log-epochs 0, 1, 2; seed s has gap c_s + k_s log(epoch) with slopes k = [1, 2, 3],
    so the slopes' one-sided t test is test_paired_t_by_hand's: estimate 2, p = 0.07418 / 2 = 0.03709."""
    x = np.array([0.0, 1.0, 2.0])
    gaps = np.array([[0.5], [-1.0], [2.0]]) + np.array([[1.0], [2.0], [3.0]]) * x
    v = trend_verdict(gaps, np.exp(x), "gap grows with training")
    assert v.estimate == pytest.approx(2.0) and v.p == pytest.approx(0.03709, abs=1e-5) and v.word() == "holds"
    assert not trend_verdict(-gaps, np.exp(x), "gap grows with training").passed
    with pytest.raises(ValueError, match="expected"):
        trend_verdict(gaps, [1, 2], "c")
    with pytest.raises(ValueError, match="not all equal"):
        trend_verdict(gaps, [2, 2, 2], "c")


def test_apply_holm_updates_adjusted_p_and_passed():
    """The Holm example above: only the claims with p 0.01 and 0.005 survive the family."""
    raw = [Verdict(f"claim {i}", "t", 1.0, 3.0, 2.0, p, "greater", passed=p <= 0.05)
           for i, p in enumerate([0.01, 0.04, 0.03, 0.005])]
    out = apply_holm(raw)
    assert [v.passed for v in out] == [True, False, False, True]
    np.testing.assert_allclose([v.p_adjusted for v in out], [0.03, 0.06, 0.06, 0.02])
    assert all(v.passed for v in raw) and math.isnan(raw[0].p_adjusted)  # inputs are untouched


def test_split_half_splits_seeds_and_compares():
    seen = []

    def record(a, b):
        seen.append((a.tolist(), b.tolist()))
        return gap_verdict(a, b, "differs")

    a = np.array([10.0, 11.0, 12.5, 10.2, 11.1, 12.0])
    b = np.zeros(6)
    result = split_half((a, b), record)
    assert seen == [([10.0, 11.0, 12.5], [0.0] * 3), ([10.2, 11.1, 12.0], [0.0] * 3)]
    assert result.first.passed and result.second.passed and result.agree
    single = split_half(np.array([[1.0, 2.0], [2.0, 2.5], [3.0, 4.0], [1.0, 1.0]]),
                        lambda g: trend_verdict(g, [1, 2], "grows"))
    assert single.first.p == pytest.approx(trend_verdict([[1.0, 2.0], [2.0, 2.5]], [1, 2], "grows").p)
    with pytest.raises(ValueError, match="same number of seeds"):
        split_half((a, b[:5]), record)
