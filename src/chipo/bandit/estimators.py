"""Finite-sample preference-optimization estimators over tabular policies, solved to optimality.

Data (the offline setting of Huang et al. 2024, arXiv 2407.13399): n pairs, x ~ rho, y1, y2 ~ pi_ref(.|x) i.i.d.,
y1 preferred with probability sigmoid(r*(x, y1) - r*(x, y2)) (Bradley-Terry). Every loss here is a sum over pairs
of a function of one triple (x, y+, y-), so the data are stored compressed as unique triples with counts
(``PreferenceData``); pairs with y1 = y2 carry no information for any margin loss (margin 0) and are dropped.

Estimators (all over the *full* tabular class, so each is an exact optimisation problem):

* DPO (Rafailov et al. 2023): min_pi sum_i -log sigmoid(beta log(pi/pi_ref)(y+) - beta log(pi/pi_ref)(y-)),
  computed by ``chipo.losses.preference_loss("dpo", ...)``.
* chiPO (Huang et al. 2024, arXiv 2407.13399, Alg. 1): the same with link phi(z) = z + log z and the margin
  clipped to [-2 R_max, 2 R_max], computed by ``preference_loss("chipo", ..., r_max=R_max)``.
* KL-RLHF / chi2-RLHF: maximum-likelihood Bradley-Terry reward over the class [0, R_max]^{X x Y}, then
  ``regularized_optimum`` with KL / chi-squared.

Well-posedness. Over the full class the direct losses depend on pi only through the implicit reward
h = beta * f'(pi / pi_ref) *modulo a per-context constant*, the map pi -> h (mod constants) is a bijection
for links that cover the real line (log z, z + log z), and the losses have no finite minimiser on separable
data (a pair seen once drives its margin to +inf). We therefore add a small ridge (``RIDGE`` = 1e-4) on the
context-centred implicit reward, (ridge / 2) sum_x sum_y (h - mean_y h)^2. It makes the optimum unique and
finite, leaves unseen actions at the mean implicit reward, and stops a separable pair near a margin of
log(1 / ridge) ~ 9 nats -- far beyond any reward range used here, i.e. DPO keeps its tendency to drive
probabilities of losers towards zero. The reward MLE of the RLHF methods is box-constrained, and its ridge
pulls towards the box centre R_max / 2 (BT identifies rewards only up to a shift, so the box alone leaves
a flat direction).

Because the penalised direct objective depends on h only through its differences, the optimal differences do
not depend on beta: pi_DPO(beta) = regularized_optimum(kl, h_hat, beta) and
pi_chiPO(beta) = regularized_optimum(chi2mix, h_hat_clip, beta), where h_hat (h_hat_clip) minimises the
(clipped) logistic loss of reward margins plus the ridge. ``fit_reward`` computes those with the very same
``preference_loss`` presets, fed the rewards as log-ratios with the identity link (``link="kl"``, beta = 1,
so margin = r+ - r-). ``fit_direct_policy`` solves the policy-space problem directly (logits, softmax,
the presets' own links); the tests check the two agree, and the experiments use the (much faster)
reward-space path for whole beta grids.

Solver: scipy L-BFGS-B (deterministic) on float64 parameters, gradient by torch autograd through the losses,
started at r = 0 (pi = pi_ref). Convergence: projected gradient max-norm <= ``GTOL`` (1e-9) or a relative
objective decrease below 1e-15; the achieved gradient norm is reported. The DPO and RLHF reward problems are
strictly convex; the chiPO problem is not (the clipped loss is flat past the clip), and L-BFGS from pi_ref
returns a stationary point whose margins stay inside the clip band where the data ask them to.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.optimize
import torch

from chipo.bandit._threads import single_thread
from chipo.bandit.instances import Instance
from chipo.bandit.optimum import regularized_optimum
from chipo.divergences import get_divergence
from chipo.losses import LOSSES, preference_loss

RIDGE = 1e-4
"""Ridge on the (centred) implicit reward; see the module docstring."""

GTOL = 1e-9
"""Projected-gradient max-norm at which L-BFGS-B stops."""

ESTIMATORS: dict[str, tuple[str, str]] = {
    # method: (reward fit, divergence of the regularised optimum)
    "dpo": ("dpo", "kl"),
    "chipo": ("chipo", "chi2mix"),
    "kl_rlhf": ("rlhf", "kl"),
    "chi2_rlhf": ("rlhf", "chi2"),
}
"""The four estimators: which reward fit feeds which regularised optimum."""


@dataclass(frozen=True)
class PreferenceData:
    """n Bradley-Terry pairs stored as unique (context, chosen, rejected) triples with counts.

    Attributes (K unique informative triples): context, chosen, rejected: int64 [K]; count: float64 [K];
    n_pairs: the number of pairs sampled (including uninformative y1 = y2 pairs).
    """

    context: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    count: np.ndarray
    n_pairs: int


def sample_actions(pi_ref: np.ndarray, contexts: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """y ~ pi_ref(.|x) for each x in contexts [n], by inverse-CDF on the row-offset flattened CDF (vectorised)."""
    n_x, n_y = pi_ref.shape
    cdf = np.cumsum(pi_ref, axis=1)
    cdf[:, -1] = 1.0  # exact row ends, so x + u (u < 1) always falls inside row x
    flat = (cdf + np.arange(n_x)[:, None]).ravel()
    u = rng.random(contexts.shape[0])
    idx = np.searchsorted(flat, contexts + u, side="right") - contexts * n_y
    return np.minimum(idx, n_y - 1)


def sample_preferences(inst: Instance, n: int, rng: np.random.Generator) -> PreferenceData:
    """Sample n pairs from pi_ref with Bradley-Terry labels from r*, compressed to unique triples."""
    x = rng.choice(inst.n_contexts, size=n, p=inst.context_probs)
    y1 = sample_actions(inst.pi_ref, x, rng)
    y2 = sample_actions(inst.pi_ref, x, rng)
    p_first = 1.0 / (1.0 + np.exp(-(inst.reward[x, y1] - inst.reward[x, y2])))
    first = rng.random(n) < p_first
    chosen, rejected = np.where(first, y1, y2), np.where(first, y2, y1)
    keep = chosen != rejected
    return compress_pairs(x[keep], chosen[keep], rejected[keep], inst.n_actions, n_pairs=n)


def compress_pairs(context: np.ndarray, chosen: np.ndarray, rejected: np.ndarray, n_actions: int,
                   *, n_pairs: int | None = None) -> PreferenceData:
    """Unique (x, y+, y-) triples with multiplicities, from per-pair arrays [n]."""
    key = (np.asarray(context, np.int64) * n_actions + chosen) * n_actions + rejected
    uniq, count = np.unique(key, return_counts=True)
    return PreferenceData(
        context=uniq // (n_actions * n_actions), chosen=(uniq // n_actions) % n_actions,
        rejected=uniq % n_actions, count=count.astype(np.float64),
        n_pairs=int(len(key) if n_pairs is None else n_pairs),
    )


@dataclass(frozen=True)
class FitResult:
    """A solved estimator problem: parameters [X, Y], final objective, projected-gradient max-norm, iterations."""

    params: np.ndarray
    objective: float
    grad_norm: float
    n_iter: int
    message: str


def _lbfgs(objective, x0: np.ndarray, bounds=None, gtol: float = GTOL, maxiter: int = 20000,
           max_restarts: int = 30) -> FitResult:
    """Minimise a torch objective of a flat float64 parameter vector with scipy L-BFGS-B.

    L-BFGS-B is restarted from its last iterate (fresh curvature memory) until a restart no longer lowers the
    objective by more than 1e-13 relatively: chiPO's clipped loss has kinks at the clip, where the line search
    stalls long before the optimum; a restart moves on.
    """

    def fun(v: np.ndarray) -> tuple[float, np.ndarray]:
        t = torch.tensor(v, dtype=torch.float64, requires_grad=True)
        val = objective(t)
        (grad,) = torch.autograd.grad(val, t)
        return float(val.detach()), grad.numpy().copy()

    options = {"maxiter": maxiter, "maxfun": 2 * maxiter, "gtol": gtol, "ftol": 1e-15, "maxcor": 30}
    with single_thread():
        return _restarted_lbfgs(fun, np.asarray(x0, dtype=np.float64), bounds, options, max_restarts)


def _restarted_lbfgs(fun, x: np.ndarray, bounds, options: dict, max_restarts: int) -> FitResult:
    """The restart loop of ``_lbfgs``; returns the best iterate with its projected-gradient max-norm."""
    best, n_iter = np.inf, 0
    for _ in range(max_restarts):
        res = scipy.optimize.minimize(fun, x, jac=True, method="L-BFGS-B", bounds=bounds, options=options)
        n_iter += int(res.nit)
        improved = best - float(res.fun) > 1e-13 * max(1.0, abs(float(res.fun)))
        x, best = res.x, min(best, float(res.fun))
        if not improved or res.success and "NORM OF PROJECTED GRADIENT" in str(res.message):
            break
    _, grad = fun(x)
    if bounds is not None:  # projected gradient: components pushing against an active bound do not count
        lo, hi = np.array([b[0] for b in bounds]), np.array([b[1] for b in bounds])
        grad = np.where((x <= lo) & (grad > 0) | (x >= hi) & (grad < 0), 0.0, grad)
    return FitResult(x, best, float(np.abs(grad).max(initial=0.0)), n_iter, str(res.message))


def _centred_ridge(h: torch.Tensor, ridge: float) -> torch.Tensor:
    """(ridge / 2) sum_x sum_y (h - mean_y h)^2 for h [X, Y]."""
    return 0.5 * ridge * ((h - h.mean(1, keepdim=True)) ** 2).sum()


def reward_objective(data: PreferenceData, reward: torch.Tensor, kind: str, r_max: float,
                     ridge: float = RIDGE) -> torch.Tensor:
    """Penalised loss of a reward table reward [X, Y] (torch float64) for kind ``dpo``, ``chipo`` or ``rlhf``.

    The data term is sum_k count_k * preference_loss(preset, r(x_k, y+_k), r(x_k, y-_k), 0, 0, beta=1,
    link="kl"): with the identity link and beta = 1 the margin is r+ - r-, so ``dpo`` and ``rlhf`` give the
    Bradley-Terry negative log-likelihood and ``chipo`` its version with the margin clipped to +-2 r_max.
    """
    ctx = torch.as_tensor(data.context)
    rc, rr = reward[ctx, torch.as_tensor(data.chosen)], reward[ctx, torch.as_tensor(data.rejected)]
    zeros = torch.zeros_like(rc)
    preset = "chipo" if kind == "chipo" else "dpo"
    extra = {"r_max": r_max} if kind == "chipo" else {}
    losses, _ = preference_loss(preset, rc, rr, zeros, zeros, beta=1.0, link="kl", **extra)
    data_term = (torch.as_tensor(data.count) * losses).sum()
    if kind == "rlhf":
        return data_term + 0.5 * ridge * ((reward - 0.5 * r_max) ** 2).sum()
    return data_term + _centred_ridge(reward, ridge)


def fit_reward(inst: Instance, data: PreferenceData, kind: str, *, ridge: float = RIDGE,
               gtol: float = GTOL) -> FitResult:
    """Fit a reward table [X, Y] for kind ``dpo`` (BT-MLE, unbounded, centred ridge; DPO's implicit reward),
    ``chipo`` (clipped BT loss, centred ridge; chiPO's implicit reward) or ``rlhf`` (BT-MLE over [0, R_max]).

    Unbounded fits are returned centred per context (mean_y r = 0); the optimum is shift-invariant.
    """
    if kind not in ("dpo", "chipo", "rlhf"):
        raise ValueError(f"unknown reward fit {kind!r}")
    shape = (inst.n_contexts, inst.n_actions)
    obj = lambda v: reward_objective(data, v.view(shape), kind, inst.r_max, ridge)  # noqa: E731
    if kind == "rlhf":
        x0 = np.full(shape[0] * shape[1], 0.5 * inst.r_max)
        res = _lbfgs(obj, x0, bounds=[(0.0, inst.r_max)] * x0.size, gtol=gtol)
        params = res.params.reshape(shape)
    else:
        res = _lbfgs(obj, np.zeros(shape[0] * shape[1]), gtol=gtol)
        params = res.params.reshape(shape)
        params = params - params.mean(1, keepdims=True)
    return FitResult(params, res.objective, res.grad_norm, res.n_iter, res.message)


def policy_objective(inst: Instance, data: PreferenceData, logits: torch.Tensor, beta: float, loss: str,
                     ridge: float = RIDGE) -> torch.Tensor:
    """Penalised direct loss of a tabular policy pi = softmax(logits) [X, Y] (DPO or chiPO), float64.

    Data term: sum_k count_k * preference_loss(loss, log pi(y+|x), log pi(y-|x), log pi_ref(y+|x),
    log pi_ref(y-|x), beta=beta) -- the presets' own links (log z for DPO, z + log z for chiPO) and chiPO's clip
    at 2 R_max. Ridge on the context-centred implicit reward beta * link(log pi - log pi_ref).
    """
    log_pi = torch.log_softmax(logits, dim=1)
    log_ref = torch.log(torch.as_tensor(inst.pi_ref))
    ctx, yc, yr = (torch.as_tensor(a) for a in (data.context, data.chosen, data.rejected))
    extra = {"r_max": inst.r_max} if loss == "chipo" else {}
    losses, _ = preference_loss(loss, log_pi[ctx, yc], log_pi[ctx, yr], log_ref[ctx, yc], log_ref[ctx, yr],
                                beta=beta, **extra)
    implicit = beta * get_divergence(LOSSES[loss].link).link(log_pi - log_ref)
    return (torch.as_tensor(data.count) * losses).sum() + _centred_ridge(implicit, ridge)


def fit_direct_policy(inst: Instance, data: PreferenceData, beta: float, loss: str, *, ridge: float = RIDGE,
                      gtol: float = GTOL) -> tuple[np.ndarray, FitResult]:
    """Solve DPO or chiPO directly over tabular policies (logits [X, Y], L-BFGS-B from pi_ref).

    Returns pi [X, Y] and the fit (params are the final logits).
    """
    if loss not in ("dpo", "chipo"):
        raise ValueError(f"direct policy fit supports dpo and chipo, got {loss!r}")
    shape = (inst.n_contexts, inst.n_actions)
    obj = lambda v: policy_objective(inst, data, v.view(shape), beta, loss, ridge)  # noqa: E731
    res = _lbfgs(obj, np.log(inst.pi_ref).ravel(), gtol=gtol)
    logits = res.params.reshape(shape)
    pi = np.exp(logits - logits.max(1, keepdims=True))
    return pi / pi.sum(1, keepdims=True), res


def fit_rewards(inst: Instance, data: PreferenceData, *, ridge: float = RIDGE) -> dict[str, FitResult]:
    """The three reward fits the four estimators need: ``dpo``, ``chipo``, ``rlhf``."""
    return {kind: fit_reward(inst, data, kind, ridge=ridge) for kind in ("dpo", "chipo", "rlhf")}


def estimator_policy(inst: Instance, fits: dict[str, FitResult], method: str, beta: float) -> np.ndarray:
    """pi [X, Y] of ``method`` (a key of ESTIMATORS) at ``beta`` from the reward fits of ``fit_rewards``."""
    fit_kind, divergence = ESTIMATORS[method]
    return regularized_optimum(inst.pi_ref, fits[fit_kind].params, beta, divergence)
