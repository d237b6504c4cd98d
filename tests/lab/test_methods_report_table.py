"""The method table's markdown at one beta (``chipo.lab.methods_report.method_table``) on runs written by hand."""

import math

from chipo.lab.methods_report import comparisons, method_table, reported, summary
from markdown_checks import assert_tables_well_formed


def _dpo(gold: float, seed: int) -> dict:
    points = [{"epoch": e, "implicit_acc": 0.6, "gold": gold, "win_rate_vs_ref": gold, "kl_partition": 1.0,
               "kl_mc": 1.0, "mass_out_of_language": 0.0} for e in (1, 2)]
    return {"method": "dpo", "family": "offline", "beta": 0.05, "seed": seed, "labels": 384, "points": points,
            "train_cpu_s": 1.0, "eval_cpu_s": 1.0}


def _xpo(gold: float, seed: int) -> dict:
    return {"method": "xpo", "family": "online", "beta": 0.05, "seed": seed, "labels": 384, "train_cpu_s": 2.0,
            "eval_cpu_s": 1.0, "points": [{"gold": gold, "win_rate_vs_ref": gold, "kl_partition": None,
                                           "kl_mc": 0.5, "mass_out_of_language": 0.0}]}


def test_method_table_by_hand():
    """DPO golds 0.5, 0.6, 0.7 over seeds at both epochs: mean 0.6, sd 0.1, s.e. 0.1/sqrt(3) = 0.058; its 'last'
    rule (epoch 2) comes before 'held-out acc' (accuracy tied: the earlier epoch, 1), and DPO is the reference.
    XPO 0.6, 0.8, 0.8: mean 0.733, sd sqrt(1/75) = 0.1155, s.e. 0.067; no partition KL ('—'); paired gap to DPO
    at held-out acc 2/15 = +0.133 ± 1/30, p = 1 - 4/sqrt(18) = 0.057 (derived in test_methods.py): not shown.
    pi_ref's row first, its test cells empty."""
    rows = [_dpo(g, s) for s, g in enumerate((0.5, 0.6, 0.7))] + [_xpo(g, s) for s, g in enumerate((0.6, 0.8, 0.8))]
    df = reported(rows)
    tests = comparisons(df)
    assert math.isclose(tests.iloc[0].p_holm, 1 - 4 / math.sqrt(18))
    detectable = f"{tests.iloc[0].detectable_gap:.3f}"  # power arithmetic, tested in tests/test_stats_power.py
    table = method_table(summary(df), tests, 0.05, {"gold": 0.4, "win_rate_vs_ref": 0.5, "mass_malformed": 0.03})
    assert table.splitlines() == [
        "| method | reported point | gold J | win vs pi_ref % | KL partition | KL Monte Carlo | out of language % | "
        "labels | train CPU s | gold - DPO | p (Holm) | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
        "| pi_ref | (no training) | 0.400 | 50.0 | 0 | 0 | 3.0 | 0 | 0 |  |  |  |",
        "| DPO | last (epoch 2) | 0.600 ± 0.058 | 60.0 ± 5.8 | 1.00 ± 0.00 | 1.00 ± 0.00 | 0.0 ± 0.0 | 384 | 1.0 | "
        "(reference) |  |  |",
        "| DPO | held-out acc (epoch 1) | 0.600 ± 0.058 | 60.0 ± 5.8 | 1.00 ± 0.00 | 1.00 ± 0.00 | 0.0 ± 0.0 | 384 | "
        "1.0 | (reference) |  |  |",
        "| XPO | final | 0.733 ± 0.067 | 73.3 ± 6.7 | — | 0.50 ± 0.00 | 0.0 ± 0.0 | 384 | 2.0 | +0.133 ± 0.033 | "
        f"0.057 | not shown (detectable: {detectable}) |"]
    assert assert_tables_well_formed(table) == 1
