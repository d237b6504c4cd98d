"""Online DPO / XPO / chi-squared XPO: the objective by hand, against chipo.losses and the offline code, and its
minimiser against brute force on two actions."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
import torch

from chipo.bandit.estimators import compress_pairs, reward_objective
from chipo.bandit.instances import rare_best_instance
from chipo.bandit.online import OnlineData, link_policy, online_objective, run_online, solve_online
from chipo.bandit.optimum import regularized_optimum
from chipo.losses import preference_loss

LINKS = ("kl", "chi2mix")


def _two_action_data() -> tuple[np.ndarray, OnlineData]:
    data = OnlineData.empty(1, 2)
    data.wins[0, 0, 1], data.wins[0, 1, 0] = 3, 1
    data.ref_draws[0] = [2, 5]
    return np.array([[0.3, 0.7]]), data


@pytest.mark.parametrize("link", LINKS)
def test_objective_and_gradient_by_hand(link: str) -> None:
    """pi_ref = (0.3, 0.7), a beat b 3 times and lost once, pi_ref drew (a, b) = (2, 5) (m = 7); h = (1/2, 1/2),
    beta = 1/2, alpha = 0.2, ridge 0. Equal h gives pi = pi_ref for both links (z = 1) and margins 0, so each pair
    costs log 2 and has d softplus(-m)/dm = -1/2: the preference gradient is a: -3/2 + 1/2 = -1, b: +1. The bonus
    gradient is (alpha/beta)(M - m w) with w = pi_ref (KL: w = pi; chi2mix: w ~ pi / (1 + z) = pi / 2, normalised),
    i.e. 0.4 ((2, 5) - 7 (0.3, 0.7)) = (-0.04, 0.04). Values: lambda = beta log sum pi_ref e^{h/beta} = 1/2 for KL,
    so the bonus (alpha/beta)(sum M h - m lambda) = 0.4 (3.5 - 3.5) = 0; chi2mix: z = 1 needs (h - lambda)/beta =
    f'(1) = 1, lambda = 0, bonus 0.4 * 3.5 = 1.4."""
    ref, data = _two_action_data()
    value, grad = online_objective(np.array([[0.5, 0.5]]), data, ref, 0.5, 0.2, link, 1.0, ridge=0.0)
    np.testing.assert_allclose(grad, [[-1.04, 1.04]], atol=1e-12)
    assert abs(value - (4 * np.log(2) + (0.0 if link == "kl" else 1.4))) < 1e-12


@pytest.mark.parametrize("link", LINKS)
def test_gradient_matches_finite_differences(link: str) -> None:
    rng = np.random.default_rng(1)
    ref = rng.dirichlet(np.ones(5), size=2)
    data = OnlineData(rng.integers(0, 4, (2, 5, 5)).astype(float), rng.integers(0, 6, (2, 5)).astype(float))
    h = rng.uniform(0, 1, (2, 5))
    beta = 0.05 if link == "kl" else 0.01
    _, grad = online_objective(h, data, ref, beta, 0.3 * beta, link, 1.0)
    eps, num = 1e-6, np.zeros_like(h)
    for idx in np.ndindex(h.shape):
        e = np.zeros_like(h)
        e[idx] = eps
        num[idx] = (online_objective(h + e, data, ref, beta, 0.3 * beta, link, 1.0)[0]
                    - online_objective(h - e, data, ref, beta, 0.3 * beta, link, 1.0)[0]) / (2 * eps)
    np.testing.assert_allclose(grad, num, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("link", LINKS)
@pytest.mark.parametrize("beta", [1.0, 0.05, 0.002])
def test_link_policy_is_regularized_optimum(link: str, beta: float) -> None:
    """The numpy fast path equals chipo.bandit.optimum.regularized_optimum (h as the reward)."""
    rng = np.random.default_rng(2)
    ref = rng.dirichlet(np.full(8, 0.4), size=3)
    h = rng.uniform(0, 1, (3, 8))
    pi, _, w = link_policy(ref, h, beta, link)
    np.testing.assert_allclose(pi, regularized_optimum(ref, h, beta, link), atol=1e-12)
    np.testing.assert_allclose(w.sum(1), 1.0, atol=1e-12)


@pytest.mark.parametrize("link", LINKS)
def test_terms_match_chipo_losses_and_offline_objective(link: str) -> None:
    """At pi = link_policy(h): (i) the preference term equals sum count * preference_loss(dpo / chipo with clip
    2 R_max) of the policy's log-probs, and with the ridge it equals the offline reward objective (``rlhf``: BT
    loss + ridge towards R_max / 2); (ii) the bonus equals alpha sum_i phi(z(y~_i)), phi = log z (KL) or z + log z."""
    rng = np.random.default_rng(3)
    ref = rng.dirichlet(np.ones(6), size=1)
    wins = rng.integers(0, 5, (1, 6, 6)).astype(float)
    np.einsum("xaa->xa", wins)[:] = 0.0
    draws = rng.integers(0, 4, (1, 6)).astype(float)
    h, beta, alpha, r_max = rng.uniform(0, 1, (1, 6)), 0.1, 0.07, 1.0
    pi, _, _ = link_policy(ref, h, beta, link)
    x, a, b = np.nonzero(wins)
    counts = torch.tensor(wins[x, a, b])
    lp, lr = torch.log(torch.tensor(pi)), torch.log(torch.tensor(ref))
    preset, extra = ("dpo", {}) if link == "kl" else ("chipo", {"r_max": r_max})
    losses, _ = preference_loss(preset, lp[x, a], lp[x, b], lr[x, a], lr[x, b], beta=beta, **extra)
    data0 = OnlineData(wins, np.zeros_like(draws))
    pref, _ = online_objective(h, data0, ref, beta, 0.0, link, r_max, ridge=0.0)
    assert abs(pref - float((counts * losses).sum())) < 1e-9
    ctx = np.repeat(x, wins[x, a, b].astype(int))
    offline = compress_pairs(ctx, np.repeat(a, wins[x, a, b].astype(int)), np.repeat(b, wins[x, a, b].astype(int)), 6)
    with_ridge, _ = online_objective(h, data0, ref, beta, 0.0, link, r_max, ridge=1e-3)
    assert abs(with_ridge - float(reward_objective(offline, torch.tensor(h), "rlhf", r_max, ridge=1e-3))) < 1e-9
    z = pi / ref
    phi = np.log(z) if link == "kl" else z + np.log(z)
    full, _ = online_objective(h, OnlineData(wins, draws), ref, beta, alpha, link, r_max, ridge=0.0)
    assert abs(full - pref - alpha * float((draws * phi).sum())) < 1e-9


@pytest.mark.parametrize("link", LINKS)
@pytest.mark.parametrize("alpha_over_beta", [0.0, 0.5, 3.0])
def test_two_action_minimiser_matches_brute_force(link: str, alpha_over_beta: float) -> None:
    """On two actions F depends on h only through d = h_b - h_a, except the ridge, which for fixed d is smallest at
    the centred h = (R/2 - d/2, R/2 + d/2) (inside the box for |d| <= R). So min F = min over d in [-R, R] of a 1-D
    function: a grid of 801 points refined by bounded Brent. The solver's pi_b must match to 1e-6. Large
    alpha / beta makes F non-convex (the concave bonus dominates)."""
    ref, data = _two_action_data()
    beta = 0.05 if link == "kl" else 0.01
    alpha, r_max = alpha_over_beta * beta, 1.0

    def f(d: float) -> float:
        return online_objective(np.array([[0.5 - d / 2, 0.5 + d / 2]]), data, ref, beta, alpha, link, r_max)[0]

    grid = np.linspace(-1, 1, 801)
    vals = np.array([f(d) for d in grid])
    i = int(np.argmin(vals))
    res = scipy.optimize.minimize_scalar(f, bounds=(grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]),
                                         method="bounded", options={"xatol": 1e-12})
    d_star = res.x if res.fun <= vals[i] else grid[i]
    pi_brute = link_policy(ref, np.array([[0.5 - d_star / 2, 0.5 + d_star / 2]]), beta, link)[0]
    h, _ = solve_online(data, ref, beta, alpha, link, r_max, [np.full((1, 2), 0.5), np.array([[0.0, 1.0]])])
    pi = link_policy(ref, h, beta, link)[0]
    assert abs(pi[0, 1] - pi_brute[0, 1]) < 1e-6


def test_run_online_bookkeeping() -> None:
    """Online DPO never uses pi_ref's samples; XPO records one per round; regret starts at pi_ref's and stays in
    [0, R_max]; one pair per round is counted unless its two actions coincide."""
    inst = rare_best_instance(n_actions=5, best_prob=0.05)
    dpo = run_online(inst, "online_dpo", 15, 0.05, 0.03, np.random.default_rng(0))
    xpo = run_online(inst, "xpo", 15, 0.05, 0.03, np.random.default_rng(0))
    j_ref = float((inst.pi_ref * inst.reward).sum())
    for run in (dpo, xpo):
        assert run.regret.shape == (16,) and abs(run.regret[0] - (1.0 - j_ref)) < 1e-12
        assert np.all((run.regret >= -1e-12) & (run.regret <= 1.0))
        assert run.data.wins.sum() <= 15
    assert dpo.data.ref_draws.sum() == 0 and xpo.data.ref_draws.sum() == 15
