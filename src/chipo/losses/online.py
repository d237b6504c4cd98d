"""Loss pieces of online preference optimization: the XPO exploration bonus, the Nash-MD policy-gradient loss,
preference labels from scores, and the geometric mixture of two next-token distributions (pure functions).

**XPO** (Xie et al. 2024, "Exploratory Preference Optimization", arXiv 2405.21046, Algorithm 1). Each round draws
y ~ pi_t and y~ ~ pi_ref for a prompt x, labels the pair (y, y~) by the preference oracle, and minimises over pi::

    alpha * sum_i log pi(y~_i | x_i)  -  sum_{(x, y+, y-)} log sigmoid(beta log(pi(y+)/pi_ref(y+)) - beta log(...)).

The bonus enters the *minimised* loss with a plus sign (TRL's last XPOTrainer, ``trl/experimental/xpo``, adds
``alpha * logp(y~)`` to the DPO loss the same way): lowering pi's likelihood of pi_ref's own samples moves mass
to responses pi_ref rarely produces -- optimism. In expectation over y~ ~ pi_ref its gradient is
alpha E_ref[grad log pi] = -alpha grad KL(pi_ref || pi), so the bonus maximises alpha KL(pi_ref || pi)
(``tests/test_online_losses.py`` checks this exactly on a tabular policy). Where it comes from: with the implicit
reward r = beta log(pi/pi_ref) + beta log Z(x), the optimism gap J_beta(pi; r) - E_{pi_ref}[r] equals
beta KL(pi_ref || pi); the paper folds beta into alpha.

chipo's convention: ``xpo_bonus`` returns alpha * (log pi(y~) - log pi_ref(y~)) per prompt -- the same gradient as
alpha * log pi(y~) (log pi_ref(y~) is a constant), but 0 at pi = pi_ref, so the logged value is -alpha times a
Monte-Carlo estimate of KL(pi_ref || pi) rather than a large negative log-likelihood.

*chi-squared XPO*: the bonus composes with any preference loss, so ``loss=chipo exploration=xpo`` is chiPO's
chi-squared-regularised pairwise loss plus the KL-form bonus above. The same optimism argument with chiPO's
regulariser (f(z) = (z - 1)^2/2 + z log z, implicit reward beta f'(z) + lambda(x)) gives the gap
beta E_ref[(z - 1) f'(z) - f(z)] = beta (D_chi2(pi || pi_ref) + KL(pi_ref || pi)): the KL part is this bonus; the
chi-squared part, (E_pi[z] - 1) / 2, is *not* added: its gradient is E_pi[z grad log pi] (grad E_pi[z] =
grad sum_y pi^2 / pi_ref = 2 E_pi[z grad log pi], halved), so its sample gradient z grad log pi has a variance that
grows with E_pi[z^2], the heavy tail of pi/pi_ref that chiPO's regulariser exists to tame.

**The penalty on the policy's own samples** (``policy_penalty``). A pairwise loss regularises only through the
pairs it sees; online they are the policy's samples, and chiPO's two-sided margin clip gives a pair past
|margin| = 2 r_max exactly zero gradient, so a response the policy samples far more often than pi_ref (z ~ 1e15)
is never pushed back. chi-squared RLHF (``chipo rl regularizer=chi2mix``) holds because its penalty acts on exactly
those samples: grad D_f(pi || pi_ref) = E_pi[f'(z) grad log pi] (grad z = z grad log pi, so
grad sum_y pi_ref f(z) = sum_y pi f'(z) grad log pi), with f'(z) = z + log z for chiPO's f. ``policy_penalty``
adds that per-sample penalty, weight*beta stopgrad(f'(z) - f'(1)) log pi(y), to the online loss: f'(1) is a
constant baseline (E_pi[grad log pi] = 0), so its expected gradient is weight*beta grad D_f(pi || pi_ref); for
z >> 1 it lowers log pi(y) with weight*beta (z + log z - 1), for z < 1 it raises it. The baseline is per sample,
not leave-one-out: with a heavy-tailed f'(z), a leave-one-out baseline would push the prompt's *other* sample up
by the outlier's full penalty.
With ``bound`` R only the part of the implicit reward above R acts, relu(beta (f'(z) - f'(1)) - R): zero for every
sample inside the bounded-reward class that chiPO's clip at 2 R_max stands for, and a push-down on the samples
beyond it. chipo online's default for loss=chipo is weight 1 with R = r_max: over 10 seeds on the embedded world it
kept the out-of-language mass within 10 points of pi_ref's in 19 of 20 (beta, seed) cells, against 3 of 10 with the
paper's clip alone over seeds 0-4 (docs/online-lab), at more gold than the unbounded penalty.

**Nash-MD** (Munos et al. 2023, "Nash Learning from Human Feedback", arXiv 2312.00886). The regularised preference
game max_pi min_pi' P(pi > pi') - tau KL(pi || pi_ref) + tau KL(pi' || pi_ref) is solved by mirror descent
against the geometric mixture pi^m(y) ~ pi(y)^(1-m) pi_ref(y)^m. Its policy-gradient form (the paper's Nash-MD-PG;
TRL's last NashMDTrainer) takes one gradient step on theta -> P(pi_theta > pi^m) - beta D(pi_theta || pi_ref) with
the opponent pi^m held fixed. For y ~ pi, y' ~ pi^m and p = P(y > y' | x) from the judge::

    grad E_{y ~ pi, y' ~ pi^m}[P(y > y')] = E[(p - 1/2) grad log pi(y)]       (score function; E_pi[grad log pi]
                                                                               = 0, so 1/2 is a free baseline)
    grad D_f(pi || pi_ref)              = E_pi[f'(z(y)) grad log pi(y)]       (z = pi/pi_ref; ``chipo.losses.rloo``)
    loss(y, y') = -(p - 1/2) log pi(y) + beta * stopgrad(f'(z(y))) * log pi(y)

whose expected gradient is exactly -grad[P(pi > pi^m) - beta D_f(pi || pi_ref)] (tested by enumeration). KL
(f'(z) = log z) is Nash-MD. chipo uses the whole-sequence log-ratio, unbiased as in ``chipo rl`` (k1); TRL weights
each token's score by that token's log-ratio only, which drops the later tokens' terms.

*chi-squared Nash-MD* (``regularizer=chi2mix``): the per-sample penalty beta f'(z) = beta (z + log z), chiPO's
link, exactly as chipo rl penalises: the gradient identity above holds for every f. What does not carry over is the
*mixture*: pi^m is the proximal step of KL mirror descent (the maximiser of a KL-regularised objective is
geometric); a chi-squared proximal step has no closed-form token-level sampler, so the opponent stays geometric.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from chipo.divergences import CHI2, EXP_CLAMP, KL, FDivergence, get_divergence

LABEL_MODES = ("bt", "argmax")

__all__ = ["LABEL_MODES", "mixture_logits", "nash_md_loss", "policy_penalty", "preference_probability",
           "sample_labels", "xpo_bonus"]


def xpo_bonus(policy_logps: Tensor, ref_logps: Tensor, alpha: float) -> Tensor:
    """XPO's exploration term per prompt [B]: alpha * (log pi(y~) - log pi_ref(y~)) on samples y~ ~ pi_ref.

    Added to the minimised loss (module docstring): gradient alpha * grad log pi(y~), as Xie et al. 2024, Alg. 1.
    """
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0, got {alpha}")
    dtype = torch.float64 if policy_logps.dtype == torch.float64 else torch.float32
    return alpha * (policy_logps.to(dtype) - ref_logps.to(dtype))


def _on_policy_terms(policy_logps: Tensor, ref_logps: Tensor, beta: float, divergence: FDivergence | str
                     ) -> tuple[FDivergence, Tensor, Tensor]:
    """The divergence object, log pi (differentiable, fp32 or fp64) and the detached log-ratio log(pi/pi_ref) of
    the policy's own samples: what every score-function penalty beta f'(z) log pi(y) starts from."""
    if beta < 0:
        raise ValueError(f"beta must be >= 0, got {beta}")
    if isinstance(divergence, str):
        divergence = get_divergence(divergence)
    dtype = torch.float64 if policy_logps.dtype == torch.float64 else torch.float32
    logp = policy_logps.to(dtype)
    return divergence, logp, (logp - ref_logps.to(dtype)).detach()


def policy_penalty(policy_logps: Tensor, ref_logps: Tensor, *, beta: float, divergence: FDivergence | str,
                   bound: float | None = None, exp_clamp: float = EXP_CLAMP) -> Tensor:
    """Per-sample surrogate [...] whose expected gradient over y ~ pi is beta grad D_f(pi || pi_ref).

    beta stopgrad(f'(z) - f'(1)) log pi(y), z = pi(y|x)/pi_ref(y|x) (module docstring; the penalty is
    ``chipo rl``'s per-sample beta f'(z), centred so that it is 0 at pi = pi_ref). Inputs: log pi (differentiable)
    and log pi_ref of samples of the policy, any shape; f'(z) - f'(1) is formed overflow-free
    (``FDivergence.link_difference``).

    ``bound`` (R >= 0): the weight becomes relu(beta (f'(z) - f'(1)) - R), so only samples whose implicit reward
    beta (f'(z) - f'(1)) exceeds R -- outside the policy class of bounded implicit rewards that chiPO's clip at
    2 R_max stands for (Huang et al. 2024) -- are pushed down. Its expected gradient is exactly that of
    E_ref[Psi(z)], Psi(z) = int_1^z relu(beta (f'(t) - f'(1)) - R) dt (grad E_ref[Psi(z)] = E_pi[Psi'(z) grad log
    pi]): a convex barrier that is 0 while every implicit reward stays below R, so it leaves the pairwise loss's
    optimum alone where that optimum respects the bound.
    """
    divergence, logp, log_ratio = _on_policy_terms(policy_logps, ref_logps, beta, divergence)
    weight = beta * divergence.link_difference(log_ratio, torch.zeros_like(log_ratio), exp_clamp)
    if bound is not None:
        weight = torch.relu(weight - bound)
    return weight * logp


def preference_probability(scores_a: Tensor, scores_b: Tensor, mode: str) -> Tensor:
    """P(a > b) from scalar scores: ``bt`` sigmoid(r_a - r_b) (Bradley-Terry), ``argmax`` 1, 0 or 1/2 (tie)."""
    if mode not in LABEL_MODES:
        raise ValueError(f"label mode must be one of {', '.join(LABEL_MODES)}, got {mode!r}")
    diff = scores_a.double() - scores_b.double()
    if mode == "bt":
        return torch.sigmoid(diff)
    return (torch.sign(diff) + 1.0) / 2.0


def sample_labels(probability: Tensor, uniforms: Tensor) -> Tensor:
    """Bernoulli(P(a > b)) labels, 1.0 where a is preferred: ``uniforms < probability`` ([B] each, U[0, 1))."""
    return (uniforms.to(probability.dtype) < probability).to(probability.dtype)


def mixture_logits(policy_logits: Tensor, ref_logits: Tensor, mixture_coef: float) -> Tensor:
    """Log of the token-level geometric mixture pi^(1-m) pi_ref^m, normalised: log_softmax((1-m) lp + m lq).

    Computed from log-softmaxes in fp32 so neither model's logit offset matters; m = 0 is pi, m = 1 is pi_ref.
    """
    if not 0.0 <= mixture_coef <= 1.0:
        raise ValueError(f"mixture_coef must lie in [0, 1], got {mixture_coef}")
    lp = F.log_softmax(policy_logits.float(), -1)
    if mixture_coef == 0.0:
        return lp
    lq = F.log_softmax(ref_logits.float(), -1)
    return F.log_softmax((1.0 - mixture_coef) * lp + mixture_coef * lq, -1)


def nash_md_loss(policy_logps: Tensor, ref_logps: Tensor, probability: Tensor, *, beta: float,
                 divergence: FDivergence | str = "kl", exp_clamp: float = EXP_CLAMP
                 ) -> tuple[Tensor, dict[str, Tensor]]:
    """Nash-MD policy-gradient losses [B] for y ~ pi scored against y' ~ pi^m (module docstring).

    Args:
        policy_logps: [B] log pi(y|x) of the policy's samples, differentiable.
        ref_logps: [B] log pi_ref(y|x) of the same samples.
        probability: [B] P(y > y'|x) from the judge (1/2 gives no preference gradient).
        beta: regularisation strength (>= 0).
        divergence: the regulariser D_f (``kl`` is Nash-MD; ``chi2mix`` its chi-squared variant).

    Metrics (detached, [B]): ``loss/score`` (p - 1/2) log pi(y) as TRL logs it, ``loss/kl`` the penalty
    f'(z), ``rewards/probabilities`` p, ``logps/chosen`` log pi(y), ``kl`` / ``chi2`` (per-sample from-policy
    estimates: KL f(z)/z, i.e. the k3 estimator, and chi2 f(z)/z).
    """
    divergence, logp, log_ratio = _on_policy_terms(policy_logps, ref_logps, beta, divergence)
    advantage = probability.to(logp.dtype) - 0.5
    penalty = divergence.link(log_ratio, exp_clamp)
    losses = -advantage * logp + beta * penalty * logp
    weight = torch.exp(torch.clamp(-log_ratio, max=exp_clamp))  # 1/z: importance weight of the from-policy estimate
    metrics = {
        "loss/score": (advantage * logp).detach(),
        "loss/kl": penalty,
        "rewards/probabilities": probability.detach().to(logp.dtype),
        "logps/chosen": logp.detach(),
        "kl": KL.f(log_ratio, exp_clamp) * weight,
        "chi2": CHI2.f(log_ratio, exp_clamp) * weight,
    }
    return losses, metrics
