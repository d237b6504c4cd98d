"""Power of the paired t test and of Holm's rule over a family of claims (``chipo.stats.t_power``,
``detectable_effect_sd``): hand-derived limits, and Monte-Carlo simulations of the very rule the report applies
(``chipo.stats.one_sample_t`` on per-seed differences, then ``chipo.stats.holm`` over the family)."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import special

from chipo import stats

DRAWS = 4000


def _simulated_pass_rate(effect_sd: float, n: int, m: int, alternative: str, seed: int,
                         others_sd: float = 0.0) -> tuple[float, float]:
    """Fraction of DRAWS families in which claim 0 passes Holm at 5%, and in which its own p is at most alpha/m.

    Each family: m claims, each a paired test on n seeds with normal per-seed differences of s.d. 1; claim 0 has
    mean ``effect_sd``, the other m - 1 have mean ``others_sd``."""
    rng = np.random.default_rng(seed)
    holm_passes = first_level = 0
    for _ in range(DRAWS):
        diffs = rng.standard_normal((m, n))
        diffs[0] += effect_sd
        diffs[1:] += others_sd
        p = [stats.one_sample_t(d, alternative).p for d in diffs]
        _, reject = stats.holm(p, 0.05)
        holm_passes += bool(reject[0])
        first_level += p[0] <= 0.05 / m
    return holm_passes / DRAWS, first_level / DRAWS


def _tolerance(p: float) -> float:
    """3.5 binomial standard errors of a rate p estimated from DRAWS draws."""
    return 3.5 * math.sqrt(max(p * (1 - p), 1e-4) / DRAWS)


def test_no_effect_gives_the_level_and_the_limits_are_the_normal_ones():
    """At effect 0 the test rejects with probability alpha (one-sided: P(T > t_{1-a}) = a; two-sided likewise).
    For many seeds the t test is a z test: the detectable effect times sqrt(n) tends to z_{1-a} + z_{0.8}
    (one-sided, 1.645 + 0.842 = 2.486) or z_{1-a/2} + z_{0.8} (two-sided, 1.960 + 0.842 = 2.802)."""
    for alternative in ("greater", "two-sided", "less"):
        assert stats.t_power(0.0, 8, 0.05, alternative) == pytest.approx(0.05, abs=1e-9)
    n = 10**6
    assert stats.detectable_effect_sd(n, 0.05) * math.sqrt(n) == pytest.approx(2.4865, abs=2e-3)
    assert stats.detectable_effect_sd(n, 0.05, alternative="two-sided") * math.sqrt(n) == pytest.approx(2.8016,
                                                                                                     abs=2e-3)
    assert math.isnan(stats.t_power(1.0, 1)) and math.isnan(stats.detectable_effect_sd(1))


def test_detectable_effect_inverts_the_power_and_matches_the_difference_in_units():
    """t_power(detectable_effect_sd(n, a), n, a) = 0.8; and the detectable difference in units for a sample with
    s.e. se = sd / sqrt(n) is detectable_effect_sd * sd (both solve for the same noncentrality)."""
    for n, m, alternative in ((3, 14, "two-sided"), (8, 14, "greater"), (12, 6, "two-sided")):
        alpha = stats.holm_first_level(0.05, m)
        d = stats.detectable_effect_sd(n, alpha, alternative=alternative)
        assert stats.t_power(d, n, alpha, alternative) == pytest.approx(0.8, abs=1e-8)
        sd = 2.5
        assert stats.min_detectable_difference(sd / math.sqrt(n), n - 1, alpha, alternative=alternative) == \
            pytest.approx(d * sd, rel=1e-8)
    assert stats.t_power(-1.0, 8, 0.05, "less") == pytest.approx(stats.t_power(1.0, 8, 0.05, "greater"))


def test_power_of_one_claim_matches_a_simulation_of_the_paired_t_test():
    """m = 1: Holm is the plain test. 8 seeds, an effect of 1 sd, 5%: the simulated pass rate is within 3.5
    binomial s.e. of t_power (one-sided and two-sided)."""
    for alternative, seed in (("greater", 1), ("two-sided", 2)):
        power = stats.t_power(1.0, 8, 0.05, alternative)
        rate, _ = _simulated_pass_rate(1.0, 8, 1, alternative, seed)
        assert abs(rate - power) < _tolerance(power), (alternative, rate, power)


@pytest.mark.parametrize("alternative", ["greater", "two-sided"])
def test_power_at_holms_first_level_matches_a_simulation_of_paired_t_plus_holm(alternative):
    """The report's case: 8 seeds, 14 claims, the claim of interest at the effect it is said to detect with 80%
    power at alpha/m, the 13 others null. (1) Its p is at most alpha/m as often as t_power says (the same event,
    within 3.5 binomial s.e.); (2) under Holm it passes at least that often (the stated power is conservative),
    and at most (m - 1)/m * alpha more often: Holm adds only families in which a null claim passed first."""
    n, m = 8, 14
    alpha_m = stats.holm_first_level(0.05, m)
    d = stats.detectable_effect_sd(n, alpha_m, alternative=alternative)
    holm_rate, first_rate = _simulated_pass_rate(d, n, m, alternative, seed=3 if alternative == "greater" else 4)
    assert abs(first_rate - 0.8) < _tolerance(0.8), first_rate
    assert holm_rate >= 0.8 - _tolerance(0.8)
    assert holm_rate <= 0.8 + (m - 1) / m * 0.05 + _tolerance(0.8)


def test_when_every_other_claim_passes_holm_judges_the_last_one_at_alpha():
    """If the 13 other claims carry huge effects they are rejected first, and Holm's last step tests the claim of
    interest at alpha itself: the pass rate is then t_power at 5%, not at alpha/m (the bracket of the report's
    'conservative')."""
    power = stats.t_power(1.0, 8, 0.05, "greater")
    rate, _ = _simulated_pass_rate(1.0, 8, 14, "greater", seed=5, others_sd=20.0)
    assert abs(rate - power) < _tolerance(power), (rate, power)


def test_three_seeds_cannot_show_what_eight_can():
    """The numbers behind the demo's seed count (two-sided, 14 claims, alpha/m = 0.05/14): 80% power needs 12.25
    sd with 3 seeds and 1.91 sd with 8; an effect of 3.26 sd passes with probability 0.11 at 3 seeds."""
    alpha = 0.05 / 14
    assert stats.detectable_effect_sd(3, alpha, alternative="two-sided") == pytest.approx(12.25, abs=0.01)
    assert stats.detectable_effect_sd(8, alpha, alternative="two-sided") == pytest.approx(1.91, abs=0.01)
    assert stats.t_power(3.26, 3, alpha, "two-sided") == pytest.approx(0.11, abs=0.005)
    # and the critical value used is Student's: P(T_7 > crit) = alpha/2 at effect 0
    crit = special.stdtrit(7, 1 - alpha / 2)
    assert 2 * special.stdtr(7, -crit) == pytest.approx(alpha)
