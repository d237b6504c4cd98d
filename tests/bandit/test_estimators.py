"""Estimators on hand-solvable cases, policy-space vs reward-space agreement, and the chiPO loss vs chipo.losses."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch

from chipo.bandit.estimators import (
    compress_pairs,
    estimator_policy,
    fit_direct_policy,
    fit_reward,
    fit_rewards,
    policy_objective,
    reward_objective,
    sample_actions,
    sample_preferences,
)
from chipo.bandit.instances import Instance, random_instance
from chipo.losses import preference_loss


def _two_arm(pi_a: float = 0.3, r_max: float = 2.0) -> Instance:
    return Instance("two_arm", np.ones(1), np.array([[pi_a, 1 - pi_a]]), np.array([[1.0, 0.0]]), r_max)


def _data(wins_a: int, wins_b: int):
    chosen = np.array([0] * wins_a + [1] * wins_b)
    return compress_pairs(np.zeros(chosen.size, int), chosen, 1 - chosen, 2)


def _margin(reward: np.ndarray) -> float:
    return float(reward[0, 0] - reward[0, 1])


def test_dpo_two_arms_closed_form() -> None:
    """a beats b 6 times, b beats a twice. The BT likelihood 6 log s(D) + 2 log s(-D) peaks at s(D) = 6/8, i.e.
    D = log 3 (ridge 0). DPO's policy is the KL tilt of that reward: pi_a / pi_b = (pi_ref_a / pi_ref_b) 3^(1/beta).
    Both the reward-space path and the direct policy-space solve must give it."""
    inst, data, beta = _two_arm(), _data(6, 2), 0.7
    fit = fit_reward(inst, data, "dpo", ridge=0.0)
    assert abs(_margin(fit.params) - np.log(3.0)) < 1e-7
    odds = (0.3 / 0.7) * 3.0 ** (1 / beta)
    expected = np.array([[odds / (1 + odds), 1 / (1 + odds)]])
    np.testing.assert_allclose(estimator_policy(inst, {"dpo": fit}, "dpo", beta), expected, atol=1e-8)
    pi, res = fit_direct_policy(inst, data, beta, "dpo", ridge=0.0)
    np.testing.assert_allclose(pi, expected, atol=1e-7)
    assert res.grad_norm < 1e-6


def test_chipo_two_arms_solves_the_link_equation() -> None:
    """Same data, clip 2 R_max = 4 > log 3 inactive: chiPO's implicit-reward margin is log 3, so the policy solves
    beta (phi(z_a) - phi(z_b)) = log 3 with phi(z) = z + log z and pi_ref_a z_a + pi_ref_b z_b = 1 (brentq here)."""
    inst, data, beta = _two_arm(), _data(6, 2), 0.5
    phi = lambda z: z + np.log(z)  # noqa: E731
    z_b = lambda z_a: (1 - 0.3 * z_a) / 0.7  # noqa: E731
    z_a = scipy.optimize.brentq(lambda z: beta * (phi(z) - phi(z_b(z))) - np.log(3.0), 1.0, 1 / 0.3 - 1e-12,
                                xtol=1e-15)
    expected = np.array([[0.3 * z_a, 0.7 * z_b(z_a)]])
    fit = fit_reward(inst, data, "chipo", ridge=0.0)
    assert abs(_margin(fit.params) - np.log(3.0)) < 1e-7
    np.testing.assert_allclose(estimator_policy(inst, {"chipo": fit}, "chipo", beta), expected, atol=1e-8)
    pi, _ = fit_direct_policy(inst, data, beta, "chipo", ridge=0.0)
    np.testing.assert_allclose(pi, expected, atol=1e-6)


def test_chipo_clip_caps_the_margin_at_two_r_max() -> None:
    """a beats b 200 times, b beats a once, R_max = 1. Unclipped MLE margin log 200 = 5.3; chiPO's loss is flat
    past the clip 2 R_max = 2 and strictly decreasing before it, so with any positive ridge the margin is exactly 2.
    DPO (no clip) keeps log 200 up to the ridge's shrinkage."""
    inst, data = _two_arm(r_max=1.0), _data(200, 1)
    assert abs(_margin(fit_reward(inst, data, "chipo").params) - 2.0) < 1e-6
    assert abs(_margin(fit_reward(inst, data, "dpo").params) - np.log(200.0)) < 1e-3


def test_rlhf_box_mle_on_separable_data() -> None:
    """a always wins (5-0), box [0, R_max = 1]: the likelihood increases with the margin, so the MLE sits at the
    corners r_a = 1, r_b = 0; KL-RLHF is then the tilt pi_ref * e^{r/beta} / Z, chi2-RLHF the clipped linear form."""
    inst, data, beta = _two_arm(r_max=1.0), _data(5, 0), 0.25
    fits = fit_rewards(inst, data)
    np.testing.assert_allclose(fits["rlhf"].params, [[1.0, 0.0]], atol=1e-12)
    w = np.array([0.3 * np.exp(4.0), 0.7])
    np.testing.assert_allclose(estimator_policy(inst, fits, "kl_rlhf", beta), [w / w.sum()], atol=1e-12)
    # chi2 with both actions in the support would need 0.3 (1 + (1 - lam)/beta) + 0.7 (1 - lam/beta) = 1, i.e.
    # lam = 0.3, giving z_b = 1 - 0.3/0.25 < 0: so b leaves the support and pi = (1, 0).
    np.testing.assert_allclose(estimator_policy(inst, fits, "chi2_rlhf", beta), [[1.0, 0.0]], atol=1e-12)


@pytest.mark.parametrize("loss", ["dpo", "chipo"])
def test_policy_space_equals_reward_space(loss: str) -> None:
    """The direct (logit) solve and the reward-space path agree on random data (clip inactive: R_max = 50)."""
    inst = random_instance(2, 4, concentration=1.0, r_max=50.0, seed=4)
    inst = Instance("t", inst.context_probs, inst.pi_ref, inst.reward / 50.0, 50.0)
    data = sample_preferences(inst, 200, np.random.default_rng(1))
    fit = fit_reward(inst, data, loss)
    for beta in (0.2, 1.0):
        pi, _ = fit_direct_policy(inst, data, beta, loss)
        np.testing.assert_allclose(pi, estimator_policy(inst, {loss: fit}, loss, beta), atol=2e-6)


def test_chipo_loss_is_chipo_losses_and_matches_reward_objective() -> None:
    """policy_objective's data term is sum count * preference_loss("chipo"); check it (i) against an independent
    numpy formula -log sigmoid(clip(beta (phi(z+) - phi(z-)), +-2 R_max)) and (ii) against the reward-space
    objective at the implicit reward h = beta phi(pi / pi_ref), which must be identical (same ridge too)."""
    inst = random_instance(3, 5, concentration=0.7, r_max=0.5, seed=9)
    data = sample_preferences(inst, 300, np.random.default_rng(2))
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2.0, size=(3, 5))
    beta = 0.3
    log_pi = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    z = np.exp(log_pi) / inst.pi_ref
    phi = z + np.log(z)
    margin = beta * (phi[data.context, data.chosen] - phi[data.context, data.rejected])
    by_hand = np.log1p(np.exp(-np.clip(margin, -2 * inst.r_max, 2 * inst.r_max)))
    lp, ref = torch.tensor(log_pi), torch.log(torch.tensor(inst.pi_ref))
    c, yc, yr = (torch.as_tensor(a) for a in (data.context, data.chosen, data.rejected))
    lib, _ = preference_loss("chipo", lp[c, yc], lp[c, yr], ref[c, yc], ref[c, yr], beta=beta, r_max=inst.r_max)
    np.testing.assert_allclose(lib.numpy(), by_hand, rtol=1e-12)
    assert np.abs(margin).max() > 2 * inst.r_max  # the clip is exercised
    total = float(policy_objective(inst, data, torch.tensor(logits), beta, "chipo", ridge=0.0))
    assert abs(total - float((data.count * by_hand).sum())) < 1e-9
    h = torch.tensor(beta * phi)
    for ridge in (0.0, 1e-3):
        a = float(policy_objective(inst, data, torch.tensor(logits), beta, "chipo", ridge=ridge))
        b = float(reward_objective(data, h, "chipo", inst.r_max, ridge=ridge))
        assert abs(a - b) < 1e-9


def test_sampling_matches_pi_ref_and_bradley_terry() -> None:
    inst = random_instance(1, 3, concentration=2.0, seed=1)
    rng = np.random.default_rng(0)
    n = 200_000
    y = sample_actions(inst.pi_ref, np.zeros(n, int), rng)
    freq = np.bincount(y, minlength=3) / n
    assert np.abs(freq - inst.pi_ref[0]).max() < 4 * np.sqrt(0.25 / n)
    data = sample_preferences(inst, n, rng)
    wins = {(a, b): c for a, b, c in zip(data.chosen, data.rejected, data.count, strict=True)}
    p01 = wins.get((0, 1), 0) / (wins.get((0, 1), 0) + wins.get((1, 0), 0))
    expected = 1 / (1 + np.exp(-(inst.reward[0, 0] - inst.reward[0, 1])))
    assert abs(p01 - expected) < 0.02
    assert data.n_pairs == n and data.count.sum() < n  # y1 == y2 pairs are dropped
