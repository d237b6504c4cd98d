"""The monitor's lab validation: regret, lead, tuning and the report section on hand-built runs."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from chipo.lab.monitor_analysis import analyse, outcome, spearman, tune, when_to_stop_section
from chipo.lab.monitor_validation import default_schedule, token_pairs
from chipo.monitor import AlarmRule
from markdown_checks import assert_tables_well_formed


def _run(loss, beta, seed, gold, off, steps=None):
    steps = steps or list(range(0, 2 * len(gold), 2))
    return pd.DataFrame({"loss": loss, "beta": beta, "seed": seed, "step": steps, "epoch": [s / 4 for s in steps],
                         "gold": gold, "off_support": off, "train_acc": 0.6, "implicit_acc": 0.5,
                         "kl_k3": [0.1 * i for i in range(len(gold))]})


def test_outcome_by_hand():
    """gold (0.3, 0.5, 0.6, 0.4, 0.2) peaks at index 2 (epoch 1); off_support (0.02, 0.03, 0.05, 0.3, 0.6) first
    exceeds 0.1 at index 3 (epoch 1.5): the monitor keeps index 2, regret 0, lead 1 - 1.5 = -0.5 epochs (the alarm
    comes one evaluation after the peak). Threshold 0.04 fires at index 2: keeps index 1, regret 0.6 - 0.5 = 0.1."""
    run = _run("dpo", 0.05, 0, [0.3, 0.5, 0.6, 0.4, 0.2], [0.02, 0.03, 0.05, 0.3, 0.6])
    out = outcome(run, [AlarmRule("off_support", 0.1)])
    assert out["choice_step"] == 4 and out["regret"] == 0.0 and out["lead_epochs"] == -0.5 and out["alarm"]
    assert outcome(run, [AlarmRule("off_support", 0.04)])["regret"] == pytest.approx(0.1)
    never = outcome(run, [AlarmRule("off_support", 0.9)])
    assert never["regret"] == pytest.approx(0.4) and not never["alarm"] and math.isnan(never["lead_epochs"])


def test_spearman_by_hand():
    assert spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 3], [1, 5, 9]) == pytest.approx(1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))


def _table():
    """Four seeds x two betas x one loss; gold peaks at index 2 in every run and off_support jumps right after it,
    so the tuned rule keeps the peak: regret 0 everywhere, against the last evaluation's 0.4."""
    runs = [_run("dpo", beta, seed, [0.3, 0.5, 0.6, 0.4, 0.2 + 0.01 * seed],
                 [0.02, 0.03, 0.05 + 0.01 * seed, 0.3, 0.6]) for beta in (0.05, 0.005) for seed in range(4)]
    return pd.concat(runs, ignore_index=True)


def test_tuning_picks_a_threshold_with_zero_regret_and_the_section_reports_it():
    res = analyse(_table(), tune_seeds=(0, 1), tune_beta=0.05)
    assert res["rule"].signal == "off_support" and 0.06 <= res["rule"].threshold < 0.3
    per_run = res["per_run"]
    assert (per_run["monitor_regret"] == 0).all()
    assert per_run.groupby("split").size().to_dict() == {"tuning": 2, "held-out seeds": 2, "held-out beta": 4}
    assert per_run["regret_last"].round(6).tolist() == [round(0.4 - 0.01 * s, 6) for s in (0, 1, 2, 3)] * 2
    text = when_to_stop_section(_table(), tune_seeds=(0, 1), tune_beta=0.05)
    assert text.startswith("## When to stop") and "off_support >" in text and "| dpo | 0.005 |" in text
    assert assert_tables_well_formed(text) == 3  # signals, regret per group, tests
    # Two seeds per test group, zero-variance differences: no t statistic, so nothing is claimed.
    assert "not shown" in text


def test_tune_takes_the_middle_of_tied_thresholds():
    """Candidates are the 40 quantiles of the run's values; those in [0.05, 0.3) give regret 0 (alarm at index 3),
    and the kept threshold is the median of them, strictly inside the interval."""
    run = _run("dpo", 0.05, 0, [0.3, 0.5, 0.6, 0.4, 0.2], [0.02, 0.03, 0.05, 0.3, 0.6])
    tuned = tune({("dpo", 0.05, 0): run}, signals=["off_support"])
    assert tuned.iloc[0]["tuning_regret"] == 0.0 and 0.05 < tuned.iloc[0]["threshold"] < 0.3


def test_schedule_and_token_pairs():
    """12 steps per epoch, 3 epochs: every 2 steps to step 24, every 6 after (epoch 8 is past the end)."""
    assert default_schedule(12, 3) == [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 30, 36]
    pairs = token_pairs([{"chosen": "a", "rejected": "b", "prompt_token_ids": [1], "chosen_token_ids": [2, 9],
                          "rejected_token_ids": [3]},
                         {"chosen": "a", "rejected": "a", "prompt_token_ids": [1], "chosen_token_ids": [2],
                          "rejected_token_ids": [2]}])
    assert len(pairs) == 1 and pairs.chosen_ids == [[2, 9]]
