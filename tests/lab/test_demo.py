"""`chipo demo --quick` end to end: the real world, the real trainer, a report with plots and numbers.

The world (pi_ref's SFT) is cached under ``$CHIPO_CACHE`` or ``~/.cache/chipo/world`` like for any user, so the
first run on a machine also builds it (about half a minute of CPU); later runs reuse it.
"""

from __future__ import annotations

import json
import math

import pytest

from chipo.cli.lab import demo
from markdown_checks import assert_tables_well_formed


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo(["--quick", f"out={out}", "--no-progress"]) == 0
    report = out / "report"
    for name in ("report.md", "winrate_vs_epochs.png", "gold_vs_sqrt_kl.png", "divergence_vs_epochs.png",
                 "mechanism_beta0p05.png", "mechanism_beta0p005.png", "results.json", "results.csv"):
        assert (report / name).is_file() and (report / name).stat().st_size > 0, name
    text = (report / "report.md").read_text()
    for needle in ("Table 1", "chiPO vs DPO", "machine", "versions", "wall time", "seeds", "## Verdicts",
                   "The frontier at matched distance", "Where the probability goes", "## Claims fixed before the run",
                   "distance = Monte-Carlo KL (k3)", "final out of language %", "CPU time of all its processes"):
        assert needle in text, needle
    plan = json.loads((out / "plan.json").read_text())["claims"]
    claims = json.loads((report / "results.json").read_text())["claims"]
    assert len(plan) == len(claims) == 14 and all(f"{i}. {c}" in text for i, c in enumerate(plan, 1))
    rows = json.loads((report / "results.json").read_text())["rows"]
    cells = {(r["loss"], r["beta"]) for r in rows if r["loss"] != "pi_ref"}
    assert cells == {("dpo", 0.05), ("dpo", 0.005), ("chipo", 0.05), ("chipo", 0.005)}
    for r in rows:
        assert 0.0 <= r["win_rate_vs_ref"] <= 1.0 and math.isfinite(r["kl_k3"])
        assert 0.0 <= r["exact"]["win_rate_vs_ref"] <= 1.0
        assert r["exact"]["total_mass"] == pytest.approx(1.0, abs=1e-6)
        if r["loss"] != "pi_ref":  # where the mass goes on the training prompts: four parts summing to 1
            assert sum(r["mass"].values()) == pytest.approx(1.0, abs=1e-6) and 0 <= r["clip_frac"] <= 1
    ref = next(r for r in rows if r["loss"] == "pi_ref")
    assert ref["exact"]["win_rate_vs_ref"] == pytest.approx(0.5) and ref["exact"]["kl"] == pytest.approx(0.0)
    assert "Report:" in capsys.readouterr().out


def test_sweep_split_counts_each_training_call_once():
    """Rows are evaluated epochs; each carries its run's training time. Two runs (3 and 2 rows, 10 s and 4 s of
    training) and a resumed run whose second call (5 s) trained the later epochs: training = 10 + 4 + 2 + 5 = 21 s;
    the evaluation parts add up over all 7 rows (7 x 1 s of sampling, 7 x 0.5 s of exact metrics)."""
    from chipo.lab.offline import sweep_split

    def row(method, seed, train_seconds):
        return {"method": method, "beta": 0.1, "seed": seed, "train_seconds": train_seconds,
                "seconds": {"sampling": 1.0, "exact metrics": 0.5}}

    rows = [row("dpo", 0, 10.0)] * 3 + [row("chipo", 0, 4.0)] * 2 + [row("dpo", 1, 2.0), row("dpo", 1, 5.0)]
    assert sweep_split(rows) == "training 21 s, sampling 7 s, exact metrics 4 s"
    # Rows that carry the training call's CPU seconds count those (12 s of CPU in a 21 s wall call).
    cpu = [{**row("dpo", 0, 21.0), "train_cpu_seconds": 12.0}] * 2
    assert sweep_split(cpu) == "training 12 s, sampling 2 s, exact metrics 1 s"


def test_the_default_demo_shows_an_effect_the_size_of_dpos_measured_fall_with_80_percent_power():
    """The default demo's design (seeds, claims), checked without running it. An earlier 3-seed run measured
    DPO's fall at beta 0.005 as +25.5 points with one-sided p 0.014 on 2 df: t = 5.85, s.e. 4.36, s.d. of the
    per-seed falls 4.36 sqrt 3 = 7.55, an effect of 3.38 sd. At Holm's first level over the planned claims the
    default seeds must detect it with at least 80% power (one-sided, as the fall is tested), and the report's
    stated effect (verdicts.STATED_EFFECT_SD) with at least 80% even two-sided."""
    from scipy import stats as sps

    from chipo import stats
    from chipo.lab import verdicts
    from chipo.lab.offline import claim_plan_for
    from chipo.lab.protocol import DemoSettings
    from chipo.lab.sweep import SweepConfig

    settings = DemoSettings()
    assert settings.seeds >= 8
    t = float(sps.t.isf(0.014, 2))
    assert t == pytest.approx(5.85, abs=0.01)
    effect_sd = 25.5 / (25.5 / t * math.sqrt(3))
    config = SweepConfig(ref_model="pi_ref", train_prefs="train_seed{seed}.jsonl", eval_prompts="eval.jsonl",
                         out_dir="unused", losses=list(settings.losses), betas=list(settings.betas),
                         seeds=list(range(settings.seeds)), epochs=settings.epochs,
                         eval_epochs=list(settings.eval_epochs) if settings.eval_epochs else None)
    m = len(claim_plan_for(config))
    assert m == 14
    level = stats.holm_first_level(0.05, m)
    assert stats.t_power(effect_sd, settings.seeds, level, "greater") >= 0.8
    assert stats.t_power(verdicts.STATED_EFFECT_SD, settings.seeds, level, "two-sided") >= 0.8


@pytest.mark.slow
def test_quick_full_demo_composes_offline_rlhf_and_online_and_a_rerun_has_nothing_to_do(tmp_path, capsys):
    """``chipo demo --quick --full``: the experiments offline, rlhf and online, each at its quick() size, in sweep/,
    rlhf/, online/; one report, the offline page followed by the RLHF and online sections, each with its time."""
    out = tmp_path / "demo"
    assert demo(["--quick", "--full", f"out={out}", "--no-progress"]) == 0
    text = (out / "report" / "report.md").read_text()
    headings = ("## Result in the layout of the paper's Table 1", "## Standard RLHF, chi2-RLHF",
                "## Online preference optimization", "## Machine, versions, time")
    assert [text.index(h) for h in headings] == sorted(text.index(h) for h in headings)
    assert "Time of the rlhf experiment:" in text and "Time of the online experiment:" in text
    assert assert_tables_well_formed(text) >= 8  # the offline page's, RL over seeds, RL steps, best-of-n, online
    assert (out / "report" / "rlhf_gold_vs_sqrt_kl.png").is_file()
    assert "](../online/online_gold_vs_sqrt_kl.png)" in text
    assert (out / "online" / "online_gold_vs_sqrt_kl.png").is_file()
    for name, directory in (("offline", "sweep"), ("rlhf", "rlhf"), ("online", "online")):
        record = json.loads((out / directory / "timing.json").read_text())
        assert record["name"] == name and record["timing"]["cpu_s"] > 0
    rlhf = json.loads((out / "rlhf" / "rlhf.json").read_text())
    assert rlhf["settings"]["steps"] == 20  # RLHFSettings.quick()
    assert json.loads((out / "online" / "online_lab.json").read_text())["key"]["settings"]["seeds"] == 1

    capsys.readouterr()
    assert demo(["--quick", "--full", f"out={out}", "--no-progress"]) == 0  # the same command again
    assert capsys.readouterr().out.count("finished in") == 3  # offline, rlhf and online: nothing run again
    again = (out / "report" / "report.md").read_text()
    # Every section, its time lines included (the records of the runs that did the work), as the first time.
    assert again.split("## Machine, versions, time")[0] == text.split("## Machine, versions, time")[0]
