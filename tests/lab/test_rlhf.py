"""``chipo demo --full``'s RLHF part on the tiny lab world: reward model, RL with kl and chi2mix, best-of-n and
pessimism curves in a JSON file with finite numbers, the report section and plot, and resumption."""

from __future__ import annotations

import dataclasses
import json
import math
import shutil

import pytest

from chipo.config import ConfigError
from chipo.lab.report import write_rlhf_section
from chipo.lab.rlhf import RLHFSettings, run_rlhf
from chipo.lab.world import Language, World

SETTINGS = RLHFSettings(rm_pairs_per_prompt=4, rm_epochs=1.0, rm_batch_size=8, betas=(0.05,), steps=4, k=2,
                        prompts_per_step=2, eval_every=2, eval_samples=2, ns=(1, 2, 4), replicates=2,
                        max_new_tokens=4, rl_seeds=2)


def _world(root) -> World:
    # The fixture has held-out prompts only; they serve as training prompts too.
    (root / "prompts_train.jsonl").write_text((root / "prompts_eval.jsonl").read_text())
    return World(root, Language.from_json(json.loads((root / "language.json").read_text())))


def _finite(values) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


def test_rlhf_pipeline_writes_curves_report_and_resumes(tiny_world, tmp_path):
    root = tmp_path / "world"
    shutil.copytree(tiny_world, root)
    world = _world(root)
    out = tmp_path / "rlhf"
    messages = []
    path = run_rlhf(world, out, SETTINGS, echo=messages.append)
    results = json.loads(path.read_text())
    assert set(results["rl"]) == {"kl_beta0.05", "chi2mix_beta0.05", "kl_beta0.05_seed1", "chi2mix_beta0.05_seed1"}
    for run in results["rl"].values():
        assert run["done"] and [p["step"] for p in run["curve"]] == [0, 2, 4]
        for p in run["curve"]:
            assert _finite([p["gold"], p["proxy"], p["kl_k1"], p["kl_k3"], p["chi2"], p["kl_partition"]])
    methods = results["inference"]["methods"]
    assert set(methods) == {"bon", "pessimism_beta0.05", "pessimism_beta0.5"}
    for curve in methods.values():
        assert [p["n"] for p in curve] == [1, 2, 4]
        for p in curve:
            assert _finite([p["gold"], p["proxy"], p["kl"], p["gold_selected"]]) and p["kl"] >= -1e-9
    assert abs(methods["bon"][0]["kl"]) < 1e-9  # best-of-1 is pi_ref
    assert 0.0 <= results["reward_models"]["rm"]["acc_labels"] <= 1.0

    # The report section and plot: before the machine section, replaced (not duplicated) when rewritten.
    report = tmp_path / "report"
    report.mkdir()
    (report / "report.md").write_text("# report\n\n## Machine, versions, time\n\n- x\n")
    write_rlhf_section(report, results)
    write_rlhf_section(report, results)
    text = (report / "report.md").read_text()
    assert text.count("## Standard RLHF") == 1 and "What the curves show" in text and "RL over seeds" in text
    assert text.index("## Standard RLHF") < text.index("## Machine, versions, time")
    assert (report / "rlhf_gold_vs_sqrt_kl.png").stat().st_size > 0

    # A rerun skips every finished part: nothing is retrained, no file but rlhf.json and the directory's record
    # (experiment.json, rewritten under the lock) is touched.
    records = ("rlhf.json", "experiment.json")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name not in records}
    messages.clear()
    run_rlhf(world, out, SETTINGS, echo=messages.append)
    assert messages == []
    assert json.loads(path.read_text())["rl"] == results["rl"]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir() if p.name not in records} == before
    # Other settings in the same directory: one line naming the key, nothing rewritten (the directory protocol,
    # with or without chipo demo); it used to start the RLHF part afresh silently.
    saved = path.read_text()
    with pytest.raises(ConfigError, match="other settings.*steps"):
        run_rlhf(world, out, dataclasses.replace(SETTINGS, steps=6), echo=messages.append)
    assert path.read_text() == saved


def test_rl_seed_claims_are_paired_t_tests_with_holm():
    """Final gold per seed: kl (0.1, 0.2, 0.3), chi2mix (0.5, 0.5, 0.8): differences (0.4, 0.3, 0.5), mean 0.4, sd 0.1,
    se 0.1/sqrt(3), t = 6.93 on 2 df, two-sided p = 0.0202 (scipy.stats.ttest_rel); one beta, so Holm leaves it."""
    from scipy.stats import ttest_rel

    from chipo.lab.report_rlhf import rl_seed_claims, rl_seed_text

    kl, mix = [0.1, 0.2, 0.3], [0.5, 0.5, 0.8]
    rl = {}
    for seed in range(3):
        for reg, golds in (("kl", kl), ("chi2mix", mix)):
            rl[f"{reg}_beta0.05_seed{seed}"] = {"done": True, "regularizer": reg, "beta": 0.05, "seed": seed,
                                                "curve": [{"gold": 0.0}, {"gold": golds[seed]}]}
    (claim,) = rl_seed_claims({"rl": rl})
    assert claim["test"].estimate == pytest.approx(0.4)
    assert claim["test"].p == pytest.approx(ttest_rel(mix, kl).pvalue) and claim["p_holm"] == pytest.approx(0.0202,
                                                                                                            abs=1e-4)
    assert claim["passed"] and "significant" in "\n".join(rl_seed_text([claim]))
    rl["chi2mix_beta0.05_seed2"]["curve"][-1]["gold"] = 0.0  # differences (0.4, 0.3, -0.3): not shown
    (claim,) = rl_seed_claims({"rl": rl})
    assert not claim["passed"] and "not shown" in "\n".join(rl_seed_text([claim]))
