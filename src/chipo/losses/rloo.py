"""RLOO policy-gradient losses for online RL regularised by an f-divergence (pure functions of log-probs).

Objective per prompt: J(theta) = E_{y ~ pi}[r(x, y)] - beta D_f(pi || pi_ref), D_f = E_{pi_ref}[f(z)],
z = pi(y|x) / pi_ref(y|x) over whole sequences. Since grad z = z grad log pi,
grad D_f = E_pi[f'(z) grad log pi], so grad J = E_pi[(r - beta f'(z)) grad log pi]: the regulariser is a
per-sample penalty beta f'(z) -- the same link as the direct preference losses (``FDivergence.link``).

RLOO (Kool et al. 2019; Ahmadian et al. 2024): k >= 2 samples per prompt, leave-one-out baseline
A_i = r~_i - mean_{j != i} r~_j, loss = -mean_i stopgrad(A_i) log pi(y_i); unbiased because y_i is independent
of the other samples (``tests/test_rl_estimator.py`` checks E[grad loss] = -grad J exactly on a tabular policy).

KL estimators (Schulman 2020), ``estimator``: ``k1`` puts beta log z in the reward (the f'-form, unbiased
gradient of the reverse KL); ``k3`` (GRPO, Shao et al. 2024) adds beta mean_i k3(L_i), k3 = (1/z - 1) + log z,
to the loss. k3's value estimates KL(pi || pi_ref) but its expected gradient is that of the *forward*
KL(pi_ref || pi): E_pi[(1 - 1/z) grad log pi] = -E_{pi_ref}[grad log pi]. Applied at the sequence level here.

z is formed from L = log pi - log pi_ref as exp(min(L, exp_clamp)), so sequence-level ratios never overflow.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from chipo.divergences import CHI2, EXP_CLAMP, KL, FDivergence, get_divergence

ESTIMATORS = ("k1", "k3")
"""KL estimators of ``rloo_loss``: k1 (f'-penalty in the reward, any divergence) and k3 (KL only, in the loss)."""

__all__ = ["ESTIMATORS", "exact_objective", "rl_penalty", "rloo_advantages", "rloo_loss"]


def rloo_advantages(values: Tensor) -> Tensor:
    """A_i = v_i - mean_{j != i} v_j over the last dim [P, k] (k >= 2): the leave-one-out baseline."""
    k = values.shape[-1]
    if k < 2:
        raise ValueError(f"RLOO needs at least 2 samples per prompt, got {k}")
    return values - (values.sum(-1, keepdim=True) - values) / (k - 1)


def rl_penalty(log_ratio: Tensor, beta: float, divergence: FDivergence, exp_clamp: float = EXP_CLAMP) -> Tensor:
    """beta * f'(z) at z = exp(log_ratio): the per-sample penalty of the D_f-regularised objective."""
    return beta * divergence.link(log_ratio, exp_clamp)


def rloo_loss(policy_logps: Tensor, ref_logps: Tensor, rewards: Tensor, *, beta: float,
              divergence: FDivergence | str, estimator: str = "k1",
              exp_clamp: float = EXP_CLAMP) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-prompt RLOO surrogate losses [P] for k samples per prompt, and per-prompt metrics.

    Args:
        policy_logps: [P, k] log pi(y_i|x) of the sampled responses, differentiable w.r.t. the policy.
        ref_logps: [P, k] log pi_ref(y_i|x) (no gradient needed).
        rewards: [P, k] rewards r(x, y_i).
        beta: regularisation strength (>= 0).
        divergence: the regulariser (an ``FDivergence`` or its name: kl, chi2, chi2mix, ...).
        estimator: ``k1`` (penalty beta * f'(z) in the reward; any divergence) or ``k3`` (KL only: GRPO-style
            loss term, see the module docstring for its gradient).
        exp_clamp: largest exponent passed to exp() when forming z from the log-ratio.

    Returns:
        ``(losses [P], metrics)``: the mean over prompts of ``losses`` is the surrogate whose expected gradient is
        -grad J (k1); metrics are per-prompt means (``reward``, ``penalized_reward``, ``penalty``, ``kl_k1``,
        ``kl_k3``, ``chi2``) as [P] tensors, detached.
    """
    if isinstance(divergence, str):
        divergence = get_divergence(divergence)
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {estimator!r}")
    if estimator == "k3" and divergence.name != "kl":
        raise ValueError(f"estimator k3 is a KL estimator; regularizer {divergence.name!r} takes k1 (its f' penalty)")
    rewards = rewards.to(policy_logps.dtype)
    log_ratio = policy_logps.detach() - ref_logps.to(policy_logps.dtype)
    if estimator == "k1":
        penalty = rl_penalty(log_ratio, beta, divergence, exp_clamp)
        losses = -(rloo_advantages(rewards - penalty) * policy_logps).mean(-1)
    else:
        live_ratio = policy_logps - ref_logps.to(policy_logps.dtype)  # gradient flows through log pi here
        # k3(L) = KL.f(L) / z = (1/z - 1) + log z: the summand of KL.estimate_from_policy.
        k3 = KL.f(live_ratio, exp_clamp) * torch.exp(torch.clamp(-live_ratio, max=exp_clamp))
        losses = -(rloo_advantages(rewards) * policy_logps).mean(-1) + beta * k3.mean(-1)
        penalty = beta * k3.detach()
    weight = torch.exp(torch.clamp(-log_ratio, max=exp_clamp))  # 1/z: importance weight of the from-policy estimators
    metrics = {
        "reward": rewards.mean(-1).detach(),
        "penalized_reward": (rewards - penalty).mean(-1).detach(),
        "penalty": penalty.mean(-1).detach(),
        "kl_k1": log_ratio.mean(-1),
        "kl_k3": (KL.f(log_ratio, exp_clamp) * weight).mean(-1),  # per-prompt KL.estimate_from_policy
        "chi2": (CHI2.f(log_ratio, exp_clamp) * weight).mean(-1),  # per-prompt CHI2.estimate_from_policy
        "log_ratio_max": log_ratio.max(-1).values,
    }
    return losses, metrics


def exact_objective(logits: Tensor, ref_logps: Tensor, rewards: Tensor, beta: float,
                    divergence: FDivergence | str, exp_clamp: float = math.inf) -> Tensor:
    """J(theta) = sum_y pi r - beta sum_y pi_ref f(pi/pi_ref) for a tabular softmax policy (testing helper)."""
    if isinstance(divergence, str):
        divergence = get_divergence(divergence)
    logp = torch.log_softmax(logits, -1)
    return (logp.exp() * rewards).sum(-1) - beta * (ref_logps.exp() * divergence.f(logp - ref_logps, exp_clamp)).sum(-1)
