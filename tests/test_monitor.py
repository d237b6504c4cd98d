"""chipo.monitor: the gold-free signals against hand-derived values, the alarm rules, and the monitor on a tiny
model (at pi = pi_ref every signal sits at its reference value)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chipo.monitor import (
    AlarmRule,
    HeldoutPairs,
    MonitorSettings,
    OveroptimizationMonitor,
    check,
    chosen_index,
    displacement_signals,
    divergence_signals,
    first_alarm,
    judge_disagreement,
    off_support_rate,
    off_support_threshold,
    pair_signals,
    sample_signals,
)


def test_divergence_signals_by_hand():
    """L = (0, log 2): z = (1, 2).
    k1 = mean L = log(2)/2; k3 = mean(1/z - 1 + log z) = (0 + (1/2 - 1 + log 2))/2 = (log 2 - 1/2)/2;
    chi2 = mean((z - 2 + 1/z)/2) = (0 + (2 - 2 + 1/2)/2)/2 = 1/8; max L = log 2."""
    out = divergence_signals(torch.tensor([0.0, math.log(2.0)]))
    assert out["kl_k1"] == pytest.approx(math.log(2) / 2)
    assert out["kl_k3"] == pytest.approx((math.log(2) - 0.5) / 2)
    assert out["chi2"] == pytest.approx(0.125)
    assert out["log_ratio_max"] == pytest.approx(math.log(2))


def test_divergence_signals_finite_for_huge_ratios():
    """Sequence log-ratios of thousands of nats (text pi_ref never writes) give finite estimates (exp clamped)."""
    out = divergence_signals(torch.tensor([5000.0, -5000.0, 0.0], dtype=torch.float32))
    assert all(math.isfinite(v) for v in out.values())


def test_off_support_threshold_and_rate_by_hand():
    """Quantile 0.25 of (-4, -3, -2, -1) with linear interpolation: position 0.25 * 3 = 0.75 between -4 and -3
    -> -3.25. Policy log-probs under pi_ref (-10, -3.5, -3, -1): two of four lie below -3.25 -> rate 1/2."""
    t = off_support_threshold(torch.tensor([-1.0, -2.0, -3.0, -4.0]), quantile=0.25)
    assert t == pytest.approx(-3.25)
    assert off_support_rate(torch.tensor([-10.0, -3.5, -3.0, -1.0]), t) == 0.5
    # Text outside pi_ref's support (log-prob -inf) counts as off support.
    assert off_support_rate(torch.tensor([-math.inf, 0.0]), t) == 0.5
    with pytest.raises(ValueError, match="quantile"):
        off_support_threshold(torch.tensor([0.0]), quantile=1.0)


@settings(max_examples=50, deadline=None, derandomize=True)
@given(st.lists(st.floats(-50, 0, allow_nan=False), min_size=5, max_size=60),
       st.floats(0.01, 0.5))
def test_off_support_rate_of_pi_ref_itself_is_at_most_the_quantile(values, q):
    """Calibrated on pi_ref's samples, the same samples are off support at rate < q + 1/n: with h = q (n - 1), the
    interpolated quantile is at most the sorted sample x_(ceil h) (0-based), below which lie at most
    ceil(h) <= q (n - 1) + 1 < q n + 1 of the n samples."""
    x = torch.tensor(values, dtype=torch.float64)
    assert off_support_rate(x, off_support_threshold(x, q)) <= q + 1 / len(values) + 1e-12


def test_displacement_and_pair_signals_by_hand():
    """Log-ratios chosen (1, -3), rejected (-2, 0): displacement means -1 and -1. DPO margins beta (Lc - Lr) with
    beta 0.5: (1.5, -1.5) -> accuracy 1/2, mean margin 0; nothing clipped (DPO has no clip)."""
    zero = torch.zeros(2)
    pc, pr = torch.tensor([1.0, -3.0]), torch.tensor([-2.0, 0.0])
    assert displacement_signals(pc, pr, zero, zero) == {"chosen_logratio": -1.0, "rejected_logratio": -1.0}
    out = pair_signals(pc, pr, zero, zero, loss="dpo", beta=0.5)
    assert out == {"implicit_acc": 0.5, "margin": pytest.approx(0.0), "clip_rate": 0.0}
    # chiPO at beta 1 with r_max 0.1: margins (e + 1 - e^-2 + 2, ...) lie far past 2 r_max = 0.2 -> both clipped.
    assert pair_signals(pc, pr, zero, zero, loss="chipo", beta=1.0, loss_options={"r_max": 0.1})["clip_rate"] == 1.0
    # A tie (margin exactly 0) counts 1/2.
    assert pair_signals(zero, zero, zero, zero, loss="dpo", beta=0.1)["implicit_acc"] == 0.5


def test_sample_signals_by_hand():
    out = sample_signals(torch.tensor([-2.0, -4.0]), np.array([3, 5]), np.array([True, False]))
    assert out == {"length": 4.0, "finished": 0.5, "entropy": 3.0}


def test_judge_disagreement_by_hand():
    """Two judges on 3 samples of one prompt: pairs (0,1), (0,2), (1,2). Judge a orders 1 < 2 < 3, judge b
    3 > 1 < 2 ... b = (3, 1, 2): (0,1) a: < b: >  disagree; (0,2) a: < b: > disagree; (1,2) a: < b: < agree -> 2/3.
    Identical judges: 0; a reversed judge: 1; a judge that ties everything: no comparable pair -> NaN."""
    a = np.array([1.0, 2.0, 3.0])
    assert judge_disagreement(np.stack([a, a])) == 0.0
    assert judge_disagreement(np.stack([a, -a])) == 1.0
    assert judge_disagreement(np.stack([a, np.array([3.0, 1.0, 2.0])])) == pytest.approx(2 / 3)
    assert math.isnan(judge_disagreement(np.stack([a, np.zeros(3)])))
    # Samples of different prompts are never compared: two prompts of one sample each -> no pair.
    assert math.isnan(judge_disagreement(np.stack([a[:2], -a[:2]]), groups=np.array([0, 1])))
    with pytest.raises(ValueError, match="judges"):
        judge_disagreement(a[None, :])


def test_alarm_rules():
    rule = AlarmRule.parse("off_support>0.2")
    assert rule == AlarmRule("off_support", 0.2, True)
    assert AlarmRule.parse("chosen_logratio < -2") == AlarmRule("chosen_logratio", -2.0, False)
    with pytest.raises(ValueError, match="SIGNAL>NUMBER"):
        AlarmRule.parse("off_support=3")
    history = [{"off_support": 0.02}, {"off_support": 0.1}, {"off_support": 0.3}, {"off_support": 0.1}]
    assert first_alarm(history, [rule]) == 2
    assert chosen_index(history, [rule]) == 1  # the evaluation before the alarm
    assert chosen_index(history[:2], [rule]) == 1  # no alarm: the last
    assert chosen_index(history[2:], [rule]) == 0  # fires at once: the first
    assert check({"off_support": 0.3}, [rule]) == "off_support = 0.3 > 0.2"
    assert check({"off_support": float("nan")}, [rule]) is None
    assert check({}, [rule]) is None


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "model")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model").eval()
    return model, tokenizer


def _monitor(model, tokenizer, **kwargs):
    from chipo.toy import toy_preference_rows

    rows = toy_preference_rows(8, seed=3)
    return OveroptimizationMonitor.from_texts(
        tokenizer, sorted({r["prompt"] for r in rows})[:4], rows, ref_model=model,
        settings=MonitorSettings(num_samples=4, max_new_tokens=6, quantile=0.1), loss="dpo", beta=0.1, **kwargs)


def test_monitor_on_pi_ref_itself(tiny):
    """pi = pi_ref: every log-ratio is 0 (KL, chi2, displacement 0), accuracy 1/2 (ties), margin 0; the off-support
    rate is that of a fresh pi_ref sample against the calibration quantile (small, not 0)."""
    model, tokenizer = tiny
    out = _monitor(model, tokenizer).measure(model)
    for name in ("kl_k1", "kl_k3", "chi2", "log_ratio_max", "chosen_logratio", "rejected_logratio", "margin"):
        assert out[name] == pytest.approx(0.0, abs=1e-6), name
    assert out["implicit_acc"] == 0.5 and out["clip_rate"] == 0.0
    assert 0.0 <= out["off_support"] <= 0.5
    assert out["entropy"] > 0 and 0 < out["length"] <= 6


def test_monitor_sees_a_moved_policy_and_is_deterministic(tiny):
    """A policy whose LM head is scaled (sharper, different distributions) has positive KL; measuring twice gives the
    same numbers (same sampling seed each time: common random numbers across evaluations)."""
    import copy

    model, tokenizer = tiny
    policy = copy.deepcopy(model)
    with torch.no_grad():
        policy.lm_head.weight.mul_(8.0)
    monitor = _monitor(model, tokenizer)
    first, second = monitor.measure(policy), monitor.measure(policy)
    assert first == second
    assert first["kl_k3"] > 0.1 and first["chi2"] > 0
    # The pairs' pi_ref log-probs were computed once and kept.
    assert monitor.pairs.ref_chosen is not None and len(monitor.pairs) > 0


def test_monitor_needs_a_reference(tiny):
    model, tokenizer = tiny
    monitor = OveroptimizationMonitor(tokenizer, [[1, 2]], pairs=HeldoutPairs([], [], []))
    assert monitor.pairs is None  # empty pairs are no pairs
    with pytest.raises(ValueError, match="ref_model"):
        monitor.measure(model)
