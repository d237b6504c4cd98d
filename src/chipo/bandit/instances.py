"""Tabular preference-optimization instances: contexts X ~ rho, actions Y, pi_ref[X, Y], r*[X, Y] in [0, R_max].

Two families:

* :func:`random_instance` -- Dirichlet(alpha) reference policies (alpha is the coverage knob: small alpha puts most
  of pi_ref's mass on a few actions, so most actions are rarely sampled) with i.i.d. uniform rewards.
* :func:`kl_trap_instance` -- a single-context instance in the spirit of Proposition A.1 of Huang et al. 2024
  (arXiv 2407.13399, "KL-regularization is not enough"), derived in that function's docstring.

All arrays are float64 numpy arrays; ``pi_ref`` rows are strictly positive (a floor keeps log pi_ref finite)
and sum to one.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

PI_REF_FLOOR = 1e-12
"""Smallest reference probability. Dirichlet draws with small alpha underflow to 0 in float64; mixing in this
floor keeps every log pi_ref finite (needed by the log-ratio losses) while changing no mass that matters."""


@dataclass(frozen=True)
class Instance:
    """A contextual preference bandit.

    Attributes:
        name: label used in reports.
        context_probs: rho[X], the prompt distribution D_x (sums to one).
        pi_ref: pi_ref[X, Y] > 0, rows sum to one.
        reward: r*[X, Y] in [0, r_max], the Bradley-Terry reward.
        r_max: reward bound R_max (also chiPO's clip: margins are clipped to [-2 R_max, 2 R_max]).
        meta: free-form description of how the instance was built (kept in the JSON reports).
    """

    name: str
    context_probs: np.ndarray
    pi_ref: np.ndarray
    reward: np.ndarray
    r_max: float
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        rho, ref, r = self.context_probs, self.pi_ref, self.reward
        if ref.ndim != 2 or r.shape != ref.shape or rho.shape != (ref.shape[0],):
            raise ValueError(f"shapes disagree: rho {rho.shape}, pi_ref {ref.shape}, reward {r.shape}")
        if not (np.all(ref > 0) and np.allclose(ref.sum(1), 1.0, atol=1e-12)):
            raise ValueError("pi_ref rows must be strictly positive and sum to one")
        if not (np.all(rho >= 0) and abs(rho.sum() - 1.0) < 1e-12):
            raise ValueError("context_probs must be a distribution")
        if not (self.r_max > 0 and np.all(r >= 0) and np.all(r <= self.r_max)):
            raise ValueError(f"rewards must lie in [0, r_max={self.r_max}]")

    @property
    def n_contexts(self) -> int:
        return self.pi_ref.shape[0]

    @property
    def n_actions(self) -> int:
        return self.pi_ref.shape[1]


def _floor_rows(p: np.ndarray, floor: float = PI_REF_FLOOR) -> np.ndarray:
    """Mix each row of p [X, Y] with the uniform distribution so every entry is at least ``floor``."""
    n_actions = p.shape[-1]
    eps = floor * n_actions
    out = (1.0 - eps) * p + eps / n_actions
    return out / out.sum(-1, keepdims=True)


def random_instance(
    n_contexts: int,
    n_actions: int,
    *,
    concentration: float = 1.0,
    r_max: float = 1.0,
    seed: int = 0,
) -> Instance:
    """A random instance: rho uniform, pi_ref(.|x) ~ Dirichlet(concentration * 1), r*(x, y) ~ U[0, r_max] i.i.d.

    ``concentration`` controls coverage: at 1 pi_ref is uniform on the simplex; at 0.1 each row puts most of
    its mass on a handful of actions, so the optimal action is typically badly covered (large C^{pi*}).
    Dirichlet draws are made via normalized Gamma(alpha) samples, then floored at ``PI_REF_FLOOR``.
    """
    if concentration <= 0:
        raise ValueError(f"concentration must be positive, got {concentration}")
    rng = np.random.default_rng(seed)
    gam = rng.gamma(concentration, size=(n_contexts, n_actions))
    # Rows of all-underflowed gammas (possible for tiny alpha) fall back to a point mass on a random action.
    empty = gam.sum(1) == 0
    gam[empty, rng.integers(n_actions, size=int(empty.sum()))] = 1.0
    pi_ref = _floor_rows(gam / gam.sum(1, keepdims=True))
    reward = rng.uniform(0.0, r_max, size=(n_contexts, n_actions))
    rho = np.full(n_contexts, 1.0 / n_contexts)
    return Instance(
        name=f"random(X={n_contexts},Y={n_actions},alpha={concentration:g})",
        context_probs=rho, pi_ref=pi_ref, reward=reward, r_max=r_max,
        meta={"kind": "random", "concentration": concentration, "seed": seed},
    )


def kl_trap_instance(
    *,
    n_good: int = 32,
    good_top: float = 0.5,
    trap_mass: float = 0.1,
    trap_levels: tuple[int, int] = (4, 22),
    traps_per_level: int = 4,
    r_max: float = 2.0,
) -> Instance:
    """The "KL is not enough" instance (after Proposition A.1 of arXiv 2407.13399; our own construction).

    One context. Actions:

    * ``n_good`` *good* actions with equal reference mass (1 - trap_mass) / n_good and true rewards evenly
      spaced in [0, good_top]; the best one (reward good_top) is pi*, with C^{pi*} = 1/pi_ref(best) = O(n_good).
    * *traps*: true reward 0, one batch of ``traps_per_level`` actions at every dyadic scale
      p_j proportional to 2^-j, j in trap_levels, total mass ``trap_mass``. Whatever n is, some traps have
      p ~ 1/n: they appear O(1) times in n pairs.

    The reward class is [0, R_max] with R_max = r_max > good_top (default 2 vs 0.5), so the data cannot rule out
    that a rarely seen action is better than the best well-covered one by up to ~R_max - good_top.

    Why KL fails (regret >= c / log n for every beta, *over a finite range of n*, see below). A trap that appeared a
    few times and happened to win its comparisons (probability ~ sigmoid(-r) ~ 0.4 per comparison) gets a fitted
    reward that exceeds the best good action's by some Delta > 0 (up to the box for a bounded MLE, ~log(1/ridge) for
    DPO's unbounded implicit reward). The KL optimum pi_ref * exp(r_hat / beta) / Z puts mass ~ p * exp(Delta /
    beta) / beta on it, with p ~ 1/n. To keep that small beta must be <~ Delta / log n. But with the good rewards
    spread evenly, the exponential tilt of the good actions has bias E[good_top - r] ~ beta (the tilt of a uniform
    density on [0, good_top] has mean good_top - beta + o(beta)), so regret >~ min_beta max(beta, n^{-1}
    e^{Delta/beta}) ~ Delta / log n.

    Range of n. The argument needs a trap seen O(1) times: a trap of mass p appears in about 2 n p of n pairs, so it
    needs 1 / (2 p_max) <~ n <~ 1 / (2 p_min) over the trap masses p_j = trap_mass 2^-j / sum_k 2^-k. With the
    defaults p_max = 1.25e-2 and p_min = 4.8e-8 (``meta["smallest_trap_prob"]``): roughly 40 <~ n <~ 1e7. Past
    ~1e7 every trap is compared many times, its fitted reward concentrates near 0 and the instance no longer traps
    KL (its regret then falls polynomially); a fixed instance cannot show an asymptotic 1 / log n rate, only its
    shape over this window.

    Why chi-squared succeeds (regret ~ n^{-1/2}). The chi2 (and chi2mix) optimum has density ratio at most
    1 + R_max / beta (chi2mix: W0(e^{u}) <= u for u >= 1), so a trap with p ~ 1/n gets mass <= p (1 + R/beta),
    while the bias is ~ beta * C^{pi*}; beta ~ n^{-1/2} balances them (Theorem 3.1's rate).

    Shapes: rho [1], pi_ref [1, n_good + traps], reward [1, n_good + traps].
    """
    if not 0 < good_top < r_max:
        raise ValueError("need 0 < good_top < r_max so the reward class admits traps better than pi*")
    lo, hi = trap_levels
    levels = np.arange(lo, hi + 1)
    scale = np.repeat(2.0 ** -levels.astype(float), traps_per_level)
    trap_p = trap_mass * scale / scale.sum()
    good_p = np.full(n_good, (1.0 - trap_mass) / n_good)
    pi_ref = np.concatenate([good_p, trap_p])[None, :]
    pi_ref = pi_ref / pi_ref.sum()
    reward = np.concatenate([np.linspace(0.0, good_top, n_good), np.zeros(trap_p.size)])[None, :]
    return Instance(
        name="kl_trap",
        context_probs=np.ones(1), pi_ref=pi_ref, reward=reward, r_max=r_max,
        meta={"kind": "kl_trap", "n_good": n_good, "good_top": good_top, "trap_mass": trap_mass,
              "trap_levels": list(trap_levels), "traps_per_level": traps_per_level,
              "smallest_trap_prob": float(trap_p.min())},
    )


def rare_best_instance(*, n_actions: int = 10, best_prob: float = 0.005, safe_prob: float = 0.6,
                       safe_reward: float = 0.5, r_max: float = 1.0) -> Instance:
    """One context where exploration matters: the best response is one pi_ref rarely produces.

    Actions: 0 is the *safe* response (pi_ref mass ``safe_prob``, reward ``safe_reward``); 1..K-2 share the rest of
    the mass equally with rewards evenly spaced in [0, 0.8 safe_reward]; K-1 is the *best* response (reward r_max,
    pi_ref mass ``best_prob``). Sampling from pi_ref shows the best response about once per 1 / best_prob draws,
    and a learner that samples only from a policy concentrating on the safe response sees it even less often.
    """
    if not (0 < best_prob < 1 - safe_prob and 0 < safe_reward < r_max and n_actions >= 3):
        raise ValueError("need n_actions >= 3, 0 < best_prob < 1 - safe_prob and 0 < safe_reward < r_max")
    middle = n_actions - 2
    pi_ref = np.concatenate([[safe_prob], np.full(middle, (1.0 - safe_prob - best_prob) / middle), [best_prob]])
    reward = np.concatenate([[safe_reward], np.linspace(0.0, 0.8 * safe_reward, middle), [r_max]])
    return Instance(
        name="rare_best", context_probs=np.ones(1), pi_ref=pi_ref[None], reward=reward[None], r_max=r_max,
        meta={"kind": "rare_best", "best_prob": best_prob, "safe_prob": safe_prob, "safe_reward": safe_reward},
    )


NAMED_INSTANCES = {"kl_trap": kl_trap_instance, "rare_best": rare_best_instance}


def named_instance(name: str, **kwargs) -> Instance:
    """A named hard instance (``kl_trap`` or ``rare_best``)."""
    try:
        return NAMED_INSTANCES[name](**kwargs)
    except KeyError:
        raise ValueError(f"unknown instance {name!r}; valid: {', '.join(NAMED_INSTANCES)}") from None
