"""The online lab (``chipo.lab.online``) end to end on the tiny world at its quick size: online DPO / chiPO, XPO
and chi-squared XPO through ``chipo online`` with the scaled gold judge, exact evaluation at every label count,
the table's invariants, plots, resumption, and the scaled scorer itself."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest

from chipo.config import ConfigError
from chipo.lab.online import METHODS, OnlineLabSettings, offline_rows, run_online_lab, summarize
from chipo.lab.world import Language, World
from chipo.rewards import load_scorer


def _world(root) -> World:
    # The fixture has held-out prompts only; they serve as training prompts too (4 prompts).
    (root / "prompts_train.jsonl").write_text((root / "prompts_eval.jsonl").read_text())
    return World(root, Language.from_json(json.loads((root / "language.json").read_text())))


def test_scaled_world_scorer_is_scale_times_gold(tiny_world):
    """``world-scaled:5:DIR`` scores 5 r*(x, y): chipo online's BT label P = sigmoid(r_a - r_b) then equals the
    demo's sigmoid(5 (r*_a - r*_b)). r* of malformed text is 0 (chipo.lab.world), so 0 stays 0."""
    gold = load_scorer(f"world:{tiny_world}")
    scaled = load_scorer(f"world-scaled:5:{tiny_world}")
    language = Language.from_json(json.loads((tiny_world / "language.json").read_text()))
    prompts = [language.prompt_text(0, s) for s in range(2)] * len(language.response_space())
    responses = [r for r in language.response_space() for _ in range(2)] + ["not a response"]
    prompts.append(prompts[0])
    base = gold.score(prompts, responses)
    assert np.allclose(scaled.score(prompts, responses), 5.0 * base)
    assert base.max() > 0 and scaled.score(prompts[-1:], responses[-1:])[0] == 0.0
    with pytest.raises(ConfigError, match="world-scaled"):
        load_scorer(f"world-scaled:five:{tiny_world}")


def test_quick_online_lab_end_to_end(tiny_world, tmp_path):
    root = tmp_path / "world"
    shutil.copytree(tiny_world, root)
    world = _world(root)
    settings = OnlineLabSettings.quick()
    out = tmp_path / "online"
    # An offline table in the demo's format: drawn beside the online runs, flattened to offline-<loss> rows.
    offline = [{"loss": "pi_ref", "beta": None, "seed": None, "epoch": 0, "exact": {}},
               {"loss": "dpo", "beta": 0.05, "seed": 0, "epoch": 2,
                "exact": {"gold": 0.3, "win_rate_vs_ref": 0.4, "kl": 2.0, "sqrt_kl": 2 ** 0.5, "chi2": 9.0,
                          "mass_malformed": 0.2}}]
    messages = []
    rows = run_online_lab(world, out, settings, offline_results=offline, progress=False, echo=messages.append)

    # Budget: 2 pairs per prompt x 4 prompts = 8 labels = 2 steps of 4; evaluated at half and all of it.
    budget = settings.pairs_per_prompt * 4
    assert settings.eval_labels(4) == [4, 8]
    runs = [r for r in rows if r["method"] != "pi_ref"]
    assert {(r["method"], r["labels"]) for r in runs} == {(m, n) for m in METHODS for n in (4, 8)}
    assert len(runs) == len(METHODS) * 2 and len(messages) == len(METHODS)
    ref = [r for r in rows if r["method"] == "pi_ref"]
    assert len(ref) == 1 and ref[0]["labels"] == 0 and ref[0]["kl"] == pytest.approx(0.0, abs=1e-12)
    for r in rows:
        assert 0.0 <= r["gold"] <= 1.0 and 0.0 <= r["win_rate_vs_ref"] <= 1.0
        assert r["total_mass"] == pytest.approx(1.0, abs=1e-9)  # the partition covers every sequence
        assert r["kl"] >= -1e-12 and r["chi2"] >= -1e-12 and 0.0 <= r["mass_malformed"] <= 1.0
        assert r["labels"] <= budget
    for r in runs:
        # labels = steps x prompts per step, and the trainer's own log agrees on the step
        assert r["labels"] == r["step"] * settings.prompts_per_step
        assert math.isfinite(r["train_loss"]) and math.isfinite(r["train_kl"])
        assert (r["loss"], r["exploration"]) == (METHODS[r["method"]]["loss"], METHODS[r["method"]]["exploration"])
    # The trainer logged the labels it spent: the last line of every run's metrics is the budget.
    for m in METHODS:
        log = [json.loads(line) for line in (out / "runs" / f"{m}_beta0.05_seed0" / "metrics.jsonl").open()]
        assert log[-1]["labels"] == budget and [x["step"] for x in log] == [1, 2]
        assert not list((out / "runs" / f"{m}_beta0.05_seed0").glob("checkpoint-*"))  # removed after evaluation
    # Updates happened: each run's policy at the budget differs from pi_ref (KL > 0 over the partition).
    assert all(r["kl"] > 0 for r in runs)

    for name in ("online_gold_vs_sqrt_kl.png", "online_gold_vs_labels.png"):
        assert (out / name).stat().st_size > 0
    text = (out / "online_lab.md").read_text()
    assert "offline DPO" in text and "chi2-XPO" in text and "| pi_ref |" in text

    # A rerun skips every finished run: no training, the same rows.
    before = (out / "results.jsonl").read_text()
    messages.clear()
    again = run_online_lab(world, out, settings, progress=False, echo=messages.append)
    assert messages == [] and (out / "results.jsonl").read_text() == before and len(again) == len(rows)
    # Other settings in the same directory: one clear error, nothing overwritten.
    with pytest.raises(ConfigError, match="other settings"):
        run_online_lab(world, out, OnlineLabSettings.quick(seeds=2), progress=False)


@pytest.mark.slow
def test_a_run_cut_short_resumes_from_its_checkpoint_and_matches_an_uninterrupted_run(tiny_world, tmp_path):
    """A run stopped after its first checkpoint (trained to 4 labels only) is finished by the lab from that
    checkpoint; sampling and labels are functions of (seed, step, prompt) and the checkpoint holds the optimizer, so
    the resumed run's policy at 8 labels equals an uninterrupted run's."""
    from chipo.lab.online import _train, run_name

    root = tmp_path / "world"
    shutil.copytree(tiny_world, root)
    world = _world(root)
    settings = OnlineLabSettings(seeds=1, betas=(0.05,), methods=("online-chipo",), pairs_per_prompt=2,
                                 eval_fractions=(0.5, 1.0), prompts_per_step=4, max_eval_prompts=2)
    whole = run_online_lab(world, tmp_path / "whole", settings, progress=False, echo=lambda *_: None)
    cut = tmp_path / "cut"
    _train(world, cut / "runs" / run_name("online-chipo", 0.05, 0), "online-chipo", 0.05, 0, settings, [4])
    assert (cut / "runs" / run_name("online-chipo", 0.05, 0) / "checkpoint-1").is_dir()
    resumed = run_online_lab(world, cut, settings, progress=False, echo=lambda *_: None)
    log = (cut / "runs" / run_name("online-chipo", 0.05, 0) / "train.log").read_text()
    assert log.count('"step": 1,') == 1  # step 1 was not trained twice
    for labels in (4, 8):
        a = next(r for r in whole if r["labels"] == labels)
        b = next(r for r in resumed if r["labels"] == labels)
        assert b["gold"] == pytest.approx(a["gold"], abs=1e-6) and b["kl"] == pytest.approx(a["kl"], abs=1e-6)


def test_summary_means_and_offline_rows():
    """Two seeds with gold 0.2 and 0.4: mean 0.3, s.e. = std(ddof=1)/sqrt(2) = 0.1414/1.414 = 0.1."""
    base = {"method": "xpo", "beta": 0.05, "labels": 8, "win_rate_vs_ref": 0.5, "kl": 1.0, "sqrt_kl": 1.0,
            "chi2": 1.0, "mass_malformed": 0.0}
    table = summarize([{**base, "seed": 0, "gold": 0.2}, {**base, "seed": 1, "gold": 0.4}])
    assert len(table) == 1 and table[0]["gold"] == pytest.approx(0.3) and table[0]["gold_se"] == pytest.approx(0.1)
    demo = [{"loss": "chipo", "beta": 0.005, "seed": 1, "epoch": 4,
             "exact": {"gold": 0.5, "win_rate_vs_ref": 0.6, "kl": 1.0, "sqrt_kl": 1.0, "chi2": 2.0,
                       "mass_malformed": 0.1}}, {"loss": "pi_ref", "epoch": 0, "exact": {"gold": 0.4}}]
    flat = offline_rows(demo, 384)
    assert flat == [{"method": "offline-chipo", "beta": 0.005, "seed": 1, "labels": 384, "epoch": 4, "gold": 0.5,
                     "win_rate_vs_ref": 0.6, "kl": 1.0, "sqrt_kl": 1.0, "chi2": 2.0, "mass_malformed": 0.1}]
