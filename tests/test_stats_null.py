"""Simulations: chipo.stats's verdicts keep their false-positive rate at 5% when the two losses are identical, the
old "2 standard errors" rule of the lab report does not, and the verdicts do pass when the effect is real.

The simulated sweep mirrors the lab's (chipo.lab.sweep defaults): 3 seeds, evaluation epochs 1, 2, 4, 8, 16, two
betas, two losses. Gold value of (beta, loss, seed, epoch) = mean + shared * u[seed] + shared * w[seed, epoch]
+ e[beta, loss, seed, epoch], all standard normal: u is a seed effect shared by every run of that seed, w a
per-seed training trajectory shared by both losses (same data order), e the run's own noise. Under the null the
mean is one number (no difference between losses or betas, no fall, no trend). Every claim of the report is
simulated N_SIMS times through the verdict functions:

* gap: chiPO vs DPO at the last epoch, small beta (two-sided paired t);
* fall: DPO from epoch 2 (fixed in advance) to the last epoch (one-sided);
* interaction: the chiPO - DPO gap larger at the small beta than at the large one (one-sided);
* trend: the gap grows with log epoch (one-sided t of per-seed slopes);

and Holm over the four bounds the chance that any of them passes. The old rule (chipo.lab.report.claim_checks
before this module): a gap passes when |mean_a - mean_b| > 2 sqrt(se_a^2 + se_b^2) with the standard errors of
unpaired seed means; a fall when the peak of the per-epoch means (picked from those same means) exceeds the last
epoch's mean by more than 2 such standard errors. Measured here (N_SIMS = 4000, generator seed 0; Monte-Carlo
s.e. about 0.35 points at 5%):

======================  ====  ====  ===========  =====  ========  ====  =======  ========
scenario                gap   fall  interaction  trend  any of 4  Holm  old gap  old fall
======================  ====  ====  ===========  =====  ========  ====  =======  ========
independent, 5 epochs   5.2%  4.7%  4.9%         5.2%   17.1%     4.2%  11.1%    15.8%
seed-shared, 5 epochs   5.2%  5.3%  4.9%         5.2%   17.8%     4.5%  2.9%     9.3%
independent, 10 epochs  4.8%  5.0%  5.5%         4.6%   17.3%     4.3%  11.9%    21.4%
======================  ====  ====  ===========  =====  ========  ====  =======  ========

"any of 4" is the chance that at least one of the four uncorrected claims passes (why the report applies Holm).
With seed-shared noise the old gap rule is too strict rather than too lenient (unpaired standard errors carry the
seed noise that the difference cancels), so it misses real gaps; its peak-vs-last fall is too lenient everywhere.
"""

import math

import numpy as np
import pytest

from chipo.stats import (
    apply_holm,
    fall_verdict,
    gap_verdict,
    interaction_verdict,
    min_detectable_difference,
    trend_verdict,
)

N_SIMS = 4000
SEEDS = 3
LEVEL = 0.05
MC_SLACK = 3 * math.sqrt(LEVEL * (1 - LEVEL) / N_SIMS)  # 3 Monte-Carlo standard errors of a rate near 5%
SWEEP_EPOCHS = (1, 2, 4, 8, 16)
FALL_FROM = 1  # index of epoch 2: where the early epoch is fixed in advance, never picked from the data


def simulate(rng, n_sims, epochs, shared, gap=0.0, slope=0.0, fall=0.0):
    """Gold values [sim, beta (small, large), loss (chiPO, DPO), seed, epoch] (module docstring). True effects
    for the power tests: ``gap`` is a chiPO advantage at every epoch and beta, ``slope`` one growing by ``slope``
    per unit log(epoch) at the small beta only, ``fall`` lowers DPO's last epoch below the others."""
    n_epochs = len(epochs)
    seed_effect = rng.standard_normal((n_sims, 1, 1, SEEDS, 1))
    trajectory = rng.standard_normal((n_sims, 1, 1, SEEDS, n_epochs))
    gold = shared * (seed_effect + trajectory) + rng.standard_normal((n_sims, 2, 2, SEEDS, n_epochs))
    gold[:, :, 0] += gap
    gold[:, 0, 0] += slope * np.log(np.asarray(epochs, dtype=float))
    gold[:, :, 1, :, -1] -= fall
    return gold


def verdicts(gold, epochs):
    """The four claims of one simulated sweep (module docstring), in order gap, fall, interaction, trend."""
    chipo, dpo = gold[:, 0], gold[:, 1]
    gaps = chipo - dpo  # [beta, seed, epoch]
    return [gap_verdict(chipo[0, :, -1], dpo[0, :, -1], "chiPO differs from DPO at the last epoch"),
            fall_verdict(dpo[0, :, FALL_FROM], dpo[0, :, -1], "DPO falls from epoch 2 to the last"),
            interaction_verdict(gaps[0, :, -1], gaps[1, :, -1], "the gap is larger at the smaller beta"),
            trend_verdict(gaps[0], epochs, "the gap grows with training")]


def old_rule(gold):
    """Pass rates of the old report's gap and peak-vs-last fall rules (module docstring), vectorised."""
    mean, se = gold.mean(axis=-2), gold.std(axis=-2, ddof=1) / math.sqrt(SEEDS)  # [sim, beta, loss, epoch]
    chipo_m, dpo_m, chipo_se, dpo_se = mean[:, 0, 0], mean[:, 0, 1], se[:, 0, 0], se[:, 0, 1]
    gap = np.abs(chipo_m[:, -1] - dpo_m[:, -1]) > 2 * np.hypot(chipo_se[:, -1], dpo_se[:, -1])
    peak = dpo_m.argmax(axis=1)
    rows = np.arange(len(peak))
    drop = dpo_m[rows, peak] - dpo_m[:, -1]
    fall = (drop > 0) & (drop > 2 * np.hypot(dpo_se[rows, peak], dpo_se[:, -1]))
    return gap.mean(), fall.mean()


def pass_rates(gold, epochs):
    """Pass rates over the simulated sweeps: gap, fall, interaction, trend, any of the four without correction,
    any after Holm."""
    passed = np.zeros((len(gold), 6), dtype=bool)
    for i, sweep in enumerate(gold):
        family = verdicts(sweep, epochs)
        passed[i, :4] = [v.passed for v in family]
        passed[i, 5] = any(v.passed for v in apply_holm(family, LEVEL))
    passed[:, 4] = passed[:, :4].any(axis=1)
    return passed.mean(axis=0)


SCENARIOS = {"independent, 5 epochs": (SWEEP_EPOCHS, 0.0), "seed-shared, 5 epochs": (SWEEP_EPOCHS, 1.0),
             "independent, 10 epochs": (tuple(range(1, 11)), 0.0)}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_null_false_positive_rates(name):
    """Every verdict, and Holm's family, at most 5% + 3 Monte-Carlo s.e.; the old fall rule above that in every
    scenario, the old gap rule where the seeds share no noise, and four uncorrected claims together too."""
    epochs, shared = SCENARIOS[name]
    gold = simulate(np.random.default_rng(0), N_SIMS, epochs, shared)
    rates = pass_rates(gold, epochs)
    old_gap, old_fall = old_rule(gold)
    assert np.all(rates[[0, 1, 2, 3, 5]] <= LEVEL + MC_SLACK), rates
    assert rates[4] > LEVEL + MC_SLACK  # four claims at 5% each: any passes far more often than 5%
    assert old_fall > LEVEL + MC_SLACK
    if shared == 0.0:
        assert old_gap > LEVEL + MC_SLACK
    else:  # unpaired standard errors carry the seed noise that the gap cancels: too strict, not too lenient
        assert old_gap < LEVEL


def test_gap_power_at_the_min_detectable_difference():
    """Each loss has its own unit noise, so a per-seed chiPO - DPO difference has sd sqrt(2) and its mean over 3
    seeds se sqrt(2/3) (the shared noise cancels). At the true gap min_detectable_difference(sqrt(2/3), 2) the
    two-sided paired test passes 80% of the time (up to 3 Monte-Carlo s.e., 1.9 points)."""
    delta = min_detectable_difference(math.sqrt(2 / SEEDS), SEEDS - 1)
    gold = simulate(np.random.default_rng(1), N_SIMS, SWEEP_EPOCHS, 1.0, gap=delta)
    rate = np.mean([gap_verdict(g[0, 0, :, -1], g[0, 1, :, -1], "chiPO differs from DPO").passed for g in gold])
    assert rate == pytest.approx(0.8, abs=3 * math.sqrt(0.8 * 0.2 / N_SIMS))


def test_large_true_effects_pass_most_of_the_time():
    """chiPO's advantage grows by 3 per unit log(epoch) at the small beta (8.3 at epoch 16, none at the large beta)
    and DPO's last epoch falls by 6. Noncentralities: gap 8.3 / sqrt(2/3) = 10.2, fall 6 / sqrt(2/3 + 2/3 * 0.25)
    = 6.6 (the trajectory noise does not cancel), interaction 8.3 / sqrt(4/3) = 7.2, trend 3 / (sqrt(2 / 4.80) /
    sqrt(3)) = 8.0 (4.80 = sum of squared centred log epochs): each passes >= 85% of the time, after Holm too."""
    gold = simulate(np.random.default_rng(2), 1000, SWEEP_EPOCHS, 0.5, slope=3.0, fall=6.0)
    families = [verdicts(g, SWEEP_EPOCHS) for g in gold]
    single = np.array([[v.passed for v in family] for family in families]).mean(axis=0)
    corrected = np.array([[v.passed for v in apply_holm(family)] for family in families]).mean(axis=0)
    assert np.all(single >= 0.85) and np.all(corrected >= 0.85), (single, corrected)
