"""Exact f-divergence-regularised optimum over tabular policies.

For each context x (independently, since both terms average over x ~ rho) we solve

    max_{pi(.|x) in simplex}  sum_y pi(y) r(y)  -  beta * sum_y pi_ref(y) f(pi(y) / pi_ref(y)).

The objective is strictly concave (f strictly convex). Stationarity with a multiplier lambda(x) for the
sum-to-one constraint and complementary slackness for pi >= 0 give (the f-regularised optimum used throughout
Huang et al. 2024, arXiv 2407.13399)

    pi(y) = pi_ref(y) * (f')^{-1}( (r(y) - lambda) / beta ),                                    (*)

with (f')^{-1}(u) = 0 for u <= inf f' (only the pure chi-squared link, bounded below by -1, hits this: its
optimum is the clipped linear form pi = pi_ref * max(0, 1 + (r - lambda)/beta)). For KL, (f')^{-1} = exp and
lambda = beta * log sum_y pi_ref exp(r / beta) in closed form (the exponential tilt); for chi2mix (chiPO's
implicit regulariser, f' = z + log z) (f')^{-1}(u) = W0(e^u), evaluated by ``chipo.divergences`` with Newton
on z + log z = u so that large u never overflows.

The normaliser solves g(lambda) = sum_y pi_ref(y) z_y(lambda) - 1 = 0. g is continuous and non-increasing.
With c = f'(1) (c = 0 for kl and chi2, but c = 1 for chi2mix, whose f'(z) = z + log z), lambda in
[min_y r - beta c, max_y r - beta c] brackets the root: at the left end every u = (r - lambda)/beta >= c, so every
z >= 1 and g >= 0; at the right end every u <= c, so every z <= 1 and g <= 0. We run a vectorised safeguarded
Newton iteration: a Newton step when it stays inside the current bracket, bisection otherwise, with the bracket
updated from the sign of g. g is convex for kl, chi2 and chi2mix ((f')^{-1} is convex there), so after the first
step Newton approaches the root monotonically from the left. Stop when |g| <= tol (default 1e-12) in every context.

The derivative dz/du = 1 / f''(z) is obtained from the *link* by autograd: with L = log z,
d f'(e^L) / dL = z f''(z), hence dz/du = z / (d link / d L). This keeps the code generic over
``chipo.divergences`` (no hand-written second derivatives).
"""

from __future__ import annotations

import numpy as np
import torch

from chipo.divergences import FDivergence, get_divergence

OPTIMUM_DIVERGENCES = ("kl", "chi2", "chi2mix")


def _as_divergence(divergence: str | FDivergence) -> FDivergence:
    return get_divergence(divergence) if isinstance(divergence, str) else divergence


def _ratio_and_slope(div: FDivergence, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z = (f')^{-1}(u) and dz/du, both shaped like u. dz/du = 0 where z = 0 (the inactive set of chi2)."""
    z = div.link_inverse(u)
    positive = z > 0
    log_z = torch.log(torch.where(positive, z, torch.ones_like(z))).requires_grad_(True)
    with torch.enable_grad():
        (dlink,) = torch.autograd.grad(div.link(log_z).sum(), log_z)
    slope = torch.where(positive, z / dlink, torch.zeros_like(z))
    return z, slope


def solve_normalizer(
    pi_ref: torch.Tensor,
    reward: torch.Tensor,
    beta: float,
    divergence: str | FDivergence,
    *,
    tol: float = 1e-12,
    max_iter: int = 200,
) -> tuple[torch.Tensor, torch.Tensor]:
    """lambda[X] with sum_y pi_ref z((r - lambda)/beta) = 1 (safeguarded Newton), and the residual g [X].

    pi_ref, reward: [X, Y] float64 tensors. Raises RuntimeError if some context misses ``tol`` after
    ``max_iter`` iterations and its bracket has not collapsed to float64 resolution.
    """
    div = _as_divergence(divergence)
    link_at_one = float(div.link(torch.zeros((), dtype=torch.float64)))
    lo = reward.min(1).values - beta * link_at_one
    hi = reward.max(1).values - beta * link_at_one
    lam = hi.clone()  # g(hi) <= 0: the first Newton step then lands left of the root (g convex)
    g = torch.zeros_like(lam)
    for _ in range(max_iter):
        z, slope = _ratio_and_slope(div, (reward - lam[:, None]) / beta)
        g = (pi_ref * z).sum(1) - 1.0
        done = g.abs() <= tol
        if bool(done.all()):
            return lam, g
        lo = torch.where(g > 0, lam, lo)
        hi = torch.where(g < 0, lam, hi)
        dg = -(pi_ref * slope).sum(1) / beta
        step = lam - g / torch.where(dg < 0, dg, torch.full_like(dg, -1.0))
        inside = (dg < 0) & (step > lo) & (step < hi) & torch.isfinite(step)
        new = torch.where(inside, step, 0.5 * (lo + hi))
        # A collapsed bracket means lambda is exact to float64 resolution: keep it.
        collapsed = (hi - lo) <= 4 * torch.finfo(lam.dtype).eps * torch.maximum(lo.abs(), hi.abs()).clamp(min=1.0)
        lam = torch.where(done | collapsed, lam, new)
        if bool((done | collapsed).all()):
            return lam, g
    bad = int((g.abs() > tol).sum())
    raise RuntimeError(f"normaliser root-find did not converge in {max_iter} iterations ({bad} contexts)")


def regularized_optimum(
    pi_ref: np.ndarray,
    reward: np.ndarray,
    beta: float,
    divergence: str | FDivergence = "kl",
    *,
    tol: float = 1e-12,
    return_normalizer: bool = False,
    closed_form_kl: bool = True,
) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """argmax_pi E_pi[r] - beta D_f(pi || pi_ref), exactly, for every context at once.

    Args:
        pi_ref: [X, Y] (or [Y]) strictly positive rows summing to one.
        reward: same shape as pi_ref; any real values (the optimum is shift-invariant per context).
        beta: regularisation strength > 0.
        divergence: a ``chipo.divergences`` name (``kl``, ``chi2``, ``chi2mix``) or an FDivergence whose link is
            increasing (any value of f'(1); the bracket is shifted by it).
        tol: tolerance on |sum_y pi(y|x) - 1| before the final renormalisation.
        return_normalizer: also return lambda[X] of equation (*).
        closed_form_kl: for ``kl`` use lambda = beta * logsumexp(log pi_ref + r / beta) instead of the root-find.

    Returns:
        pi [X, Y] (same shape as the input), float64, rows summing to one; optionally (pi, lambda).
    """
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    div = _as_divergence(divergence)
    ref = torch.as_tensor(np.asarray(pi_ref, dtype=np.float64))
    r = torch.as_tensor(np.asarray(reward, dtype=np.float64))
    squeeze = ref.ndim == 1
    if squeeze:
        ref, r = ref[None], r[None]
    if ref.shape != r.shape:
        raise ValueError(f"pi_ref {tuple(ref.shape)} and reward {tuple(r.shape)} differ in shape")
    if div.name == "kl" and closed_form_kl:
        # Exponential tilt: lambda = beta log sum_y pi_ref e^{r/beta}; then z = e^{(r - lambda)/beta} <= 1/pi_ref,
        # so link_inverse never overflows whatever beta is.
        lam = beta * torch.logsumexp(torch.log(ref) + r / beta, dim=1)
    else:
        lam, _ = solve_normalizer(ref, r, beta, div, tol=tol)
    z = div.link_inverse((r - lam[:, None]) / beta)
    pi = ref * z
    # The root-find leaves |sum - 1| <= tol; renormalise so rows sum to one to rounding.
    pi = pi / pi.sum(1, keepdim=True)
    out = pi.numpy()
    lam_np = lam.numpy()
    if squeeze:
        out, lam_np = out[0], lam_np[0]
    return (out, lam_np) if return_normalizer else out
