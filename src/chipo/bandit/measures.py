"""Exact measures of tabular policies: value, regret, divergences to pi_ref, concentrability, the chi-squared
change-of-measure bound.

Policies are arrays pi[X, Y] (rows sum to one); every expectation over contexts uses the instance's rho[X].
Conventions follow Huang et al. 2024 (chiPO, arXiv 2407.13399):

* J(pi) = E_{x ~ rho, y ~ pi(.|x)}[r*(x, y)];   J* = E_x max_y r*(x, y) (the unregularised optimum pi*).
* KL(pi || pi_ref) = E_x sum_y pi log(pi / pi_ref)  (0 log 0 = 0).
* D_chi2(pi || pi_ref) = 1/2 E_x E_{pi_ref}[(pi/pi_ref - 1)^2] = 1/2 (E_x sum_y pi^2 / pi_ref - 1).
* C^pi = 1 + 2 D_chi2(pi || pi_ref) = E_x E_pi[pi / pi_ref] (single-policy chi-squared concentrability).
* Change-of-measure bound (Cauchy-Schwarz; the step behind the chi-squared analysis of arXiv 2407.13399):
  |E_pi[r* - r_hat]| <= sqrt(2 D_chi2(pi || pi_ref) + 1) * eps_stat, eps_stat^2 = E_x E_{pi_ref}[(r* - r_hat)^2].
"""

from __future__ import annotations

import numpy as np

from chipo.bandit.instances import Instance
from chipo.bandit.optimum import regularized_optimum


def value(inst: Instance, pi: np.ndarray) -> float:
    """J(pi) = E_x sum_y pi(y|x) r*(x, y)."""
    return float(inst.context_probs @ (pi * inst.reward).sum(1))


def optimal_value(inst: Instance) -> float:
    """J* = E_x max_y r*(x, y), the value of the greedy policy pi*."""
    return float(inst.context_probs @ inst.reward.max(1))


def optimal_policy(inst: Instance) -> np.ndarray:
    """pi* [X, Y]: a point mass on argmax_y r*(x, y) (first maximiser on ties)."""
    pi = np.zeros_like(inst.reward)
    pi[np.arange(inst.n_contexts), inst.reward.argmax(1)] = 1.0
    return pi


def regret(inst: Instance, pi: np.ndarray) -> float:
    """J* - J(pi) >= 0."""
    return optimal_value(inst) - value(inst, pi)


def kl_to_ref(inst: Instance, pi: np.ndarray) -> float:
    """Exact KL(pi || pi_ref), averaged over rho."""
    safe = np.where(pi > 0, pi, 1.0)
    per_x = np.where(pi > 0, pi * (np.log(safe) - np.log(inst.pi_ref)), 0.0).sum(1)
    return float(inst.context_probs @ per_x)


def chi2_to_ref(inst: Instance, pi: np.ndarray) -> float:
    """Exact D_chi2(pi || pi_ref) = 1/2 (E_x sum_y pi^2 / pi_ref - 1) (the paper's 1/2 convention)."""
    return float(0.5 * (inst.context_probs @ (pi**2 / inst.pi_ref).sum(1) - 1.0))


def concentrability(inst: Instance, pi: np.ndarray) -> float:
    """C^pi = 1 + 2 D_chi2(pi || pi_ref)."""
    return 1.0 + 2.0 * chi2_to_ref(inst, pi)


def best_concentrable_policy(inst: Instance, c_max: float, *, tol: float = 1e-10) -> tuple[np.ndarray, float]:
    """argmax_pi J(pi) subject to C^pi <= c_max, and its value.

    The constraint averages over x, so the Lagrangian separates over contexts with one multiplier beta:
    the solution is the chi2-regularised optimum pi_beta (``regularized_optimum(..., "chi2")``), whose C is
    non-increasing in beta. If pi* already satisfies the constraint it is the answer; otherwise bisect on
    log beta until C^{pi_beta} = c_max to relative ``tol``.
    """
    if c_max < 1:
        raise ValueError("concentrability is at least 1 (C^{pi_ref} = 1)")
    star = optimal_policy(inst)
    if concentrability(inst, star) <= c_max:
        return star, value(inst, star)
    lo, hi = -30.0, 10.0  # log beta: tiny beta -> pi*-like (C too large); beta = e^10 -> pi_ref (C ~ 1)
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        pi = regularized_optimum(inst.pi_ref, inst.reward, float(np.exp(mid)), "chi2")
        if concentrability(inst, pi) > c_max:
            lo = mid
        else:
            hi = mid
        if hi - lo < tol:
            break
    pi = regularized_optimum(inst.pi_ref, inst.reward, float(np.exp(hi)), "chi2")
    return pi, value(inst, pi)


def eps_stat(inst: Instance, reward_hat: np.ndarray) -> float:
    """In-distribution reward error sqrt(E_x E_{pi_ref}[(r* - r_hat)^2])."""
    sq = (inst.pi_ref * (inst.reward - reward_hat) ** 2).sum(1)
    return float(np.sqrt(inst.context_probs @ sq))


def align_reward(inst: Instance, reward_hat: np.ndarray) -> np.ndarray:
    """Shift r_hat per context by E_{pi_ref}[r* - r_hat | x]: Bradley-Terry identifies rewards only up to such
    shifts, and this one minimises eps_stat (the bound holds for any shift; this makes it tightest)."""
    shift = (inst.pi_ref * (inst.reward - reward_hat)).sum(1, keepdims=True)
    return reward_hat + shift


def change_of_measure_bound(inst: Instance, pi: np.ndarray, reward_hat: np.ndarray) -> dict[str, float]:
    """Both sides of the change-of-measure bound for one policy: lhs = E_pi[r* - r_hat],
    rhs = sqrt(2 D_chi2 + 1) eps_stat.

    Returns lhs, |lhs|, rhs, slack = rhs - |lhs| (>= 0 by Cauchy-Schwarz), ratio = |lhs| / rhs, chi2 and eps.
    """
    lhs = float(inst.context_probs @ (pi * (inst.reward - reward_hat)).sum(1))
    chi2 = chi2_to_ref(inst, pi)
    eps = eps_stat(inst, reward_hat)
    rhs = float(np.sqrt(2.0 * chi2 + 1.0) * eps)
    return {"lhs": lhs, "abs_lhs": abs(lhs), "rhs": rhs, "slack": rhs - abs(lhs),
            "ratio": abs(lhs) / rhs if rhs > 0 else 0.0, "chi2": chi2, "eps_stat": eps}


def worst_case_policy(inst: Instance, reward_hat: np.ndarray) -> np.ndarray:
    """The policy that makes Cauchy-Schwarz tightest per context: pi proportional to pi_ref * (r* - r_hat - m)_+
    with m chosen at the context's minimum, i.e. the density ratio aligned with the reward error."""
    err = inst.reward - reward_hat
    w = inst.pi_ref * (err - err.min(1, keepdims=True))
    w = np.where(w.sum(1, keepdims=True) > 0, w, inst.pi_ref)
    return w / w.sum(1, keepdims=True)
