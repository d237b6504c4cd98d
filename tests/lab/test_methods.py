"""The method table (``chipo lab methods``): which point of a run is reported, the paired tests against DPO with
Holm's correction (hand-derived values), and the whole experiment at its quick size on the tiny lab world
(every method, one label budget, resumable, ``redo``)."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from chipo.config import ConfigError
from chipo.lab.methods import METHODS, MethodTableConfig, MethodTableSettings, run_method_table
from chipo.lab.methods_report import HEADLINE_RULE, comparisons, reported, select_points
from chipo.lab.runs import read_results
from chipo.lab.world import Language, World


def _offline_row(accs, golds, seed=0, method="dpo", beta=0.05) -> dict:
    points = [{"epoch": e, "implicit_acc": a, "gold": g, "win_rate_vs_ref": g, "kl_partition": 1.0, "kl_mc": 1.0,
               "mass_out_of_language": 0.0} for e, a, g in zip((1, 2, 4, 8), accs, golds)]
    return {"method": method, "family": "offline", "beta": beta, "seed": seed, "labels": 384, "points": points,
            "train_cpu_s": 1.0, "eval_cpu_s": 1.0}


def _final_row(method, gold, seed, beta=0.05, family="online") -> dict:
    return {"method": method, "family": family, "beta": beta, "seed": seed, "labels": 384, "train_cpu_s": 2.0,
            "eval_cpu_s": 1.0, "points": [{"gold": gold, "win_rate_vs_ref": gold, "kl_partition": None,
                                           "kl_mc": 0.5, "mass_out_of_language": 0.0}]}


def test_offline_points_are_the_last_epoch_and_the_best_held_out_accuracy_never_the_best_gold():
    """Accuracies 0.55, 0.60, 0.60, 0.58 at epochs 1, 2, 4, 8: the best held-out accuracy is tied at epochs 2 and
    4 and goes to the earlier one (2); gold peaks at epoch 4 (0.9) and must not decide anything."""
    row = _offline_row([0.55, 0.60, 0.60, 0.58], [0.5, 0.6, 0.9, 0.4])
    points = dict(select_points(row))
    assert points["last"]["epoch"] == 8 and points[HEADLINE_RULE]["epoch"] == 2
    assert [rule for rule, _ in select_points(_final_row("xpo", 0.5, 0))] == ["final"]


def test_a_paired_gap_below_holm_is_not_shown_and_one_above_is_named():
    """Golds by seed: DPO 0.5, 0.6, 0.7; XPO 0.6, 0.8, 0.8. Differences 0.1, 0.2, 0.1: mean 2/15 = 0.1333, sample sd
    sqrt(((-1/30)^2 + (2/30)^2 + (-1/30)^2) / 2) = sqrt(1/300) = 0.05774, s.e. 0.05774/sqrt(3) = 1/30, t = 4.0
    with 2 df: two-sided p = 2 * P(T_2 < -4) = 1 - 4/sqrt(18) = 0.0572 (the t_2 tail: P(T_2 > t) = (1 - t /
    sqrt(t^2 + 2)) / 2). One comparison: Holm's p is p, above 0.05: "not shown"."""
    rows = [_offline_row([0.6] * 4, [g] * 4, seed=s) for s, g in enumerate((0.5, 0.6, 0.7))]
    rows += [_final_row("xpo", g, s) for s, g in enumerate((0.6, 0.8, 0.8))]
    df = reported(rows)
    tests = comparisons(df)
    assert len(tests) == 1  # DPO's own two rules are the references, not comparisons
    t = tests.iloc[0]
    assert (t.method, t.dpo_rule, t.n) == ("xpo", HEADLINE_RULE, 3)
    assert t.gold_gap == pytest.approx(2 / 15) and t.gold_gap_se == pytest.approx(1 / 30)
    assert t.p == pytest.approx(1 - 4 / math.sqrt(18)) and t.p_holm == pytest.approx(t.p)
    assert t.verdict == "not shown"

    # Differences 0.2, 0.21, 0.19 (mean 0.2, s.e. 0.01/sqrt(3), t = 34.6): p = 1 - 34.64/sqrt(34.64^2 + 2) < 0.001.
    rows = rows[:3] + [_final_row("xpo", g, s) for s, g in enumerate((0.7, 0.81, 0.89))]
    t = comparisons(reported(rows)).iloc[0]
    assert t.verdict == "higher gold than DPO" and t.p < 0.001


def test_holm_runs_over_every_comparison_and_best_of_n_meets_dpo_at_each_beta():
    """Two betas: chiPO (2 rules) and online chiPO at each beta, plus best-of-n (no beta) against DPO at both:
    2 x 2 + 2 + 2 = 8 comparisons; Holm's smallest adjusted p is 8 x the smallest p."""
    rows = []
    for beta in (0.05, 0.005):
        for s in range(4):
            rows.append(_offline_row([0.6] * 4, [0.5 + 0.01 * s] * 4, seed=s, beta=beta))
            rows.append(_offline_row([0.6] * 4, [0.6 + 0.02 * s ** 2] * 4, seed=s, method="chipo", beta=beta))
            rows.append(_final_row("online-chipo", 0.4 + 0.03 * s, s, beta=beta))
    rows += [_final_row("bon", 0.55 + 0.01 * s * (s % 2), s, beta=None, family="inference") for s in range(4)]
    tests = comparisons(reported(rows))
    assert len(tests) == 8
    assert sorted(tests[tests.method == "bon"].dpo_beta) == [0.005, 0.05]
    smallest = tests.p.idxmin()
    assert tests.p_holm[smallest] == pytest.approx(min(1.0, 8 * tests.p[smallest]))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.floats(0, 1), st.floats(0, 1)), min_size=3, max_size=8))
def test_a_verdict_word_appears_exactly_when_the_holm_adjusted_test_passes(golds):
    rows = [_offline_row([0.6] * 4, [d] * 4, seed=s) for s, (d, _) in enumerate(golds)]
    rows += [_final_row("nash-md", g, s) for s, (_, g) in enumerate(golds)]
    t = comparisons(reported(rows)).iloc[0]
    passed = bool(t.p_holm <= 0.05)
    assert (t.verdict != "not shown") == passed
    if passed:
        assert t.verdict == ("higher gold than DPO" if t.gold_gap > 0 else "lower gold than DPO")


def test_settings_errors_are_one_line():
    with pytest.raises(ConfigError, match="unknown method"):
        MethodTableSettings(methods=("dpo", "ppo"))
    with pytest.raises(ConfigError, match="must include dpo"):
        MethodTableSettings(methods=("chipo",))
    with pytest.raises(ConfigError, match="redo: unknown"):
        MethodTableConfig(redo=["dpo2"])
    assert len(MethodTableSettings().cells()) == 8 * (2 * (len(METHODS) - 1) + 1)  # best-of-n once per seed


def _world(root) -> World:
    # The fixture has held-out prompts only; they serve as training prompts too (as in the RLHF tests).
    (root / "prompts_train.jsonl").write_text((root / "prompts_eval.jsonl").read_text())
    return World(root, Language.from_json(json.loads((root / "language.json").read_text())))


def test_every_method_on_the_tiny_world_same_labels_report_resume_and_redo(tiny_world, tmp_path):
    root = tmp_path / "world"
    shutil.copytree(tiny_world, root)
    world = _world(root)
    quick = MethodTableSettings.quick(seeds=2)
    quick = dataclasses.replace(quick, rlhf=dataclasses.replace(quick.rlhf, k=2, prompts_per_step=2, replicates=2,
                                                                eval_samples=2))
    out = tmp_path / "table"
    report = run_method_table(world, out, quick, workers=1, progress=False, echo=lambda *_: None)
    rows = read_results(out / "results.jsonl")
    assert sorted((r["method"], r["seed"]) for r in rows) == sorted((m, s) for m, _, s in quick.cells())
    n_train = sum(1 for line in open(world.train_prompts_path) if line.strip())
    assert {r["labels"] for r in rows} == {quick.pairs_per_prompt * n_train}  # one label budget for all
    for r in rows:
        p = r["points"][-1]
        assert 0 <= p["gold"] <= 1 and 0 <= p["mass_out_of_language"] <= 1 and math.isfinite(p["kl_mc"])
        assert r["train_cpu_s"] >= 0 and r["eval_cpu_s"] >= 0
        assert (p["kl_partition"] is None) == (r["family"] == "inference")
    offline = [r for r in rows if r["family"] == "offline"]
    assert all([p["epoch"] for p in r["points"]] == [1, 2] for r in offline)
    text = report.read_text()
    assert "gold - DPO" in text and "not shown" in text and (out / "gold_vs_sqrt_kl.png").stat().st_size > 0
    table = pd.read_csv(out / "table.csv")
    assert set(table.rule) == {"last", HEADLINE_RULE, "final"}

    # A rerun with the same settings runs nothing; redo runs exactly the named method again.
    run_method_table(world, out, quick, workers=1, progress=False, echo=lambda *_: None)
    assert read_results(out / "results.jsonl") == rows
    redo = ("nash-md", "chipo")
    run_method_table(world, out, quick, workers=1, progress=False, echo=lambda *_: None, redo=redo)
    again = read_results(out / "results.jsonl")
    assert [r for r in again if r["method"] not in redo] == [r for r in rows if r["method"] not in redo]
    assert sorted((r["method"], r["seed"]) for r in read_results(out / "results.superseded.jsonl")) == [
        ("chipo", 0), ("chipo", 1), ("nash-md", 0), ("nash-md", 1)]
    assert sorted((r["method"], r["seed"]) for r in again if r["method"] in redo) == [
        ("chipo", 0), ("chipo", 1), ("nash-md", 0), ("nash-md", 1)]
    # an offline method is trained again, not read back from the sweep's own rows
    assert all(r["train_cpu_s"] > 0 for r in again if r["method"] == "chipo")
    assert {r["method"] for r in read_results(out / "offline" / "results.superseded.jsonl")} == {"chipo"}
    assert np.isfinite([r["points"][-1]["gold"] for r in again]).all()

    # The directory protocol: a table with other data settings is refused before anything runs, and so is a
    # directory another process holds.
    import fcntl

    other = dataclasses.replace(quick, pairs_per_prompt=quick.pairs_per_prompt + 1)
    with pytest.raises(ConfigError, match="holds a method table with other settings"):
        run_method_table(world, out, other, workers=1, progress=False, echo=lambda *_: None)
    with open(out / ".lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(ConfigError, match="in use by another run"):
            run_method_table(world, out, quick, workers=1, progress=False, echo=lambda *_: None)
    assert read_results(out / "results.jsonl") == again
