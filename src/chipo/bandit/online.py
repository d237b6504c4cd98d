"""Online preference optimization on tabular instances: online DPO, XPO and chi-squared XPO, solved exactly.

Protocol (one pair per round). At round t the learner holds pi_t; it draws x_t ~ rho and two actions,

* online DPO:      y_t, y'_t ~ pi_t(.|x_t) independently (passive exploration, no bonus);
* XPO / chi2-XPO:  y_t ~ pi_t(.|x_t) and y~_t ~ pi_ref(.|x_t) (Xie et al. 2024, arXiv 2405.21046, Algorithm 1),

gets a Bradley-Terry label (y_t preferred with probability sigmoid(r*(x, y_t) - r*(x, y'_t))) and sets pi_{t+1} to
the minimiser of the cumulative loss over all data so far (a pair of equal actions carries no information and only
y~_t is kept for the bonus).

Objective (Algorithm 1 of arXiv 2405.21046, and its sign). XPO minimises

    alpha sum_{i<=t} log pi(y~_i|x_i) - sum_{i<=t} log sigmoid(beta log(pi/pi_ref)(y+_i) - beta log(pi/pi_ref)(y-_i)).

Derivation of the bonus (our own, tabular). XPO is optimism: pick the reward r that trades the Bradley-Terry loss
against alpha' * sum_i [J_beta(pi_r; x_i) - E_{y ~ pi_ref}[r(x_i, y)]], the regularised value of r's optimal
policy pi_r over pi_ref's value. With DPO's reparametrisation r = beta log(pi/pi_ref) + beta log Z(x) one has
J_beta(pi_r; x) = beta log Z(x), so the gap is -beta E_{pi_ref}[log(pi/pi_ref)] = beta KL(pi_ref || pi) >= 0 (Z
cancels). Replacing the expectation by the sample y~_i ~ pi_ref and *maximising* it means *minimising*
alpha' beta sum_i log(pi/pi_ref)(y~_i) = alpha sum_i log pi(y~_i) + const with alpha = alpha' beta. So the term
enters the minimised objective with a plus sign: it *lowers* pi on the responses pi_ref has produced and thereby
moves mass to responses pi_ref rarely produces (it is an estimate of -KL(pi_ref || pi)); this is the exploration.
(TRL's XPO trainer adds alpha * log pi(y_ref) to the minimised loss in the same way.)

chi-squared XPO replaces log z by chiPO's link phi(z) = z + log z (z = pi / pi_ref) in both terms: chiPO's loss
(Huang et al. 2024, arXiv 2407.13399, Alg. 1) plus alpha * sum_i phi(z(y~_i)). (In expectation over y~ ~ pi_ref,
E[phi(z)] = 1 - KL(pi_ref || pi), the same exploration target; the regulariser pulling pi back is chi2mix.)

Implicit-reward parametrisation. Over tabular policies both links give h = beta phi(z) + lambda(x) with
pi = pi_ref (phi)^{-1}((h - lambda)/beta), i.e. pi is the f-regularised optimum of h (``regularized_optimum``).
Then beta (phi(z+) - phi(z-)) = h+ - h-, and sum_i phi(z(y~_i)) = (1/beta) sum_i (h(y~_i) - lambda(x_i)). The
policy class is h in [0, R_max]^{X x Y}: the bounded implicit reward of XPO's analysis (|beta log(pi/pi_ref)| bounded)
and the reward class of the offline experiments. Margins are then within [-R_max, R_max], inside chiPO's clip
2 R_max, so both preference terms are the logistic loss of h+ - h-. The minimised objective is

    F(h) = sum_{x,a,b} W[x,a,b] softplus(h_b - h_a) + (alpha/beta) sum_x (sum_y M[x,y] h[x,y] - m_x lambda_x(h))
           + (ridge/2) |h - R_max/2|^2,

W[x,a,b] = times a beat b, M[x,y] = times pi_ref drew y (m_x their sum); the ridge (``RIDGE``) picks the centred
representative of unseen actions as in ``chipo.bandit.estimators``. grad lambda_x = w_x with w = pi for KL and
w proportional to pi / (1 + z) for chi2mix (implicit differentiation of sum_y pi_ref z = 1, dz/du = z / (1 + z)).
-lambda is concave, so with alpha > 0 F is not convex: each round runs L-BFGS-B (box [0, R_max]) from the previous
solution and from the data-free start h = R_max/2 and keeps the lower objective (a 2-action brute-force test checks
this finds the global minimum). alpha is given as gamma = alpha / beta, the weight of the bonus in reward units,
so one gamma means the same exploration pressure for links run at different beta.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.optimize

from chipo.bandit.estimators import RIDGE, sample_actions
from chipo.bandit.instances import Instance

ONLINE_METHODS: dict[str, tuple[str, bool]] = {
    # method: (link / regulariser, uses the pi_ref sample and the bonus)
    "online_dpo": ("kl", False),
    "xpo": ("kl", True),
    "chi2_xpo": ("chi2mix", True),
}


def _w0_exp(u: np.ndarray) -> np.ndarray:
    """z = W0(e^u), i.e. the solution of z + log z = u, by Newton from a start left of the root (F(z) = z + log z
    is concave and increasing, so iterates stay positive and converge monotonically); no overflow for large u."""
    # Below u = -40, W0(e^u) = e^u (1 - e^u + ...) equals e^u to double precision (and may underflow to 0).
    tiny, v = u < -40.0, np.maximum(u, -40.0)
    z = np.where(v > 1.0, v - np.log(np.maximum(v, 1.0)), np.exp(np.minimum(v, 1.0)))
    for _ in range(60):
        new = z * (1.0 + v - np.log(z)) / (1.0 + z)
        if np.all(np.abs(new - z) <= 1e-13 * new):  # rounding keeps a ~1e-14 jitter
            z = new
            break
        z = new
    return np.where(tiny, np.exp(u), z)


def link_policy(pi_ref: np.ndarray, h: np.ndarray, beta: float, link: str,
                lam0: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """pi = pi_ref (phi)^{-1}((h - lambda)/beta), lambda [X] and w = d lambda / d h [X, Y] (rows sum to one).

    Numpy fast path of ``regularized_optimum`` (kl, chi2mix) for the per-round solves; tests check they agree.
    ``lam0``: a starting guess for chi2mix's lambda (clipped into the bracket; the solver's previous iterate).
    """
    if link == "kl":
        a = np.log(pi_ref) + h / beta
        amax = a.max(1, keepdims=True)
        s = np.exp(a - amax)
        pi = s / s.sum(1, keepdims=True)
        lam = beta * (amax[:, 0] + np.log(s.sum(1)))
        return pi, lam, pi
    if link != "chi2mix":
        raise ValueError(f"link must be kl or chi2mix, got {link!r}")
    # sum_y pi_ref z((h - lambda)/beta) = 1 is decreasing and convex in lambda; f'(1) = 1 brackets the root in
    # [min h - beta, max h - beta] (see chipo.bandit.optimum). Safeguarded Newton from the right end.
    lo, hi = h.min(1) - beta, h.max(1) - beta
    lam = hi.copy() if lam0 is None else np.clip(lam0, lo, hi)
    for _ in range(200):
        z = _w0_exp((h - lam[:, None]) / beta)
        g = (pi_ref * z).sum(1) - 1.0
        if np.all(np.abs(g) <= 1e-13):
            break
        lo, hi = np.where(g > 0, lam, lo), np.where(g < 0, lam, hi)
        dg = -(pi_ref * z / (1.0 + z)).sum(1) / beta
        step = lam - g / dg
        lam = np.where((step > lo) & (step < hi), step, 0.5 * (lo + hi))
    z = _w0_exp((h - lam[:, None]) / beta)
    pi = pi_ref * z
    w = pi / (1.0 + z)
    return pi / pi.sum(1, keepdims=True), lam, w / w.sum(1, keepdims=True)


@dataclass
class OnlineData:
    """Cumulative data: wins[x, a, b] = times a beat b; ref_draws[x, y] = times pi_ref produced y (the bonus)."""

    wins: np.ndarray
    ref_draws: np.ndarray
    rounds: int = 0

    @classmethod
    def empty(cls, n_contexts: int, n_actions: int) -> OnlineData:
        return cls(np.zeros((n_contexts, n_actions, n_actions)), np.zeros((n_contexts, n_actions)))


def online_objective(h: np.ndarray, data: OnlineData, pi_ref: np.ndarray, beta: float, alpha: float, link: str,
                     r_max: float, ridge: float = RIDGE, cache: dict | None = None) -> tuple[float, np.ndarray]:
    """F(h) of the module docstring and its gradient [X, Y]; alpha multiplies sum_i phi(z(y~_i)) (paper's alpha).

    ``cache``: a dict carrying lambda between calls (a warm start for chi2mix's root-find; no effect on values).
    """
    margin = h[:, :, None] - h[:, None, :]  # [x, a, b] = h_a - h_b
    value = float((data.wins * np.logaddexp(0.0, -margin)).sum())
    g = -data.wins * 0.5 * (1.0 - np.tanh(0.5 * margin))  # d softplus(-m) / dm = -sigmoid(-m)
    grad = g.sum(2) - g.sum(1)
    if alpha:
        _, lam, w = link_policy(pi_ref, h, beta, link, None if cache is None else cache.get("lam"))
        if cache is not None:
            cache["lam"] = lam
        m = data.ref_draws.sum(1)
        value += alpha / beta * float((data.ref_draws * h).sum() - m @ lam)
        grad = grad + alpha / beta * (data.ref_draws - m[:, None] * w)
    centred = h - 0.5 * r_max
    value += 0.5 * ridge * float((centred**2).sum())
    return value, grad + ridge * centred


def solve_online(data: OnlineData, pi_ref: np.ndarray, beta: float, alpha: float, link: str, r_max: float,
                 starts: list[np.ndarray], ridge: float = RIDGE) -> tuple[np.ndarray, float]:
    """argmin over h in [0, r_max]^{X x Y} of ``online_objective``: L-BFGS-B from each start, the lowest wins."""
    shape = pi_ref.shape
    cache: dict = {}

    def fun(v: np.ndarray) -> tuple[float, np.ndarray]:
        val, grad = online_objective(v.reshape(shape), data, pi_ref, beta, alpha, link, r_max, ridge, cache)
        return val, grad.ravel()

    best_h, best_val = None, np.inf
    for h0 in starts:
        res = scipy.optimize.minimize(fun, h0.ravel(), jac=True, method="L-BFGS-B",
                                      bounds=[(0.0, r_max)] * h0.size,
                                      options={"maxiter": 5000, "gtol": 1e-10, "ftol": 1e-14})
        if res.fun < best_val:
            best_h, best_val = res.x.reshape(shape), float(res.fun)
    return best_h, best_val


@dataclass
class OnlineRun:
    """Result of one run: regret[t] of pi_t for t = 0..T (pi_0 = the data-free policy), final h and data."""

    regret: np.ndarray
    h: np.ndarray
    data: OnlineData
    best_action_draws: int = 0
    meta: dict = field(default_factory=dict)


def run_online(inst: Instance, method: str, rounds: int, beta: float, gamma: float, rng: np.random.Generator,
               ridge: float = RIDGE) -> OnlineRun:
    """Play ``rounds`` rounds of ``method`` (a key of ONLINE_METHODS); alpha = gamma * beta for the bonus methods.

    Regret is J(pi*) - J(pi_t) with J the true (unregularised) expected reward, the yardstick shared by all
    methods whatever their regulariser and beta.
    """
    link, bonus = ONLINE_METHODS[method]
    alpha = gamma * beta if bonus else 0.0
    ref, r = inst.pi_ref, inst.reward
    j_star = float(inst.context_probs @ r.max(1))
    best = r.argmax(1)
    data = OnlineData.empty(inst.n_contexts, inst.n_actions)
    fresh = np.full(ref.shape, 0.5 * inst.r_max)
    h = fresh.copy()
    pi = link_policy(ref, h, beta, link)[0]
    regret = np.empty(rounds + 1)
    regret[0] = j_star - float(inst.context_probs @ (pi * r).sum(1))
    seen_best = 0
    for t in range(rounds):
        x = rng.choice(inst.n_contexts, size=1, p=inst.context_probs)
        y1 = sample_actions(pi, x, rng)[0]
        y2 = sample_actions(ref if bonus else pi, x, rng)[0]
        x = int(x[0])
        seen_best += int(y1 == best[x]) + int(y2 == best[x])
        if bonus:
            data.ref_draws[x, y2] += 1
        if y1 != y2:
            first = rng.random() < 1.0 / (1.0 + np.exp(-(r[x, y1] - r[x, y2])))
            win, lose = (y1, y2) if first else (y2, y1)
            data.wins[x, win, lose] += 1
        data.rounds += 1
        # Online DPO's objective is convex (alpha = 0): the warm start suffices. XPO's is not (module docstring).
        h, _ = solve_online(data, ref, beta, alpha, link, inst.r_max, [h, fresh] if bonus else [h], ridge)
        pi = link_policy(ref, h, beta, link)[0]
        regret[t + 1] = j_star - float(inst.context_probs @ (pi * r).sum(1))
    return OnlineRun(regret, h, data, seen_best, {"method": method, "beta": beta, "alpha": alpha, "gamma": gamma})
