"""Evaluate a policy pi against pi_ref under a gold reward, on held-out prompts.

Gold view (what we care about), from samples y ~ pi(.|x) (ancestral sampling, settings recorded):

* gold reward: J(pi) = E_x E_{y~pi}[r*(x, y)], reported as mean and standard error over samples, clustered by
  prompt (``chipo.stats.clustered_mean_se``: samples of one prompt are correlated, the prompts are the units);
* win rate against pi_ref: P[r*(x, y) > r*(x, y')] + 1/2 P[r*(x, y) = r*(x, y')], y ~ pi, y' ~ pi_ref, every
  policy sample compared with every pi_ref sample of its prompt (so pi_ref against itself scores 1/2); the standard
  error is clustered by prompt (it ignores the noise of the fixed pi_ref samples);
* win rate against the data's reference responses, when the prompts carry them (same tie rule).

Distance from pi_ref, with z = pi(y|x) / pi_ref(y|x) for whole sequences and L = log z:

* KL(pi || pi_ref): the plain Monte-Carlo mean of L on samples of pi ("k1", unbiased, can be negative per sample)
  and ``chipo.divergences.KL.estimate_from_policy`` (E_pi[1/z - 1 + log z], "k3": unbiased, non-negative per
  sample; Schulman 2020);
* chi-squared, in the convention of Huang et al. 2024, D = 1/2 E_ref[(z - 1)^2] = 1/2 (E_pi[z] - 1):
  ``CHI2.estimate_from_policy`` = E_pi[(z - 2 + 1/z) / 2]. Caveat: its variance grows with E_pi[z^2], i.e. with
  the very distance it estimates, and a finite sample misses the rare y with huge z, so large values are noisy
  *lower* bounds; we report its standard error beside it. (chi-squared is the measure of uncertainty of the
  paper's analysis, and exactly the quantity that is hard to see from samples.)

Proxy view: implicit-reward accuracy on held-out (and, in a sweep, training) preference pairs, the fraction of
pairs where beta * (link(z+) - link(z-)) > 0 (ties 1/2) with the loss's own link and options -- what the optimiser
sees -- and the fraction of training pairs whose margin sits at the loss's clip (chiPO's [-2 r_max, 2 r_max]).

Where the mass goes (``data_mass``, worlds that can list their language's responses): pi's probability on the
training pairs' chosen responses, on their rejected responses, on every other response of the language and on text
outside it.

Exact view (``ExactSpace``): when the gold scorer can enumerate a finite partition of all responses on whose cells
its reward is constant (the embedded world, ``Language.exact_partition``), J and the win rates are computed exactly,
and KL and chi-squared over the partition are lower bounds of the full-sequence values (data-processing
inequality), tight when the lumped cells carry little mass. The Gao et al. (2023, arXiv 2210.10760) view plots the
gold reward against d = sqrt(KL).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from chipo.data.tokenize import encode_text_pairs
from chipo.divergences import CHI2, KL, clamped_exp
from chipo.generation import Samples, SamplingSettings, sample_responses
from chipo.lab.generate import response_logps
from chipo.losses import preference_loss
from chipo.models import pad_id
from chipo.monitor.signals import off_support_rate, off_support_threshold
from chipo.sequences import sequence_logps
from chipo.stats import clustered_mean_se, mean_se

CHI2_CAVEAT = ("Monte-Carlo chi-squared E_pi[(z - 2 + 1/z)/2] has variance growing with E_pi[z^2], the distance "
               "itself: with a finite sample, large values are noisy lower bounds.")


def win_indicator(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """[a > b] + 1/2 [a == b], elementwise (broadcasting)."""
    return (a > b).astype(float) + 0.5 * (a == b)


@dataclass
class Baseline:
    """pi_ref's side of the evaluation, computed once and shared by every checkpoint of a sweep."""

    prompts: list[str]
    references: list[str | None]
    reference_rewards: np.ndarray  # [P], nan where a prompt has no reference response
    ref_samples: Samples
    ref_rewards: np.ndarray  # [N] gold rewards of pi_ref's samples
    heldout: list[dict] | None = None  # held-out pairs from ``with_ref_logps`` (pi_ref's log-probs, lengths)
    exact: ExactSpace | None = None
    off_support_threshold: float | None = None  # chipo.monitor's calibration on pi_ref's own samples


@dataclass
class ExactSpace:
    """pi_ref's log-probs and the gold rewards on a partition of all responses (cells in a fixed order)."""

    ref_logps: np.ndarray  # [P, C] float64
    rewards: np.ndarray  # [P, C]
    well_formed: np.ndarray  # [P, C] bool: cells of text the gold scorer considers valid


def exact_sampling_problem(gold, settings: SamplingSettings) -> str | None:
    """Why exact metrics would not describe the policy that is sampled, or None when they do (or ``gold`` has no
    exact partition).

    The exact partition is of pi itself; the report puts exact numbers beside Monte-Carlo ones from samples (KL,
    lengths, examples), so the sampled distribution must be pi: temperature 1, no nucleus or top-k truncation,
    and room for every response of the language (``gold.exact_min_new_tokens``). A sampler cut at the
    response length returns unfinished text that the gold scorer reads as a well-formed response (measured on
    the embedded world with max_new_tokens 4: Monte-Carlo gold 0.59 vs exact 0.35)."""
    if not hasattr(gold, "exact_partition"):
        return None
    if settings.temperature != 1 or settings.top_p < 1 or settings.top_k > 0:
        return (f"exact metrics describe the policy itself, but sampling uses temperature {settings.temperature:g}, "
                f"top_p {settings.top_p:g}, top_k {settings.top_k}; sample with temperature=1 top_p=1 top_k=0, or "
                "set exact=false (Monte-Carlo metrics of the sampled policy)")
    need = getattr(gold, "exact_min_new_tokens", None)
    if need is not None and settings.max_new_tokens < need:
        return (f"max_new_tokens={settings.max_new_tokens} cuts responses of the gold scorer's language (up to "
                f"{need} tokens with EOS), so samples and exact metrics would describe different policies; set "
                f"max_new_tokens>={need}, or exact=false")
    return None


def check_exact_sampling(gold, settings: SamplingSettings) -> None:
    """``ConfigError`` (one line) when ``exact_sampling_problem`` finds one."""
    problem = exact_sampling_problem(gold, settings)
    if problem:
        from chipo.config import ConfigError

        raise ConfigError(problem)


def build_baseline(ref_model, tokenizer, prompts: Sequence[str], gold, *, references: Sequence[str | None] | None,
                   settings: SamplingSettings, num_samples: int, heldout_pairs: Sequence[dict] | None = None,
                   exact: bool = True, progress: bool = True) -> Baseline:
    """Sample pi_ref, score its samples and the reference responses, cache its log-probs on held-out pairs.
    With ``exact``, first checks that the sampling settings let exact metrics describe the sampled policy."""
    if exact:
        check_exact_sampling(gold, settings)
    prompts = list(prompts)
    references = list(references) if references is not None else [None] * len(prompts)
    # pi_ref's comparison samples use their own seed, far from the policies' (settings.seed + run seed), so no policy
    # sample shares its random stream with the pi_ref sample it is compared with.
    ref_settings = dataclasses.replace(settings, seed=settings.seed + 100_003)
    ref_samples = sample_responses(ref_model, tokenizer, prompts, num_samples, ref_settings, desc="sampling pi_ref",
                                   progress=progress)
    ref_rewards = np.asarray(gold.score(ref_samples.prompt_texts(), ref_samples.texts), dtype=float)
    have = [i for i, r in enumerate(references) if r]
    reference_rewards = np.full(len(prompts), np.nan)
    if have:
        reference_rewards[have] = gold.score([prompts[i] for i in have], [references[i] for i in have])
    heldout = with_ref_logps(ref_model, tokenizer, heldout_pairs) if heldout_pairs else None
    space = None
    if exact and hasattr(gold, "exact_partition"):
        space = ExactSpace(*gold.exact_partition(ref_model, tokenizer, prompts))
    # The overoptimization monitor's off-support threshold (chipo.monitor.signals), from the same pi_ref samples, so
    # every evaluation also records the gold-free signal the report's "when to stop" section tests against gold.
    ref_logps = sequence_logps(ref_model.eval(), _prompt_ids(tokenizer, prompts, ref_samples), ref_samples.response_ids,
                               pad_id(tokenizer))
    return Baseline(prompts, references, reference_rewards, ref_samples, ref_rewards, heldout, space,
                    off_support_threshold(ref_logps))


def _prompt_ids(tokenizer, prompts: Sequence[str], samples: Samples) -> list[list[int]]:
    return [tokenizer(prompts[i], add_special_tokens=True)["input_ids"] for i in samples.prompt_index]


def win_probability(p: np.ndarray, q: np.ndarray, r: np.ndarray, r_other: np.ndarray | None = None) -> float:
    """P[r(Y) > r(Y')] + 1/2 P[r(Y) = r(Y')], Y ~ p, Y' ~ q on cells with rewards r (O(C log C) by sorting).

    With ``r_other`` (a scalar), Y' is that fixed reward instead: the win probability against one response.
    """
    if r_other is not None:
        return float(p @ win_indicator(r, r_other))
    order = np.argsort(r, kind="stable")
    r_sorted, cum = r[order], np.concatenate([[0.0], np.cumsum(q[order])])
    below = cum[np.searchsorted(r_sorted, r, side="left")]
    upto = cum[np.searchsorted(r_sorted, r, side="right")]
    return float(p @ (below + 0.5 * (upto - below)))


def exact_metrics(logps: np.ndarray, baseline: Baseline) -> dict:
    """Exact J and win rates, and KL / chi-squared over the partition (lower bounds), averaged over prompts."""
    space = baseline.exact
    p, q = np.exp(logps), np.exp(space.ref_logps)
    with np.errstate(divide="ignore", invalid="ignore"):
        # 0 log 0 = 0; a cell pi_ref gives probability 0 (in float64) and pi does not would make KL infinite.
        kl_terms = np.where(p > 0, p * (logps - space.ref_logps), 0.0)
        chi_terms = np.where(p > 0, np.exp(2 * logps - space.ref_logps), 0.0)
    gold = (p * space.rewards).sum(1)
    wins = [win_probability(p[i], q[i], space.rewards[i]) for i in range(len(p))]
    wins_reference = [win_probability(p[i], q[i], space.rewards[i], baseline.reference_rewards[i])
                      for i in range(len(p)) if not np.isnan(baseline.reference_rewards[i])]
    kl = float(kl_terms.sum(1).mean())
    return {"gold": float(gold.mean()), "win_rate_vs_ref": float(np.mean(wins)),
            "win_rate_vs_reference": float(np.mean(wins_reference)) if wins_reference else None,
            "kl": kl, "chi2": float((0.5 * (chi_terms.sum(1) - 1.0)).mean()), "sqrt_kl": math.sqrt(max(kl, 0.0)),
            "mass_malformed": float((p * ~space.well_formed).sum(1).mean()),
            "total_mass": float(p.sum(1).mean())}


def pair_logps(model, tokenizer, pairs: Sequence[dict]) -> dict[str, torch.Tensor]:
    """log pi(y+ | x), log pi(y- | x) and the response token counts (EOS included) of preference rows."""
    prompts = [r["prompt"] for r in pairs]
    out = {}
    for side in ("chosen", "rejected"):
        texts = [r[side] for r in pairs]
        out[side] = response_logps(model, tokenizer, prompts, texts)
        _, ids = encode_text_pairs(tokenizer, prompts, texts)
        out[f"{side}_lengths"] = torch.tensor([len(i) for i in ids], dtype=torch.float64)
    return out


def with_ref_logps(ref_model, tokenizer, pairs: Sequence[dict]) -> list[dict]:
    """Copies of the preference rows with pi_ref's log-probs and the response lengths (computed once per set).

    Rows whose chosen and rejected texts are identical carry no preference (their margin is 0 whatever pi) and
    are left out, as training leaves them out (``drop_ties``)."""
    rows = [dict(r) for r in pairs if r["chosen"] != r["rejected"]]
    if not rows:
        return rows
    logps = pair_logps(ref_model, tokenizer, rows)
    for i, row in enumerate(rows):
        row["ref_chosen_logps"], row["ref_rejected_logps"] = float(logps["chosen"][i]), float(logps["rejected"][i])
        row["chosen_length"], row["rejected_length"] = float(logps["chosen_lengths"][i]), \
            float(logps["rejected_lengths"][i])
    return rows


def pair_metrics(policy, tokenizer, pairs: list[dict], loss: str, beta: float,
                 loss_options: dict | None = None) -> dict:
    """Implicit-reward accuracy (margin > 0, ties 1/2) and the fraction of pairs at the loss's clip, on rows from
    ``with_ref_logps``. Response lengths go to ``preference_loss`` (IPO normalises by them, RPO's term uses them)."""
    prompts = [r["prompt"] for r in pairs]
    chosen = response_logps(policy, tokenizer, prompts, [r["chosen"] for r in pairs])
    rejected = response_logps(policy, tokenizer, prompts, [r["rejected"] for r in pairs])
    column = lambda key: torch.tensor([r[key] for r in pairs], dtype=torch.float64)  # noqa: E731
    _, metrics = preference_loss(loss, chosen.double(), rejected.double(), column("ref_chosen_logps"),
                                 column("ref_rejected_logps"), beta=beta, chosen_lengths=column("chosen_length"),
                                 rejected_lengths=column("rejected_length"), **(loss_options or {}))
    return {"acc": float(win_indicator(metrics["rewards/margins"].numpy(), 0.0).mean()),
            "clip_frac": float(metrics["clipped"].numpy().mean())}


def implicit_reward_accuracy(policy, tokenizer, heldout: list[dict], loss: str, beta: float,
                             loss_options: dict | None = None) -> float:
    """Fraction of held-out pairs (rows from ``with_ref_logps``) whose implicit-reward margin is positive."""
    return pair_metrics(policy, tokenizer, heldout, loss, beta, loss_options)["acc"]


def language_responses(gold, prompts: Sequence[str]) -> dict[str, list[str]] | None:
    """Every in-language response of each prompt, for gold scorers whose language can list its response space
    (the embedded world: the letter strings of the response length with a positive gold reward); else None."""
    space = getattr(getattr(gold, "language", None), "response_space", None)
    if space is None:
        return None
    candidates = space()
    out = {}
    for x in dict.fromkeys(prompts):
        scores = np.asarray(gold.score([x] * len(candidates), candidates), dtype=float)
        out[x] = [y for y, r in zip(candidates, scores) if r > 0]
    return out


def data_mass(policy, tokenizer, pairs: list[dict], language: dict[str, list[str]]) -> dict:
    """Where pi puts its mass on the training prompts, in four disjoint parts that sum to 1 (per prompt, averaged):

    * ``mass_chosen``: the responses that are chosen in some training pair of the prompt;
    * ``mass_rejected``: those rejected in some pair and never chosen;
    * ``mass_other_language``: every other response of the language (``language``: prompt -> all of them);
    * ``mass_out_of_language``: everything else (malformed, too long, unfinished text), gold reward 0.

    Exact: pi(y | x) of every in-language response (EOS included) is computed, the rest is 1 minus their sum.
    """
    by_prompt: dict[str, dict[str, set]] = {}
    for r in pairs:
        sets = by_prompt.setdefault(r["prompt"], {"chosen": set(), "rejected": set()})
        sets["chosen"].add(r["chosen"])
        sets["rejected"].add(r["rejected"])
    prompts = list(by_prompt)
    items = []  # (prompt index, response, part)
    for i, x in enumerate(prompts):
        chosen, rejected = by_prompt[x]["chosen"], by_prompt[x]["rejected"] - by_prompt[x]["chosen"]
        inside = set(language[x])
        items += [(i, y, "chosen") for y in sorted(chosen)] + [(i, y, "rejected") for y in sorted(rejected)]
        items += [(i, y, "other_language") for y in sorted(inside - chosen - rejected)]
    probs = np.exp(response_logps(policy, tokenizer, [prompts[i] for i, _, _ in items],
                                  [y for _, y, _ in items]).double().numpy())
    parts = {name: np.zeros(len(prompts)) for name in ("chosen", "rejected", "other_language")}
    for (i, _, part), p in zip(items, probs):
        parts[part][i] += p
    total = sum(parts.values())
    out = {f"mass_{name}": float(v.mean()) for name, v in parts.items()}
    out["mass_out_of_language"] = float(np.clip(1.0 - total, 0.0, None).mean())
    return out


def divergence_stats(log_ratio: torch.Tensor, clusters: Sequence | None = None) -> dict:
    """KL (k1: mean log-ratio; k3: ``KL.estimate_from_policy``) and chi-squared (``CHI2.estimate_from_policy``)
    Monte-Carlo estimates with standard errors, from log pi - log pi_ref of the policy's own samples; the standard
    errors are clustered by ``clusters`` (the prompt of each sample) when given."""
    log_ratio = log_ratio.double()
    weight = clamped_exp(-log_ratio)  # importance weight 1/z of the "from policy" estimators

    def se(terms: np.ndarray) -> float:
        return clustered_mean_se(terms, clusters)[1] if clusters is not None else mean_se(terms)[1]

    out = {}
    out["kl_k1"], out["kl_k1_se"] = float(log_ratio.mean()), se(log_ratio.numpy())
    out["kl_k3"] = float(KL.estimate_from_policy(log_ratio))
    out["kl_k3_se"] = se((KL.f(log_ratio) * weight).numpy())
    out["chi2_mc"] = float(CHI2.estimate_from_policy(log_ratio))
    out["chi2_mc_se"] = se((CHI2.f(log_ratio) * weight).numpy())
    out["log_ratio_max"] = float(log_ratio.max())
    return out


@torch.no_grad()
def evaluate_policy(policy, ref_model, tokenizer, gold, baseline: Baseline, *, settings: SamplingSettings,
                    num_samples: int, loss: str | None = None, beta: float | None = None,
                    loss_options: dict | None = None, progress: bool = True) -> dict:
    """All metrics of the module docstring for ``policy`` (see ``build_baseline`` for pi_ref's side), and where
    the evaluation's time went (``seconds``: CPU seconds of this process in sampling, scoring, log-probs, exact
    metrics; CPU, not wall, so the split means the same on a machine shared with other jobs)."""
    clock = {"t": time.process_time()}
    seconds: dict = {}

    def lap(name: str) -> None:
        now = time.process_time()
        seconds[name] = seconds.get(name, 0.0) + now - clock["t"]
        clock["t"] = now

    samples = sample_responses(policy, tokenizer, baseline.prompts, num_samples, settings, desc="sampling policy",
                               progress=progress)
    lap("sampling")
    rewards = np.asarray(gold.score(samples.prompt_texts(), samples.texts), dtype=float)
    lap("scoring")
    index = np.asarray(samples.prompt_index)
    ref_index = np.asarray(baseline.ref_samples.prompt_index)
    wins = np.empty(len(rewards))
    for i in range(len(baseline.prompts)):
        mine, theirs = index == i, baseline.ref_rewards[ref_index == i]
        wins[mine] = win_indicator(rewards[mine][:, None], theirs[None, :]).mean(1)
    out: dict = {"n_prompts": len(baseline.prompts), "n_samples": len(rewards), "sampling": settings.as_dict()}
    # Samples of one prompt share it: standard errors cluster by prompt (CR1), not by sample.
    out["gold_mean"], out["gold_se"] = clustered_mean_se(rewards, index)
    out["win_rate_vs_ref"], out["win_rate_vs_ref_se"] = clustered_mean_se(wins, index)
    has_ref = ~np.isnan(baseline.reference_rewards[index])
    if has_ref.any():
        out["win_rate_vs_reference"], out["win_rate_vs_reference_se"] = clustered_mean_se(
            win_indicator(rewards[has_ref], baseline.reference_rewards[index][has_ref]), index[has_ref])

    # Log-ratios of the policy's own samples, on the exact sampled token ids (EOS included when emitted).
    prompt_ids = _prompt_ids(tokenizer, baseline.prompts, samples)
    pad = pad_id(tokenizer)
    policy.eval()
    ref_model.eval()
    lap("scoring")  # the win rates and standard errors above count with the gold scorer's time
    ref_logps = sequence_logps(ref_model, prompt_ids, samples.response_ids, pad).double().cpu()
    log_ratio = sequence_logps(policy, prompt_ids, samples.response_ids, pad).double().cpu() - ref_logps
    lap("log-probs")
    out.update(divergence_stats(log_ratio, index))
    if baseline.off_support_threshold is not None:
        out["off_support"] = off_support_rate(ref_logps, baseline.off_support_threshold)
    out["length_mean"], out["length_se"] = clustered_mean_se(samples.lengths(), index)
    out["finished_frac"] = float(np.mean(samples.finished))
    # A few samples of the first prompts, so the report can show what the policy writes.
    out["examples"] = [{"prompt": baseline.prompts[i], "response": samples.texts[k], "gold": float(rewards[k])}
                       for i in range(min(2, len(baseline.prompts))) for k in np.flatnonzero(index == i)[:3]]
    if baseline.heldout and loss is not None and beta is not None:
        out["implicit_acc"] = implicit_reward_accuracy(policy, tokenizer, baseline.heldout, loss, beta, loss_options)
        lap("log-probs")
    if baseline.exact is not None:
        out["exact"] = exact_metrics(gold.exact_partition(policy, tokenizer, baseline.prompts)[0], baseline)
        lap("exact metrics")
    out["seconds"] = seconds
    return out


def baseline_metrics(ref_model, tokenizer, gold, baseline: Baseline, *, settings: SamplingSettings,
                     num_samples: int, progress: bool = True) -> dict:
    """pi_ref evaluated like a policy (epoch 0 of every sweep cell): KL 0, win rate 1/2, implicit accuracy 1/2."""
    out = evaluate_policy(ref_model, ref_model, tokenizer, gold, baseline, settings=settings,
                          num_samples=num_samples, progress=progress)
    if baseline.heldout:
        out["implicit_acc"] = 0.5  # every margin is exactly 0 at pi = pi_ref
    return out
