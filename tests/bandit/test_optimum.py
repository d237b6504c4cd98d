"""regularized_optimum against independent computations: KKT conditions, brute force, closed forms."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.optimize
from hypothesis import given, settings
from hypothesis import strategies as st

from chipo.bandit.instances import random_instance
from chipo.bandit.optimum import regularized_optimum

DIVS = ("kl", "chi2", "chi2mix")


def _fprime(div: str, z: np.ndarray) -> np.ndarray:
    """f'(z) written out independently of chipo.divergences (numpy, z > 0)."""
    return {"kl": np.log(z), "chi2": z - 1.0, "chi2mix": z + np.log(z)}[div]


def _objective(div: str, pi: np.ndarray, ref: np.ndarray, r: np.ndarray, beta: float) -> float:
    """sum pi r - beta sum ref f(pi/ref), with f written out independently (0 log 0 = 0)."""
    z = pi / ref
    zlogz = np.where(z > 0, z * np.log(np.where(z > 0, z, 1.0)), 0.0)
    f = {"kl": zlogz - z + 1.0, "chi2": 0.5 * (z - 1.0) ** 2, "chi2mix": 0.5 * (z - 1.0) ** 2 + zlogz}[div]
    return float(pi @ r - beta * ref @ f)


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("beta", [10.0, 0.3, 0.01])
def test_first_order_conditions(div: str, beta: float) -> None:
    """KKT of max <pi, r> - beta D_f: on the support r - beta f'(pi/pi_ref) equals one constant lambda(x)
    (to 1e-9); off the support (chi2 only) r - lambda <= beta * f'(0+) = -beta; rows sum to one."""
    inst = random_instance(50, 40, concentration=0.3, seed=3)
    pi, lam = regularized_optimum(inst.pi_ref, inst.reward, beta, div, return_normalizer=True)
    assert np.abs(pi.sum(1) - 1.0).max() < 1e-12
    support = pi > 0
    z = np.where(support, pi / inst.pi_ref, 1.0)
    stationarity = np.where(support, inst.reward - beta * _fprime(div, z) - lam[:, None], 0.0)
    # Relative to the scale of the terms: beta f'(z) reaches ~700 * beta for KL's smallest ratios.
    scale = 1.0 + np.abs(inst.reward) + np.abs(beta * _fprime(div, z))
    assert np.abs(stationarity / scale).max() < 1e-9
    if div == "chi2":
        assert np.all(inst.reward[~support] - lam[:, None].repeat(40, 1)[~support] <= -beta + 1e-9)
    else:
        assert support.all()


def _chi2_by_sorting(ref: np.ndarray, r: np.ndarray, beta: float) -> np.ndarray:
    """Exact chi2 optimum of one context by enumerating supports (actions sorted by reward): for the top-k set S,
    lambda_S = (sum_S ref (beta + r) - beta) / sum_S ref; the answer is the k whose lambda leaves exactly S
    positive. Independent of the root-find."""
    order = np.argsort(-r)
    for k in range(1, r.size + 1):
        s = order[:k]
        lam = ((ref[s] * (beta + r[s])).sum() - beta) / ref[s].sum()
        z = np.maximum(0.0, 1.0 + (r - lam) / beta)
        if np.all(z[s] > 0) and np.all(z[order[k:]] == 0):
            return ref * z
    raise AssertionError("no support found")


@pytest.mark.parametrize("beta", [2.0, 0.2, 0.02, 0.002])
def test_chi2_matches_support_enumeration(beta: float) -> None:
    inst = random_instance(20, 15, concentration=0.5, seed=11)
    pi = regularized_optimum(inst.pi_ref, inst.reward, beta, "chi2")
    expected = np.stack([_chi2_by_sorting(inst.pi_ref[x], inst.reward[x], beta) for x in range(20)])
    np.testing.assert_allclose(pi, expected, atol=1e-12)


def test_kl_is_the_exponential_tilt_and_root_find_agrees() -> None:
    inst = random_instance(30, 25, concentration=1.0, seed=5)
    beta = 0.05
    tilt = inst.pi_ref * np.exp((inst.reward - inst.reward.max(1, keepdims=True)) / beta)
    tilt /= tilt.sum(1, keepdims=True)
    np.testing.assert_allclose(regularized_optimum(inst.pi_ref, inst.reward, beta, "kl"), tilt, rtol=1e-12)
    root = regularized_optimum(inst.pi_ref, inst.reward, beta, "kl", closed_form_kl=False)
    np.testing.assert_allclose(root, tilt, rtol=1e-9, atol=1e-15)


@pytest.mark.parametrize("div", DIVS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_brute_force_on_tiny_instances(div: str, seed: int) -> None:
    """Against scipy SLSQP over the simplex (3 actions) and a fine grid (2 actions)."""
    rng = np.random.default_rng(seed)
    ref3, r3 = rng.dirichlet(np.ones(3)), rng.uniform(0, 1, 3)
    beta = float(rng.choice([0.05, 0.3, 1.0]))
    pi = regularized_optimum(ref3, r3, beta, div)
    best = None
    for start in (ref3, np.full(3, 1 / 3), np.eye(3)[np.argmax(r3)] * 0.98 + 0.01):
        res = scipy.optimize.minimize(lambda p: -_objective(div, np.maximum(p, 1e-300), ref3, r3, beta), start,
                                      method="SLSQP", bounds=[(0, 1)] * 3,
                                      constraints=[{"type": "eq", "fun": lambda p: p.sum() - 1}],
                                      options={"ftol": 1e-15, "maxiter": 1000})
        if best is None or res.fun < best.fun:
            best = res
    assert _objective(div, pi, ref3, r3, beta) >= -best.fun - 1e-10
    np.testing.assert_allclose(pi, best.x, atol=2e-4)
    # Two actions: grid of 2e5 points on the simplex edge.
    ref2, r2 = np.array([0.8, 0.2]), np.array([0.1, 0.9])
    grid = np.linspace(0, 1, 200_001)
    vals = [_objective(div, np.array([1 - t, t]), ref2, r2, beta) for t in grid[1:-1:50]]
    t_best = grid[1:-1:50][int(np.argmax(vals))]
    assert abs(regularized_optimum(ref2, r2, beta, div)[1] - t_best) < 1e-3


@settings(max_examples=25, deadline=None)
@given(st.sampled_from(DIVS), st.floats(1e-3, 10.0), st.integers(0, 10_000), st.floats(0.05, 3.0))
def test_optimum_beats_perturbations(div: str, beta: float, seed: int, alpha: float) -> None:
    """Optimality property: no feasible perturbation along the simplex improves the objective."""
    inst = random_instance(1, 6, concentration=alpha, seed=seed)
    ref, r = inst.pi_ref[0], inst.reward[0]
    pi = regularized_optimum(ref, r, beta, div)
    best = _objective(div, pi, ref, r, beta)
    rng = np.random.default_rng(seed)
    for _ in range(20):
        other = 0.9 * pi + 0.1 * rng.dirichlet(np.ones(6))
        assert _objective(div, other, ref, r, beta) <= best + 1e-9 * (1 + abs(best))


def test_chi2mix_huge_ratios_and_extreme_beta() -> None:
    """Large u = (r - lambda)/beta (beta = 1e-4) must not overflow; tiny pi_ref must not produce NaN."""
    ref = np.array([1e-12, 0.5, 0.5 - 1e-12])
    r = np.array([1.0, 0.0, 0.5])
    for div in DIVS:
        pi = regularized_optimum(ref, r, 1e-4, div)
        assert np.all(np.isfinite(pi)) and abs(pi.sum() - 1) < 1e-12
    # chi2mix density ratio is at most ~1 + R/beta (bounded chi2mix density ratio): mass on the 1e-12 action stays tiny.
    assert regularized_optimum(ref, r, 1e-4, "chi2mix")[0] < 1e-12 * (1 + 1.0 / 1e-4) * 1.01


def test_bad_beta_raises() -> None:
    with pytest.raises(ValueError):
        regularized_optimum(np.ones((1, 2)) / 2, np.zeros((1, 2)), 0.0, "kl")
