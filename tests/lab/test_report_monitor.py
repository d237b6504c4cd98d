"""The demo report's "When to stop" section on hand-built evaluations (chipo.lab.report_monitor)."""

import pandas as pd
import pytest
from scipy import stats

from chipo.lab.report_monitor import monitor_runs, per_run_regrets, when_to_stop_lines
from markdown_checks import assert_tables_well_formed

KEYS = {"gold": "exact.gold"}


def _rows(seed, beta, golds, off):
    return [{"loss": "dpo", "beta": beta, "seed": seed, "epoch": e, "exact.gold": g, "off_support": o}
            for e, g, o in zip((1, 2, 4), golds, off)]


def _frame(held_out):
    rows = [{"loss": "pi_ref", "beta": None, "seed": None, "epoch": 0, "exact.gold": 0.4, "off_support": 0.02}]
    rows += _rows(0, 0.05, (0.5, 0.45, 0.3), (0.05, 0.1, 0.5))  # in-sample (seeds 0-3 at beta 0.05)
    for seed, golds in held_out.items():
        rows += _rows(seed, 0.05, golds, (0.05, 0.1, 0.5))
    return pd.DataFrame(rows)


def test_the_monitor_keeps_the_evaluation_before_its_alarm():
    """off_support 0.05, 0.1, 0.5 at epochs 1, 2, 4: the default rule (off_support > 0.086) fires first at epoch 2,
    so the monitor keeps epoch 1. Seed 4: gold 0.5, 0.45, 0.3 -> peak 0.5 at epoch 1, monitor regret 0, last-epoch
    regret 0.5 - 0.3 = 0.2. The fixed epoch is the in-sample run's best (epoch 1), regret 0 too."""
    runs = monitor_runs(_frame({4: (0.5, 0.45, 0.3)}), KEYS)
    assert list(runs[("dpo", 0.05, 4)]["step"]) == [0, 1, 2, 4]  # pi_ref first, at epoch 0
    per_run, stop = per_run_regrets(runs)
    assert stop == 1
    row = per_run[per_run["seed"] == 4].iloc[0]
    assert row["split"] == "held-out seeds" and row["monitor_epoch"] == 1
    assert row["monitor_regret"] == pytest.approx(0.0) and row["regret_last"] == pytest.approx(0.2)


def test_held_out_tests_are_one_sided_paired_t():
    """Three held-out seeds whose peak is at epoch 2 (after the alarm): monitor regrets g2 - g1 = 0.1, 0.05, 0.15;
    last-epoch regrets g2 - g4 = 0.3, 0.2, 0.4. The 'last' test is scipy's one-sided paired t of last - monitor."""
    golds = {4: (0.4, 0.5, 0.2), 5: (0.45, 0.5, 0.3), 6: (0.35, 0.5, 0.1)}
    lines = "\n".join(when_to_stop_lines(_frame(golds), KEYS))
    p = stats.ttest_rel([0.3, 0.2, 0.4], [0.1, 0.05, 0.15], alternative="greater").pvalue
    assert f"| dpo | 0.05 | held-out seeds | last epoch | 3 | 0.100 | 0.300 | {p:.2g} |" in lines
    assert assert_tables_well_formed(lines) == 2  # regret per group, then the tests


def test_no_off_support_column_no_section():
    df = _frame({}).drop(columns="off_support")
    assert when_to_stop_lines(df, KEYS) == []
