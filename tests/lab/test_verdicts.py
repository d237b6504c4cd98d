"""The report's verdict functions (``chipo.lab.verdicts``): hand-checked values, and their false-positive rates
when the methods are identical (the null), run through the very functions the report calls."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps

from chipo.lab import tables, verdicts

KEYS = {"win": "exact.win_rate_vs_ref", "gold": "exact.gold", "kl": "exact.kl", "kl_name": "exact KL",
        "chi2": "exact.chi2", "reference": "exact.win_rate_vs_reference", "exact": True}
EPOCHS = (1, 2, 4, 8)


def synthetic(rng, n_seeds=3, betas=(0.05, 0.005), effect=0.0, methods=("a", "b"), options=None) -> pd.DataFrame:
    """A results table: a seed effect shared by every method (seeds share data), independent noise per run and
    epoch, flat mean over epochs; method ``methods[0]`` gets ``effect`` added to win rate and gold."""
    rows = [{"method": "pi_ref", "loss": "pi_ref", "options": "", "beta": np.nan, "seed": np.nan, "epoch": 0,
             "exact.win_rate_vs_ref": 0.5, "exact.gold": 0.5, "exact.kl": 0.0, "exact.mass_malformed": 0.01}]
    for beta in betas:
        for s in range(n_seeds):
            shared = rng.normal(0, 0.05)
            for i, m in enumerate(methods):
                shift = effect if i == 0 else 0.0
                for e in EPOCHS:
                    rows.append({"method": m, "loss": "dpo", "options": (options or {}).get(m, ""), "beta": beta,
                                 "seed": s, "epoch": e,
                                 "exact.win_rate_vs_ref": 0.6 + shared + shift + rng.normal(0, 0.05),
                                 "exact.gold": 0.5 + shared + shift + rng.normal(0, 0.05),
                                 "exact.kl": 0.5 * e * math.exp(rng.normal(0, 0.2)),
                                 "exact.mass_malformed": 0.02 + abs(rng.normal(0, 0.01))})
    return pd.DataFrame(rows)


def null_claims(df: pd.DataFrame) -> dict[str, verdicts.Claim]:
    """Every verdict kind of the report, methods a vs b (identical under the null)."""
    out = {"gap": verdicts.gap(df, "a", "b", 0.05, KEYS["win"], 8, "win"),
           "fall": verdicts.fall(df, "a", 0.05, KEYS["win"], "win"),
           "interaction": verdicts.interaction(df, "a", "b", 0.005, 0.05, KEYS["win"], 8, "win"),
           "trend": verdicts.trend(df, "a", "b", 0.005, KEYS["win"], "win")}
    for kind in ("best", "matched", "final_distance"):
        out[kind] = verdicts.frontier_gap(df, "a", "b", 0.05, KEYS, kind)
    return out


@pytest.mark.slow
def test_every_verdict_keeps_its_false_positive_rate_under_the_null():
    """Identical methods, 3 seeds, N = 600 Monte-Carlo tables: each verdict passes (unadjusted 5%) at most
    5% + 3 binomial s.d. (sqrt(0.05 * 0.95 / 600) = 0.0089) of the time; Holm over the whole family keeps the
    family-wise rate there too. (The old rule, "gap > 2 s.e." with a normal cutoff, passes ~12% with 3 seeds.)"""
    n = 600
    rng = np.random.default_rng(2024)
    passes: dict[str, int] = {}
    family = 0
    for _ in range(n):
        df = synthetic(rng)
        claims = null_claims(df)
        for name, c in claims.items():
            passes[name] = passes.get(name, 0) + int(c.verdict.p <= 0.05)
        family += int(any(c.verdict.passed for c in verdicts.holm(list(claims.values()))))
    bound = 0.05 + 3 * math.sqrt(0.05 * 0.95 / n)
    rates = {name: count / n for name, count in passes.items()}
    assert all(rate <= bound for rate in rates.values()), rates
    assert family / n <= bound
    assert min(rates.values()) > 0.0  # the tests are not vacuous: they do reject sometimes


def test_a_real_gap_is_detected():
    """A true gap of 0.2 (4x the per-run noise s.d. 0.05) with 5 seeds: per-seed differences have s.d. 0.07, so
    t ~ 0.2 / (0.07 / sqrt 5) ~ 6.3 on 4 df; the gap verdict passes in most tables."""
    rng = np.random.default_rng(7)
    hits = [verdicts.gap(synthetic(rng, n_seeds=5, effect=0.2), "a", "b", 0.05, KEYS["win"], 8, "win").verdict.passed
            for _ in range(40)]
    assert np.mean(hits) > 0.8


def test_gap_is_the_paired_t_test_and_states_its_sentence_only_when_it_passes():
    rng = np.random.default_rng(0)
    df = synthetic(rng, n_seeds=4, effect=0.3)
    c = verdicts.gap(df, "a", "b", 0.05, KEYS["win"], 8, "win rate")
    a = tables.at_epoch(df, "a", 0.05, KEYS["win"], 8)
    b = tables.at_epoch(df, "b", 0.05, KEYS["win"], 8)
    ref = sps.ttest_rel(a, b)
    assert c.verdict.p == pytest.approx(ref.pvalue) and c.verdict.estimate == pytest.approx(np.mean(a - b))
    assert c.verdict.passed and c.statement() == c.sentence and "higher" in c.sentence
    assert c.se == pytest.approx(np.std(a - b, ddof=1) / 2) and c.df == 3
    assert c.detectable() > 0
    null = verdicts.gap(synthetic(np.random.default_rng(1), n_seeds=4), "a", "b", 0.05, KEYS["win"], 8, "win")
    forced = verdicts.holm([null, c])[0]
    assert not forced.verdict.passed and forced.statement() is None and forced.verdict.word() == "not shown"


def test_fall_is_measured_from_the_paper_epochs_not_from_the_peak():
    """Win rates by epoch 1, 2, 4, 8 = 0.6, 0.6, 0.6, 0.4 (+ seed noise): estimate = 0.6 - 0.4 = 0.2 exactly
    per seed when the noise is shared within a seed."""
    rows = [{"method": "a", "loss": "dpo", "options": "", "beta": 0.1, "seed": s, "epoch": e,
             "exact.win_rate_vs_ref": w + 0.01 * s * s} for s in range(3)
            for e, w in zip(EPOCHS, (0.6, 0.6, 0.6, 0.4))]
    rows[4]["exact.win_rate_vs_ref"] += 0.03  # seed 1, epoch 1: the per-seed fall differs -> finite t
    c = verdicts.fall(pd.DataFrame(rows), "a", 0.1, KEYS["win"], "win")
    assert c.verdict.estimate == pytest.approx(0.2 + 0.01 / 3)
    assert c.verdict.alternative == "greater" and "epochs 1/2/4" in c.verdict.claim


def test_gold_at_distance_interpolates_along_the_run():
    """d = 0, 1, 3 with gold 0.5, 0.7, 0.1: level 2 lies halfway from d=1 to d=3 -> 0.7 + 0.5 (0.1 - 0.7) = 0.4."""
    d, g = np.array([0.0, 1.0, 3.0]), np.array([0.5, 0.7, 0.1])
    assert tables.gold_at_distance(d, g, 2.0) == pytest.approx(0.4)
    assert tables.gold_at_distance(d, g, 0.0) == pytest.approx(0.5)
    assert math.isnan(tables.gold_at_distance(d, g, 4.0))
    # a run that goes out and comes back: the first crossing counts
    assert tables.gold_at_distance(np.array([0.0, 2.0, 1.0]), np.array([0.5, 0.3, 0.9]), 1.0) == pytest.approx(0.4)


def test_frontier_reading_and_comparisons():
    rng = np.random.default_rng(3)
    df = synthetic(rng, n_seeds=6, effect=0.4, methods=("b+sft", "b", "c"), options={"b+sft": "sft_weight=1"})
    assert verdicts.comparisons(df) == [("b+sft", "b"), ("c", "b")]
    claims = verdicts.holm(verdicts.report_claims(df, KEYS))
    # b+sft has higher gold at every distance (same KL law): a better frontier, no evidence of slower drift
    assert verdicts.frontier_reading(claims, "b+sft", "b", 0.05) in ("better frontier",
                                                                      "better frontier and slower drift")
    assert verdicts.frontier_reading(claims, "c", "b", 0.05) in ("neither shown", "better frontier",
                                                                  "slower drift")


def test_split_half_redecides_on_each_half_of_the_seeds():
    rng = np.random.default_rng(4)
    df = synthetic(rng, n_seeds=8, effect=0.5)
    c = verdicts.gap(df, "a", "b", 0.05, KEYS["win"], 8, "win")
    assert verdicts.split_half(df, c) == (True, True)
    one = synthetic(rng, n_seeds=1)
    assert verdicts.split_half(one, verdicts.gap(one, "a", "b", 0.05, KEYS["win"], 8, "win")) is None


def test_the_plan_written_before_the_run_lists_the_claims_the_report_tests():
    """``report.claim_plan`` (from the design alone: methods, options, betas, epochs) names the same claims in
    the same order as the family the report tests (generic claims, then the paper's), with and without a remedy
    (which adds an out-of-language-mass claim per beta)."""
    from chipo.lab.report import claim_plan
    from chipo.lab.report_paper import PAPER, paper_claims

    rng = np.random.default_rng(5)
    for df in (synthetic(rng, methods=("chipo", "dpo")),
               synthetic(rng, methods=("chipo+sft", "dpo", "chipo"), options={"chipo+sft": "sft_weight=1"})):
        claims = verdicts.report_claims(df, KEYS) + paper_claims(df, KEYS)
        plan = claim_plan(df, PAPER)
        assert len(plan) == len(claims) > 0
        for text, c in zip(plan, claims):
            head = c.verdict.claim.split(":")[0]
            assert text.startswith(head), (text, c.verdict.claim)
            assert ("(one-sided" in text) == (c.verdict.alternative == "greater"), text


def test_a_claims_power_and_detectable_effect_use_its_own_seed_count_and_sidedness():
    """A two-sided gap on 4 seeds and a one-sided fall on 3 seeds: power at d and the 80%-power effect are
    stats.t_power / detectable_effect_sd with that n and alternative; the detectable difference in units is the
    effect in sd times the seeds' s.d. (se * sqrt(n))."""
    from chipo import stats

    rng = np.random.default_rng(6)
    df = synthetic(rng, n_seeds=4, effect=0.1)
    gap = verdicts.gap(df, "a", "b", 0.05, KEYS["win"], 8, "win")
    assert gap.n == 4
    assert gap.power(2.0, 0.01) == pytest.approx(stats.t_power(2.0, 4, 0.01, "two-sided"))
    assert gap.detectable_sd(0.01) == pytest.approx(stats.detectable_effect_sd(4, 0.01, 0.8, "two-sided"))
    assert gap.detectable(0.01) == pytest.approx(gap.detectable_sd(0.01) * gap.se * 2)
    fall = verdicts.fall(synthetic(rng, n_seeds=3), "a", 0.05, KEYS["win"], "win")
    assert fall.n == 3 and fall.power(2.0, 0.05) == pytest.approx(stats.t_power(2.0, 3, 0.05, "greater"))
