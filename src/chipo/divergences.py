"""f-divergences D_f(pi || pi_ref) = E_{y ~ pi_ref}[ f(pi(y)/pi_ref(y)) ], written once for the whole system.

One object per regulariser serves every part of chipo (every regulariser of Huang et al. 2024, arXiv 2407.13399,
is an f-divergence):

* ``link(L)`` is f'(z) evaluated at z = exp(L), L = log pi - log pi_ref. It is the link of the direct
  preference loss (DPO uses log z, chiPO uses z + log z) and ``beta * link`` is the implicit reward.
* ``beta * link`` is also the per-sample penalty of online RL regularised by D_f (score-function gradient).
* ``link_inverse(u)`` = (f')^{-1}(u) gives the regularised optimum pi* = pi_ref * (f')^{-1}((r - lambda)/beta).
* ``estimate_from_reference`` / ``estimate_from_policy`` are unbiased Monte-Carlo estimators of D_f.

Every generator is chosen so that f(1) = 0 and f' is *exactly* the canonical link (no additive constant):

=========  ===============================  ===================  ==========================
name       f(z)                             f'(z)                D_f
=========  ===============================  ===================  ==========================
kl         z log z - z + 1                  log z                KL(pi || pi_ref)
chi2       (z - 1)^2 / 2                    z - 1                chi^2 (the 1/2 convention of Huang et al. 2024)
chi2mix    (z - 1)^2 / 2 + z log z          z + log z            chi^2 + KL  (chiPO, paper eq. for phi)
fkl        -log z                           -1/z                 KL(pi_ref || pi)
js         z log z - (1+z) log((1+z)/2)     log(2z / (1+z))      2 * Jensen-Shannon
alpha      (z^a - a z + a - 1)/(a(a-1))     (z^(a-1) - 1)/(a-1)  alpha-divergence, 0 < a < 1
=========  ===============================  ===================  ==========================

``alpha`` uses TRL's parameterisation (``DPOConfig.f_alpha_divergence_coef``): a -> 1 tends to the KL link log z,
a = 0.5 gives 2 (1 - z^-1/2) (Hellinger-like).

``fkl``, ``js`` and ``alpha`` are the f-divergence links TRL offers for DPO (Wang et al. 2023,
"Beyond reverse KL"); ``kl`` and ``chi2mix`` give DPO and chiPO (Huang et al. 2024, arXiv 2407.13399).

Numerics: everything is computed from the log-ratio L in the dtype of L (callers pass fp32 or fp64).
exp(L) is evaluated as exp(min(L, exp_clamp)) -- and exp(-L) as exp(min(-L, exp_clamp)) -- so that
sequence-level ratios, where |L| reaches thousands, never overflow: fp32 exp overflows near L = 88.7.
The default clamp 40 keeps exp well inside fp32 (e^40 ~ 2.4e17) while being far beyond any ratio a
regularised policy should reach; past the clamp the exponential term has zero gradient, the remaining
terms (e.g. the log z of chiPO's link) still have theirs.

Link *differences* f'(z+) - f'(z-), the margins of the preference losses, are computed by ``link_difference``
without clamping each exponential separately: e^a - e^b = sign(a - b) e^max(a,b) (1 - e^-|a-b|), evaluated in
log space (``exp_difference``). The result is exact while |e^a - e^b| <= e^exp_clamp and saturates at
+-e^exp_clamp beyond, so a margin clip downstream sees the true sign and a size far past any clip bound. Clamping
each term instead would make e^41 - e^45 equal to e^40 - e^40 = 0 and flip chiPO's margin sign.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

EXP_CLAMP = 40.0
"""Largest exponent ever passed to exp() (see module docstring)."""


def clamped_exp(x: Tensor, exp_clamp: float = EXP_CLAMP) -> Tensor:
    """exp(min(x, exp_clamp)): overflow-free exp of a log-ratio (zero gradient past the clamp)."""
    return torch.exp(torch.clamp(x, max=exp_clamp))


def _expm1_exp_grad(x: Tensor) -> Tensor:
    """expm1(x) in value, with the gradient e^x computed by exp itself.

    torch's expm1 backward forms e^x as expm1(x) + 1, which cancels for x << 0: at x = -20 in fp32, expm1(x) rounds
    to -1 and the gradient comes out 0 instead of 2e-9. In ``exp_difference`` that factor is multiplied by e^h, so
    the smaller side's gradient e^a (1 at a = 0, b = 20) was lost entirely.
    """
    grad_path = torch.exp(x)
    return torch.expm1(x).detach() + (grad_path - grad_path.detach())


def exp_difference(a: Tensor, b: Tensor, exp_clamp: float = EXP_CLAMP) -> Tensor:
    """e^a - e^b without overflow or loss of sign: exact while max(a, b) <= exp_clamp; beyond, exact while
    |e^a - e^b| <= e^exp_clamp and +-e^exp_clamp past that, with zero gradient (as ``clamped_exp``).

    Within the clamp: e^h (expm1(a - h) - expm1(b - h)) with h = max(a, b) held constant -- accurate for close
    a, b (one expm1 is 0, the other -expm1(-|a - b|)) and with the exact gradient (e^a, -e^b), also at a = b.
    Beyond it, in log space: log|e^a - e^b| = h + log(-expm1(-|a - b|)), clamped at exp_clamp; the gap is
    floored at the smallest normal number so log never sees 0 (a = b still gives 0 through sign(0)).
    """
    high = torch.maximum(a, b).detach()
    within = torch.exp(torch.clamp(high, max=exp_clamp)) * (_expm1_exp_grad(a - high) - _expm1_exp_grad(b - high))
    gap = torch.clamp((a - b).detach().abs(), min=torch.finfo(a.dtype).tiny)
    log_size = high + torch.log(-torch.expm1(-gap))
    beyond = torch.sign(a - b).detach() * torch.exp(torch.clamp(log_size, max=exp_clamp))
    return torch.where(high > exp_clamp, beyond, within)


@dataclass(frozen=True)
class FDivergence:
    """An f-divergence given by its generator f, its derivative f' (the link) and (f')^{-1}.

    All callables take the log-ratio L = log z (or, for ``link_inverse``, a link value u) as a tensor.
    ``link_lower`` is inf_z f'(z): links bounded below (chi2: -1) cannot express arbitrarily negative
    rewards, and their optimum puts zero mass where (r - lambda)/beta < link_lower.
    """

    name: str
    description: str
    generator: Callable[[Tensor, float], Tensor]
    link_fn: Callable[[Tensor, float], Tensor]
    link_inverse_fn: Callable[[Tensor], Tensor]
    link_lower: float
    link_upper: float
    link_difference_fn: Callable[[Tensor, Tensor, float], Tensor] | None = None

    def f(self, log_ratio: Tensor, exp_clamp: float = EXP_CLAMP) -> Tensor:
        """f(z) at z = exp(log_ratio)."""
        return self.generator(log_ratio, exp_clamp)

    def link(self, log_ratio: Tensor, exp_clamp: float = EXP_CLAMP) -> Tensor:
        """f'(z) at z = exp(log_ratio): the preference-loss link and the RL penalty (divided by beta)."""
        return self.link_fn(log_ratio, exp_clamp)

    def link_difference(self, log_ratio_a: Tensor, log_ratio_b: Tensor, exp_clamp: float = EXP_CLAMP) -> Tensor:
        """f'(z_a) - f'(z_b), overflow-free and sign-exact for any log-ratios (see ``exp_difference``).

        The margin of a preference loss (divided by beta); ``link_difference(L, 0)`` is the implicit reward
        relative to pi = pi_ref, f'(z) - f'(1).
        """
        if self.link_difference_fn is None:  # links without exp (kl, js) are well-conditioned as they are
            return self.link(log_ratio_a, exp_clamp) - self.link(log_ratio_b, exp_clamp)
        return self.link_difference_fn(log_ratio_a, log_ratio_b, exp_clamp)

    def link_inverse(self, u: Tensor) -> Tensor:
        """The density ratio z >= 0 with f'(z) = u (0 where u <= link_lower). Use float64 for accuracy."""
        return self.link_inverse_fn(u)

    def estimate_from_reference(self, log_ratio: Tensor, exp_clamp: float = EXP_CLAMP) -> Tensor:
        """Unbiased D_f estimate from L evaluated on samples y ~ pi_ref: mean of f(z)."""
        return self.f(log_ratio, exp_clamp).mean()

    def estimate_from_policy(self, log_ratio: Tensor, exp_clamp: float = EXP_CLAMP) -> Tensor:
        """Unbiased D_f estimate from L on samples y ~ pi: mean of f(z)/z (importance weight 1/z).

        For kl this is the "k3" estimator E_pi[(1/z - 1) + log z] (Schulman 2020): non-negative per sample,
        unlike the "k1" estimate mean(L). For chi2 it is E_pi[(z - 2 + 1/z)/2]; its variance grows with
        E_pi[z^2], i.e. with the very chi-squared distance it estimates -- treat large values as lower bounds.
        """
        weight = clamped_exp(-log_ratio, exp_clamp)
        return (self.f(log_ratio, exp_clamp) * weight).mean()


def _lambert_w0_exp(u: Tensor) -> Tensor:
    """W0(e^u): the z > 0 solving z + log z = u, i.e. the inverse of chiPO's link phi.

    Newton on w = log z, h(w) = e^w + w - u, h'(w) = e^w + 1, never exponentiating a large u (e^u overflows
    float64 at u ~ 709): start from w0 = u for u < 1 (log W0(e^u) = u - e^u + O(e^2u)) and from
    w0 = log(u - log u) for u >= 1 (the asymptotic expansion of W0). h is convex and increasing, so the
    iteration converges monotonically; 8 steps reach machine precision for all u (checked in the tests). For very
    negative u, e^w underflows to 0 harmlessly (the step then returns w = u) and z = e^u underflows to 0.
    """
    large = u >= 1.0
    safe = torch.clamp(u, min=1.0)
    w = torch.where(large, torch.log(safe - torch.log(safe)), u)
    for _ in range(8):
        e = torch.exp(w)  # w <= max(1, log u): no overflow
        w = w - (e + w - u) / (e + 1.0)
    return torch.exp(w)


def _kl_f(L: Tensor, c: float) -> Tensor:
    z = clamped_exp(L, c)
    return z * L - z + 1.0


def _chi2_f(L: Tensor, c: float) -> Tensor:
    return 0.5 * (clamped_exp(L, c) - 1.0) ** 2


def _chi2mix_f(L: Tensor, c: float) -> Tensor:
    z = clamped_exp(L, c)
    return 0.5 * (z - 1.0) ** 2 + z * L


def _fkl_f(L: Tensor, c: float) -> Tensor:
    return -L


def _js_f(L: Tensor, c: float) -> Tensor:
    z = clamped_exp(L, c)
    # (1 + z) log((1 + z)/2) = (1 + z) (softplus(L) - log 2), stable for any L.
    return z * L - (1.0 + z) * (torch.nn.functional.softplus(L) - math.log(2.0))


def _js_link(L: Tensor, c: float) -> Tensor:
    # log(2z/(1+z)) = log 2 - log(1 + 1/z) = log 2 - softplus(-L)
    return math.log(2.0) - torch.nn.functional.softplus(-L)


def _js_inverse(u: Tensor) -> Tensor:
    # 2z/(1+z) = e^u  =>  z = e^u / (2 - e^u), defined for u < log 2.
    e = torch.exp(torch.clamp(u, max=math.log(2.0)))
    return torch.where(u < math.log(2.0), e / torch.clamp(2.0 - e, min=torch.finfo(u.dtype).tiny),
                       torch.full_like(u, math.inf))


def alpha_divergence(alpha: float = 0.5) -> FDivergence:
    """The alpha-divergence of TRL's ``alpha_divergence`` f-DPO option, in TRL's parameterisation (0 < alpha < 1).

    f'(z) = (z^(alpha-1) - 1)/(alpha - 1) as TRL 1.16 writes it (``f_alpha_divergence_coef``, default 0.5), so
    ``alpha`` means here what it means in TRL; alpha -> 1 approaches the KL link log z, alpha -> 0 the forward-KL
    link 1 - 1/z. With k = 1 - alpha: f'(z) = (1 - e^(-k L)) / k, bounded above by 1/k.
    """
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")
    a = float(alpha)
    k = 1.0 - a

    def f(L: Tensor, c: float) -> Tensor:
        # (z^a - a z + a - 1) / (a (a - 1)): f(1) = 0 and f'(z) = (z^(a-1) - 1)/(a - 1).
        return (clamped_exp(a * L, c) - a * clamped_exp(L, c) + a - 1.0) / (a * (a - 1.0))

    def link(L: Tensor, c: float) -> Tensor:
        return (1.0 - clamped_exp(-k * L, c)) / k

    def difference(La: Tensor, Lb: Tensor, c: float) -> Tensor:
        return exp_difference(-k * Lb, -k * La, c) / k

    def inverse(u: Tensor) -> Tensor:
        base = 1.0 - k * u  # z^(-k) = 1 - k u  => z = (1 - k u)^(-1/k), for u < 1/k
        return torch.where(base > 0, torch.clamp(base, min=torch.finfo(u.dtype).tiny) ** (-1.0 / k),
                           torch.full_like(u, math.inf))

    return FDivergence("alpha", f"alpha-divergence (alpha={a}, TRL's parameterisation)", f, link, inverse,
                       -math.inf, 1.0 / k, difference)


KL = FDivergence(
    "kl", "reverse KL(pi || pi_ref); link log z (DPO, standard RLHF)",
    _kl_f, lambda L, c: L, lambda u: torch.exp(u), -math.inf, math.inf,
)
CHI2 = FDivergence(
    "chi2", "chi-squared 1/2 E_ref[(z-1)^2]; link z - 1 (bounded below by -1)",
    _chi2_f, lambda L, c: clamped_exp(L, c) - 1.0, lambda u: torch.clamp(u + 1.0, min=0.0), -1.0, math.inf,
    exp_difference,
)
CHI2MIX = FDivergence(
    "chi2mix", "chi-squared + KL; link phi(z) = z + log z (chiPO's implicit regulariser)",
    _chi2mix_f, lambda L, c: clamped_exp(L, c) + L, _lambert_w0_exp, -math.inf, math.inf,
    lambda La, Lb, c: exp_difference(La, Lb, c) + (La - Lb),
)
FORWARD_KL = FDivergence(
    "fkl", "forward KL(pi_ref || pi); link -1/z",
    _fkl_f, lambda L, c: -clamped_exp(-L, c),
    lambda u: torch.where(u < 0, -1.0 / torch.clamp(u, max=-torch.finfo(u.dtype).tiny), torch.full_like(u, math.inf)),
    -math.inf, 0.0, lambda La, Lb, c: exp_difference(-Lb, -La, c),
)
JS = FDivergence(
    "js", "Jensen-Shannon (x2); link log(2z/(1+z))", _js_f, _js_link, _js_inverse, -math.inf, math.log(2.0),
)

DIVERGENCES: dict[str, Callable[..., FDivergence]] = {
    "kl": lambda: KL,
    "chi2": lambda: CHI2,
    "chi2mix": lambda: CHI2MIX,
    "fkl": lambda: FORWARD_KL,
    "js": lambda: JS,
    "alpha": alpha_divergence,
}


def get_divergence(name: str, **params: float) -> FDivergence:
    """Look up a divergence by name (``alpha`` takes ``alpha=``). Unknown names list the valid ones."""
    try:
        factory = DIVERGENCES[name]
    except KeyError:
        raise ValueError(f"unknown divergence {name!r}; valid: {', '.join(sorted(DIVERGENCES))}") from None
    return factory(**params)
