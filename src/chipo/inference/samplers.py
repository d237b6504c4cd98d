"""Inference-time alignment: best-of-n and chi-squared-regularised rejection sampling (inference-time pessimism).

Both draw candidates from a base policy pi_ref, score them with a proxy reward r_hat, and return one.

Best-of-n (BoN): return argmax_i r_hat(x, y_i) of n samples. With distinct rewards its output law is
P(y) = F(r(y))^n - F(r(y)^-)^n (F the CDF of r_hat(x, Y), Y ~ pi_ref), and KL(BoN || pi_ref) <= log n - (n-1)/n,
with equality in the limit of a continuous reward distribution (Gao et al. 2023).
BoN is greedy: as n grows it converges to the proxy's argmax, however wrong the proxy is there (reward hacking).

InferenceTimePessimism (Huang, Block, Liu, Jiang, Krishnamurthy, Foster 2025, "Is Best-of-N the Best of Them?",
arXiv 2503.21878; algorithm as stated there, checked against two public write-ups of it):

1. draw y_1..y_N ~ pi_ref, and find lambda with (1/N) sum_i w(y_i) = 1, where
   w(y) = relu((r_hat(x, y) - lambda) / beta);
2. draw fresh y'_1..y'_N ~ pi_ref; accept y'_i with probability min(w(y'_i) / M, 1), M = (R_max - lambda) / beta,
   and return the first accepted one; if none is accepted, return one more fresh sample y'_{N+1}.

As N grows, lambda converges to the population normaliser and the output law to pi_ref(y) * w(y): the maximiser
of E_pi[r_hat] - beta * D_chi2(pi || pi_ref) (convention D_chi2 = 1/2 E_ref[(z - 1)^2] of Huang et al. 2024; its
optimum is pi/pi_ref = max(0, 1 + (r - lambda')/beta), the same family with lambda' = lambda + beta). The density
ratio stays bounded by M ~ 1 + R_max / beta, whatever N: more compute never moves the output further from pi_ref
("scaling-monotonic"). beta is the regularisation parameter (smaller beta: greedier, closer to BoN).

chipo writes w as ``divergence.link_inverse((r_hat - lambda) / beta)`` -- for chi2, max(0, u + 1), the paper's
relu up to that shift of lambda -- so the same sampler targets the D_f-regularised optimum of any f
(``divergence="kl"``: pi_ref * exp(r_hat / beta) / Z). ``R_max`` is the proxy's upper bound; when unknown we use the
largest reward among the N normalisation samples (a data-dependent choice; rewards above it are accepted w.p. 1).
Cost: 2N + 1 samples per prompt (N for lambda, N to accept from, one fallback) against BoN's N.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from chipo.divergences import CHI2, FDivergence, get_divergence

MODES = ("plain", "bon", "pessimism")


def samples_needed(mode: str, n: int) -> int:
    """Candidates per prompt a mode consumes: plain 1, bon n, pessimism 2n + 1."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    return {"plain": 1, "bon": n, "pessimism": 2 * n + 1}[mode]


def best_of_n_index(rewards: np.ndarray) -> np.ndarray:
    """argmax over the last axis (the first of tied maxima, i.e. a uniformly random one among exchangeable draws)."""
    return np.asarray(rewards).argmax(-1)


def _divergence(divergence: FDivergence | str) -> FDivergence:
    return get_divergence(divergence) if isinstance(divergence, str) else divergence


def regularized_weights(rewards: np.ndarray, lam: np.ndarray | float, beta: float,
                        divergence: FDivergence | str = CHI2) -> np.ndarray:
    """w = (f')^{-1}((r - lambda) / beta): the density ratio pi*/pi_ref of the regularised optimum (float64)."""
    u = (np.asarray(rewards, dtype=np.float64) - np.asarray(lam, dtype=np.float64)[..., None]) / beta
    return _divergence(divergence).link_inverse(torch.from_numpy(u)).numpy()


def pessimism_normalizer(rewards: np.ndarray, beta: float, probs: np.ndarray | None = None,
                         divergence: FDivergence | str = CHI2, iterations: int = 100) -> np.ndarray:
    """lambda [...] with mean_i w_i = 1 over the last axis (``probs``-weighted if given), by bisection.

    sum_i p_i w_i is non-increasing in lambda; with u0 = f'(1) the root lies in
    [min r - beta u0, max r - beta u0] (there every w is >= 1, resp. <= 1).
    """
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    div = _divergence(divergence)
    r = np.asarray(rewards, dtype=np.float64)
    p = np.full(r.shape, 1.0 / r.shape[-1]) if probs is None else np.broadcast_to(np.asarray(probs, float), r.shape)
    u0 = float(div.link(torch.zeros((), dtype=torch.float64)))
    lo, hi = r.min(-1) - beta * u0, r.max(-1) - beta * u0
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        too_much = (p * regularized_weights(r, mid, beta, div)).sum(-1) > 1.0
        lo, hi = np.where(too_much, mid, lo), np.where(too_much, hi, mid)
    return 0.5 * (lo + hi)


def acceptance_probabilities(rewards: np.ndarray, lam: np.ndarray | float, beta: float, r_max: np.ndarray | float,
                             divergence: FDivergence | str = CHI2) -> np.ndarray:
    """min(w(y) / M, 1) with M = w at R_max (for chi2: (R_max - lambda)/beta in the paper's relu form)."""
    weights = regularized_weights(rewards, lam, beta, divergence)
    bound = regularized_weights(np.asarray(r_max, dtype=np.float64)[..., None], lam, beta, divergence)
    return np.minimum(weights / np.maximum(bound, np.finfo(np.float64).tiny), 1.0)


def pessimism_index(rewards: np.ndarray, n: int, beta: float, rng: np.random.Generator, *,
                    r_max: float | None = None, lam: float | None = None,
                    divergence: FDivergence | str = CHI2) -> tuple[int, dict]:
    """InferenceTimePessimism on one prompt's 2n + 1 candidate rewards: columns [0, n) normalise, [n, 2n) are
    accepted or rejected in order, 2n is the fallback. Returns the chosen column and diagnostics.
    ``lam`` overrides the normaliser (for tests / an externally known lambda)."""
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.shape != (2 * n + 1,):
        raise ValueError(f"pessimism with n={n} needs {2 * n + 1} candidate rewards, got shape {rewards.shape}")
    first, second = rewards[:n], rewards[n:2 * n]
    lam = float(pessimism_normalizer(first, beta, divergence=divergence)) if lam is None else float(lam)
    r_max = float(first.max()) if r_max is None else float(r_max)
    accept = acceptance_probabilities(second, lam, beta, r_max, divergence)
    hits = np.flatnonzero(rng.random(n) < accept)
    index = n + int(hits[0]) if hits.size else 2 * n
    return index, {"lambda": lam, "r_max": r_max, "accepted": bool(hits.size), "accept_mean": float(accept.mean())}


def select(mode: str, rewards: np.ndarray, n: int, *, beta: float = 1.0, r_max: float | None = None,
           rng: np.random.Generator | None = None, divergence: FDivergence | str = CHI2) -> tuple[np.ndarray, list]:
    """Chosen candidate column per prompt from a pool of rewards [P, m] (only the first ``samples_needed`` columns
    are used, so one pool of samples serves every n of a scaling curve)."""
    need = samples_needed(mode, n)
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 2 or rewards.shape[1] < need:
        raise ValueError(f"mode {mode} with n={n} needs rewards of shape [P, >= {need}], got {rewards.shape}")
    if mode == "plain":
        return np.zeros(len(rewards), dtype=int), [{} for _ in rewards]
    if mode == "bon":
        return best_of_n_index(rewards[:, :n]), [{} for _ in rewards]
    rng = rng if rng is not None else np.random.default_rng(0)
    picks = [pessimism_index(row[:need], n, beta, rng, r_max=r_max, divergence=divergence) for row in rewards]
    return np.array([i for i, _ in picks], dtype=int), [info for _, info in picks]


# ---------------------------------------------------------------------------------------------------- exact laws


def best_of_n_distribution(ref_probs: np.ndarray, rewards: np.ndarray, n: int) -> np.ndarray:
    """Exact output law of BoN over a finite response set (ties: split in proportion to pi_ref)."""
    q, r = np.asarray(ref_probs, dtype=np.float64), np.asarray(rewards, dtype=np.float64)
    out = np.zeros_like(q)
    below = 0.0
    for value in np.unique(r):
        tied = r == value
        mass = q[tied].sum()
        p_max = (below + mass) ** n - below ** n  # P(max reward == value)
        out[tied] = p_max * q[tied] / mass if mass > 0 else 0.0
        below += mass
    return out


def pessimism_distribution(ref_probs: np.ndarray, rewards: np.ndarray, n: int, beta: float, r_max: float,
                           lam: float | None = None, divergence: FDivergence | str = CHI2) -> np.ndarray:
    """Exact output law of the rejection step for a *given* lambda (default: the population normaliser, the
    N -> infinity limit of step 1): P(y) = q a (1 - (1 - abar)^n) / abar + (1 - abar)^n q, a = min(w / M, 1)."""
    q, r = np.asarray(ref_probs, dtype=np.float64), np.asarray(rewards, dtype=np.float64)
    if lam is None:
        lam = float(pessimism_normalizer(r, beta, probs=q, divergence=divergence))
    a = acceptance_probabilities(r, lam, beta, r_max, divergence)
    abar = float((q * a).sum())
    miss = (1.0 - abar) ** n
    accepted = q * a * ((1.0 - miss) / abar if abar > 0 else float(n))
    return accepted + miss * q


def best_of_n_kl_bound(n: int) -> float:
    """log n - (n - 1)/n: KL(BoN || pi_ref) for a continuous reward distribution, an upper bound otherwise."""
    return math.log(n) - (n - 1) / n


# ---------------------------------------------------------------------------------------------------- end to end


@dataclass
class Selection:
    """One response per prompt chosen by a sampling mode, with its proxy reward and the candidates it came from."""

    mode: str
    n: int
    prompts: list[str]
    texts: list[str]
    response_ids: list[list[int]]
    proxy_rewards: np.ndarray  # [P] proxy reward of each chosen response
    chosen: np.ndarray  # [P] candidate column chosen
    candidate_rewards: np.ndarray  # [P, m] proxy rewards of all candidates
    info: list[dict] = field(default_factory=list)


def sample_with_mode(model, tokenizer, prompts: Sequence, *, mode: str, n: int, reward, beta: float = 1.0,
                     r_max: float | None = None, max_new_tokens: int = 64, temperature: float = 1.0,
                     seed: int = 0, batch_size: int = 64, max_prompt_length: int | None = None,
                     generator=None, divergence: FDivergence | str = CHI2) -> Selection:
    """Sample candidates from ``model`` (pi_ref), score them with ``reward`` and pick one per prompt by ``mode``.

    ``reward`` has ``score(prompts, responses)`` (``chipo.rewards.load_scorer``); ``generator`` is an
    optional backend with the signature of ``chipo.generation.generate`` minus model/tokenizer (e.g. a
    ``VLLMGenerator``'s bound ``generate``). The lab calls this per n, or samples one pool and calls ``select``.
    """
    from chipo.generation import encode_prompts, generate
    from chipo.rewards import score_checked

    need = samples_needed(mode, n)
    prompt_ids, texts = encode_prompts(tokenizer, prompts, max_prompt_length)
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, batch_size=batch_size)
    gen = (generator(prompt_ids, need, **kwargs) if generator is not None
           else generate(model, tokenizer, prompt_ids, need, **kwargs))
    scores = score_checked(reward, [texts[i] for i in gen.prompt_index], gen.texts).reshape(len(prompts), need)
    chosen, info = select(mode, scores, n, beta=beta, r_max=r_max, rng=np.random.default_rng(seed),
                          divergence=divergence)
    rows = [i * need + int(c) for i, c in enumerate(chosen)]
    return Selection(mode, n, texts, [gen.texts[j] for j in rows], [gen.response_ids[j] for j in rows],
                     scores[np.arange(len(prompts)), chosen], chosen, scores, info)
