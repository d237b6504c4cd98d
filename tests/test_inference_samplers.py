"""Best-of-n and inference-time pessimism on discrete candidate sets: exact laws vs the samplers' draws."""

import numpy as np
import pytest

from chipo.inference.samplers import (
    best_of_n_distribution,
    best_of_n_index,
    best_of_n_kl_bound,
    pessimism_distribution,
    pessimism_index,
    pessimism_normalizer,
    regularized_weights,
    samples_needed,
    select,
)

Q = np.array([0.4, 0.3, 0.2, 0.1])  # pi_ref over 4 responses
R = np.array([0.1, 0.5, 0.9, 0.3])  # proxy rewards


def _empirical(indices, size):
    return np.bincount(indices, minlength=size) / len(indices)


def _draw(rng, shape):
    return rng.choice(len(Q), size=shape, p=Q)


def test_best_of_n_law_matches_draws_and_formula():
    rng = np.random.default_rng(0)
    n, draws = 3, 200_000
    ys = _draw(rng, (draws, n))
    chosen = ys[np.arange(draws), best_of_n_index(R[ys])]
    exact = best_of_n_distribution(Q, R, n)
    # distinct rewards: P(y) = F(r)^n - F(r-)^n with F the CDF of r under pi_ref
    order = np.argsort(R)
    cdf = np.cumsum(Q[order])
    by_hand = np.empty(4)
    by_hand[order] = cdf ** n - np.concatenate([[0.0], cdf[:-1]]) ** n
    assert np.allclose(exact, by_hand, atol=1e-15) and exact.sum() == pytest.approx(1.0)
    assert np.abs(_empirical(chosen, 4) - exact).max() < 4e-3


def test_best_of_n_ties_split_by_reference_probability():
    rewards = np.array([1.0, 1.0, 0.0])
    q = np.array([0.2, 0.6, 0.2])
    law = best_of_n_distribution(q, rewards, 2)
    assert law[2] == pytest.approx(0.04)  # both draws must be the low one
    assert law[0] / law[1] == pytest.approx(1 / 3)


@pytest.mark.parametrize("n", [2, 4, 16])
def test_best_of_n_kl_approaches_log_n_minus_bound(n):
    """Distinct rewards on m equiprobable responses: KL(BoN || ref) <= log n - (n-1)/n, tight as m grows."""
    m = 20_000
    q = np.full(m, 1.0 / m)
    law = best_of_n_distribution(q, np.arange(m, dtype=float), n)
    kl = float(np.sum(np.where(law > 0, law * np.log(np.where(law > 0, law, 1) / q), 0.0)))
    assert kl <= best_of_n_kl_bound(n) + 1e-12
    assert kl == pytest.approx(best_of_n_kl_bound(n), abs=5e-3)
    coarse = best_of_n_distribution(np.full(4, 0.25), np.arange(4.0), n)
    assert float(np.sum(coarse * np.log(coarse / 0.25))) < best_of_n_kl_bound(n)  # strict for coarse sets


def test_normalizer_solves_the_constraint_for_each_divergence():
    rng = np.random.default_rng(1)
    rewards = rng.normal(size=(5, 7))
    for name in ("chi2", "kl", "chi2mix"):
        for beta in (0.05, 1.0):
            lam = pessimism_normalizer(rewards, beta, divergence=name)
            assert np.allclose(regularized_weights(rewards, lam, beta, name).mean(-1), 1.0, atol=1e-10)
    # chi2 equals the paper's relu form: mean relu((r - lam_p)/beta) = 1 with lam_p = lam - beta
    lam = pessimism_normalizer(rewards, 0.3)
    assert np.allclose(np.maximum((rewards - (lam - 0.3)[:, None]) / 0.3, 0).mean(-1), 1.0)
    # all rewards equal: every weight is 1
    assert np.allclose(regularized_weights(np.ones((1, 3)), pessimism_normalizer(np.ones((1, 3)), 0.5), 0.5), 1.0)


def test_pessimism_law_for_fixed_lambda_matches_draws():
    """With lambda fixed, the rejection step's output law is the closed form of ``pessimism_distribution``."""
    n, beta, r_max, draws = 3, 0.2, 1.0, 60_000
    lam = float(pessimism_normalizer(R, beta, probs=Q))
    rng = np.random.default_rng(2)
    ys = _draw(rng, (draws, 2 * n + 1))
    picks = np.array([pessimism_index(R[row], n, beta, rng, r_max=r_max, lam=lam)[0] for row in ys])
    chosen = ys[np.arange(draws), picks]
    exact = pessimism_distribution(Q, R, n, beta, r_max, lam=lam)
    assert exact.sum() == pytest.approx(1.0)
    assert np.abs(_empirical(chosen, 4) - exact).max() < 8e-3


def test_pessimism_converges_to_chi2_regularized_optimum():
    """Large n: the output law tends to pi_ref * w, the argmax of E_pi[r] - beta D_chi2(pi || pi_ref)."""
    beta, r_max = 0.2, 1.0
    lam = float(pessimism_normalizer(R, beta, probs=Q))
    target = Q * regularized_weights(R, lam, beta)
    assert target.sum() == pytest.approx(1.0)
    assert np.allclose(pessimism_distribution(Q, R, 200, beta, r_max), target, atol=1e-12)
    # the chi2 optimum: pi/pi_ref = max(0, 1 + (r - lambda')/beta), here with lambda' = lam
    assert np.allclose(target / Q, np.maximum(0.0, 1 + (R - lam) / beta))
    # and it is the maximiser: any small feasible perturbation lowers the regularised objective
    def objective(p):
        return p @ R - beta * 0.5 * np.sum(Q * (p / Q - 1) ** 2)
    # Perturbations that stay feasible by construction: mass moves only among responses in the optimum's
    # support, summing to zero, small enough to keep every probability non-negative.
    rng = np.random.default_rng(3)
    support = target > 1e-9
    assert support.sum() >= 2
    step = 0.5 * target[support].min()
    for _ in range(50):
        d = np.where(support, rng.normal(size=4), 0.0)
        d[support] -= d[support].mean()
        p = target + step * d / np.abs(d).max()
        assert (p >= 0).all() and p.sum() == pytest.approx(1.0)
        assert objective(p) < objective(target)
    # sampled lambda (step 1 of the algorithm) with many samples gives nearly the same law
    rng = np.random.default_rng(4)
    draws, n = 3000, 300
    ys = _draw(rng, (draws, 2 * n + 1))
    lams = pessimism_normalizer(R[ys[:, :n]], beta)  # step 1, vectorised over prompts (what pessimism_index does)
    assert np.allclose(lams[:3], [pessimism_index(R[row], n, beta, rng, r_max=r_max)[1]["lambda"] for row in ys[:3]])
    chosen = [row[pessimism_index(R[row], n, beta, rng, r_max=r_max, lam=lam)[0]] for row, lam in zip(ys, lams)]
    assert np.abs(_empirical(np.array(chosen), 4) - target).max() < 0.03


def test_pessimism_does_not_collapse_as_n_grows_while_bon_does():
    beta, r_max = 0.5, 1.0
    bon = best_of_n_distribution(Q, R, 1000)
    pes = pessimism_distribution(Q, R, 1000, beta, r_max)
    assert bon[2] > 0.999  # BoN: all mass on the proxy's argmax
    assert pes.max() < 0.7 and (pes / Q).max() <= 1 + r_max / beta + 1e-9  # bounded density ratio


def test_select_uses_a_shared_pool_and_validates():
    rewards = np.array([[0.1, 0.9, 0.5, 0.2, 0.3], [0.7, 0.1, 0.2, 0.9, 0.0]])
    assert select("plain", rewards, 4)[0].tolist() == [0, 0]
    assert select("bon", rewards, 2)[0].tolist() == [1, 0]
    chosen, info = select("pessimism", rewards, 2, beta=0.1, rng=np.random.default_rng(0))
    assert all(2 <= c <= 4 for c in chosen) and len(info) == 2 and "lambda" in info[0]
    assert samples_needed("pessimism", 3) == 7
    with pytest.raises(ValueError, match="needs rewards"):
        select("pessimism", rewards, 3)
    with pytest.raises(ValueError, match="mode must be"):
        samples_needed("greedy", 2)
