"""Measures: divergence identities, the change-of-measure bound (property test), the C-bounded comparator."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from chipo.bandit import measures as M
from chipo.bandit.instances import kl_trap_instance, random_instance
from chipo.bandit.optimum import regularized_optimum


def test_divergences_by_hand() -> None:
    """pi_ref = (1/2, 1/2), pi = (1, 0): KL = log 2, D_chi2 = 1/2 ((1/(1/2)) - 1) = 1/2, C = 2."""
    inst = random_instance(1, 2, seed=0)
    inst = type(inst)("h", np.ones(1), np.array([[0.5, 0.5]]), np.array([[1.0, 0.0]]), 1.0)
    pi = np.array([[1.0, 0.0]])
    assert abs(M.kl_to_ref(inst, pi) - np.log(2)) < 1e-15
    assert abs(M.chi2_to_ref(inst, pi) - 0.5) < 1e-15
    assert abs(M.concentrability(inst, pi) - 2.0) < 1e-15
    assert M.regret(inst, pi) == 0.0 and abs(M.regret(inst, inst.pi_ref) - 0.5) < 1e-15


@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10_000), st.integers(1, 4), st.integers(2, 12), st.floats(0.05, 5.0), st.floats(0.01, 3.0))
def test_change_of_measure_bound_and_kl_below_chi2(seed: int, nx: int, ny: int, alpha: float, noise: float) -> None:
    """|E_pi[r* - r_hat]| <= sqrt(2 D_chi2 + 1) eps_stat for arbitrary r_hat and pi (Cauchy-Schwarz), incl. the
    aligned worst-case policy; and KL <= log(1 + 2 D_chi2) (Jensen: KL = E_pi[log z] <= log E_pi[z]).

    Note: the shorthand KL <= D_chi2 holds for the full chi-squared E_ref[z^2] - 1 = 2 D_chi2 but not with the
    1/2 convention; see ``test_kl_can_exceed_half_convention_chi2``."""
    rng = np.random.default_rng(seed)
    inst = random_instance(nx, ny, concentration=alpha, seed=seed)
    r_hat = inst.reward + rng.normal(0, noise, inst.reward.shape)
    policies = [rng.dirichlet(np.full(ny, 0.2), size=nx), M.worst_case_policy(inst, r_hat), M.optimal_policy(inst),
                regularized_optimum(inst.pi_ref, r_hat, 0.05, "kl")]
    for pi in policies:
        b = M.change_of_measure_bound(inst, pi, r_hat)
        assert b["abs_lhs"] <= b["rhs"] * (1 + 1e-12) + 1e-15
        assert M.kl_to_ref(inst, pi) <= np.log1p(2 * M.chi2_to_ref(inst, pi)) + 1e-12


def test_kl_can_exceed_half_convention_chi2() -> None:
    """Counterexample to "KL <= D_chi2" under the 1/2 convention of arXiv 2407.13399: pi_ref = (0.6, 0.4),
    pi = (1, 0) gives KL = log(1/0.6) = 0.511 > D_chi2 = 1/2 (1/0.6 - 1) = 0.333 (but KL <= 2 D_chi2, the full
    chi-squared)."""
    inst = random_instance(1, 2, seed=0)
    inst = type(inst)("c", np.ones(1), np.array([[0.6, 0.4]]), np.array([[1.0, 0.0]]), 1.0)
    pi = np.array([[1.0, 0.0]])
    kl, chi2 = M.kl_to_ref(inst, pi), M.chi2_to_ref(inst, pi)  # log(1/0.6) = 0.511 vs 1/2 (1/0.6 - 1) = 0.333
    assert kl > chi2 and kl <= 2 * chi2


def test_bound_is_tight_for_aligned_policy_in_one_context() -> None:
    """With one context and r* - r_hat = c (pi/pi_ref - 1)-shaped error, Cauchy-Schwarz is an equality up to the
    mean shift: check the aligned policy gets ratio close to 1 when the error is itself a density ratio."""
    inst = random_instance(1, 5, concentration=1.0, seed=2)
    pi = np.array([[0.6, 0.1, 0.1, 0.1, 0.1]])
    err = pi / inst.pi_ref  # E_pi[err] = E_ref[(pi/ref)^2] = sqrt(E_ref[(pi/ref)^2]) * sqrt(E_ref[err^2])
    b = M.change_of_measure_bound(inst, pi, inst.reward - err)
    assert abs(b["ratio"] - 1.0) < 1e-12


def test_best_concentrable_policy() -> None:
    """The comparator meets its budget with equality and beats every policy within the budget.

    Feasible competitors by construction: for q any policy and pi = (1 - m) pi_ref + m q, pi / pi_ref - 1 =
    m (q / pi_ref - 1), so C^pi - 1 = E_ref[(pi/pi_ref - 1)^2] = m^2 (C^q - 1). Choosing m = sqrt((c - 1) / (C^q - 1))
    for a target c in [1, 2] gives C^pi = c <= 2 exactly, so every competitor is feasible and every assert runs."""
    inst = kl_trap_instance()
    pi_c, j_c = M.best_concentrable_policy(inst, 2.0)
    assert abs(M.concentrability(inst, pi_c) - 2.0) < 1e-6
    rng = np.random.default_rng(0)
    for _ in range(300):
        q = rng.dirichlet(np.full(inst.n_actions, 0.5))[None]
        target = rng.uniform(1.0, 2.0)
        m = min(1.0, float(np.sqrt((target - 1.0) / (M.concentrability(inst, q) - 1.0))))
        pi = (1 - m) * inst.pi_ref + m * q
        assert M.concentrability(inst, pi) <= 2.0 + 1e-9
        assert M.value(inst, pi) <= j_c + 1e-9
    star, j_star = M.best_concentrable_policy(inst, 1e6)
    assert j_star == M.optimal_value(inst)
