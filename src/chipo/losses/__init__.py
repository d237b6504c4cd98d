"""Preference losses as pure functions of per-sequence log-probs.

A loss is a *link* (an f-divergence's f', ``chipo.divergences``) composed with a *pairwise loss* of the
margin (``chipo.losses.pairwise``)::

    L+ = logp_policy(y+) - logp_ref(y+),  L- likewise          (whole-sequence log-ratios, fp32)
    L  = L / response length                                    if length_normalize (IPO, as TRL)
    r+ = beta * (link(L+) - link(0)),  r- likewise              (implicit rewards, 0 at pi = pi_ref)
    r  = clip(r, -reward_bound, reward_bound)                   if reward_bound given (experimental)
    margin = r+ - r-  = beta * (link(L+) - link(L-))            (computed as one stable link difference)
    margin = clip(margin, -2 r_max, 2 r_max)   if r_max given   (chiPO, Huang et al. 2024, Alg. 1)
           min(margin, 2 r_max)                if margin_clip = "upper" (the push-up side only; see below)
    loss   = pairwise(margin) + sft_weight * NLL(y+)            (RPO, Liu et al. 2024, arXiv 2405.16436)

``margin_clip="upper"`` keeps the clip where it stops a fitted pair from pulling further away from pi_ref
(margin > 2 r_max) and removes it where it silences the push-down of an over-represented rejected response. With
the logistic loss and m = beta (phi(z+) - phi(z-)), phi the link, the gradient of -log sigmoid(m) is
-sigmoid(-m) beta (phi'(z+) z+ grad log pi(y+) - phi'(z-) z- grad log pi(y-)); for chiPO phi'(z) z = z + 1. Past
the two-sided clip (|m| > 2 r_max) it is exactly 0; with "upper", a pair with m < -2 r_max -- typically a rejected
y- that the policy samples far more than pi_ref (z- >> 1) -- keeps it, and lowers log pi(y-) with weight
sigmoid(-m) beta (z- + 1) ~ beta (z- + 1). Offline the pairs come from pi_ref and the difference rarely shows;
online (pairs from pi) it decides whether the policy's own off-support samples are pushed back. That push is
unbounded (beta z- for z- ~ 1e15), one sample's gradient can swamp a step, so ``margin_clip="log"`` keeps the
paper's clipped value and, past the band, gives the margin the gradient of the log link beta (L+ - L-) -- chiPO's
link is z + log z, and this drops only its chi-squared part z there: the gradient becomes DPO's at the clipped
margin, -sigmoid(-c) beta (grad log pi(y+) - grad log pi(y-)), c = +-2 r_max. Below the band, sigmoid(2 r_max)
~ 1, so an over-represented rejected y- is lowered at DPO's bounded rate beta; above it, sigmoid(-2 r_max) =
4.5e-5 (r_max 5), so a fitted pair stays all but still.

Named presets (``LOSSES``) fix the link, the pairwise loss and defaults; any option can be overridden,
e.g. ``preference_loss("hinge", ..., link="chi2mix")`` is a chi-squared hinge loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from chipo.divergences import EXP_CLAMP, get_divergence
from chipo.losses.pairwise import PAIRWISE_LOSSES

CHIPO_DEFAULT_R_MAX = 5.0
"""Default reward bound of chiPO's margin clip [-2 r_max, 2 r_max].

The paper (Alg. 1) assumes rewards in [0, R_max] and clips the implicit-reward margin at 2 R_max, past
which the gradient is zero: a pair fitted that confidently stops pulling the policy away from pi_ref.
Bradley-Terry rewards are only defined up to the data's noise: a reward gap of 5 nats already means the
preferred answer wins 99.3% of the time (sigmoid(5)), beyond what human preference data supports, so 5 never
binds while the model fits the data but caps the tail (loss floor -log sigmoid(10) = 4.5e-5). Set r_max to the
gold reward range when it is known (the lab does), or None to disable the clip.
"""


@dataclass(frozen=True)
class LossSpec:
    """A named preset: link (divergence name), pairwise loss name and default options."""

    link: str
    pairwise: str
    description: str
    defaults: dict[str, Any] = field(default_factory=dict)


LOSSES: dict[str, LossSpec] = {
    "dpo": LossSpec("kl", "logistic", "DPO (Rafailov et al. 2023): log link, logistic loss"),
    "chipo": LossSpec("chi2mix", "logistic", "chiPO (Huang et al. 2024): link z + log z, clipped margin, logistic",
                      {"r_max": CHIPO_DEFAULT_R_MAX}),
    "ipo": LossSpec("kl", "squared", "IPO (Azar et al. 2023): log link, squared loss, log-probs averaged over "
                    "the response (as TRL)", {"length_normalize": True}),
    "hinge": LossSpec("kl", "hinge", "SLiC hinge (Zhao et al. 2023): log link, hinge loss"),
    "robust": LossSpec("kl", "robust", "robust DPO (Chowdhury et al. 2024), needs label_smoothing",
                       {"label_smoothing": 0.1}),
    "cdpo": LossSpec("kl", "logistic", "conservative DPO: logistic loss with label smoothing",
                     {"label_smoothing": 0.1}),
    "chi2": LossSpec("chi2", "logistic", "pure chi-squared link z - 1, logistic loss (bounded-below link)"),
    "fkl": LossSpec("fkl", "logistic", "f-DPO with forward KL link -1/z (Wang et al. 2023)"),
    "js": LossSpec("js", "logistic", "f-DPO with Jensen-Shannon link log(2z/(1+z))"),
    "alpha": LossSpec("alpha", "logistic", "f-DPO with alpha-divergence link (z^(a-1) - 1)/(a-1) (TRL's alpha)",
                      {"alpha": 0.5}),
}

_OPTIONS = ("link", "pairwise", "r_max", "margin_clip", "label_smoothing", "alpha", "exp_clamp", "length_normalize",
            "sft_weight", "reward_bound")
MARGIN_CLIPS = ("both", "upper", "log")
"""Margin clips: ``both`` [-2 r_max, 2 r_max] (the paper's), ``upper`` only the push-up side, ``log`` the paper's
value with the log link's (DPO's) gradient past the band (module docstring)."""


def loss_names() -> list[str]:
    """The registered preset names."""
    return sorted(LOSSES)


def resolve_options(name: str, **options: Any) -> dict[str, Any]:
    """Preset defaults merged with overrides; validates the name and every option."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; valid: {', '.join(loss_names())}")
    unknown = set(options) - set(_OPTIONS)
    if unknown:
        raise ValueError(f"unknown loss option(s) {sorted(unknown)}; valid: {', '.join(_OPTIONS)}")
    spec = LOSSES[name]
    resolved: dict[str, Any] = {"link": spec.link, "pairwise": spec.pairwise, "r_max": None, "margin_clip": "both",
                                "label_smoothing": 0.0, "alpha": 0.5, "exp_clamp": EXP_CLAMP,
                                "length_normalize": False, "sft_weight": 0.0, "reward_bound": None}
    resolved.update(spec.defaults)
    resolved.update({k: v for k, v in options.items() if v is not None or k == "r_max"})
    if resolved["pairwise"] not in PAIRWISE_LOSSES:
        raise ValueError(f"unknown pairwise loss {resolved['pairwise']!r}; valid: {', '.join(PAIRWISE_LOSSES)}")
    if resolved["r_max"] is not None and not resolved["r_max"] > 0:
        raise ValueError(f"r_max must be positive or None, got {resolved['r_max']}")
    if resolved["margin_clip"] not in MARGIN_CLIPS:
        raise ValueError(f"margin_clip must be one of {', '.join(MARGIN_CLIPS)}, got {resolved['margin_clip']!r}")
    if not 0.0 <= resolved["label_smoothing"] < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {resolved['label_smoothing']}")
    if not (isinstance(resolved["sft_weight"], (int, float)) and 0.0 <= resolved["sft_weight"] < math.inf):
        raise ValueError(f"sft_weight must be a finite number >= 0, got {resolved['sft_weight']}")
    if resolved["reward_bound"] is not None and not resolved["reward_bound"] > 0:
        raise ValueError(f"reward_bound must be positive or None, got {resolved['reward_bound']}")
    if not isinstance(resolved["length_normalize"], bool):
        raise ValueError(f"length_normalize must be true or false, got {resolved['length_normalize']!r}")
    get_divergence(resolved["link"], **({"alpha": resolved["alpha"]} if resolved["link"] == "alpha" else {}))
    return resolved


def _lengths(lengths: Tensor | None, like: Tensor, which: str, why: str) -> Tensor:
    if lengths is None:
        raise ValueError(f"{why} needs {which}_lengths (response token counts per pair)")
    lengths = torch.as_tensor(lengths, device=like.device).to(like.dtype)
    if lengths.shape != like.shape:
        raise ValueError(f"{which}_lengths has shape {tuple(lengths.shape)}, expected {tuple(like.shape)}")
    return lengths


def preference_loss(
    name: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
    mask: Tensor | None = None,
    **options: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-example preference losses [B] and detached per-example metrics (each [B]).

    Inputs are per-sequence log-probs (sums over response tokens), shape [B], any float dtype; all
    arithmetic runs in fp32 (fp64 if given fp64) so margins stay exact under bf16 training.
    ``chosen_lengths`` / ``rejected_lengths`` ([B] response token counts) are needed by ``length_normalize``
    and ``sft_weight``. ``mask`` ([B] bool, optional): the pairs that count (online: those with a verdict); the
    others get loss 0 and stay out of the SFT term's token total.

    Options (see the module docstring for where each acts):

    * ``link``, ``pairwise``: override the preset's link (divergence name) and pairwise loss.
    * ``r_max``: chiPO's margin clip [-2 r_max, 2 r_max] (None disables it).
    * ``margin_clip``: ``both`` (default, the paper's) or ``upper`` (clip only margins above 2 r_max).
    * ``label_smoothing``: label-flip rate of the robust / cdpo losses.
    * ``alpha``: alpha-divergence parameter in TRL's convention (link (z^(alpha-1) - 1)/(alpha - 1)).
    * ``exp_clamp``: largest exponent passed to exp (see ``chipo.divergences``).
    * ``length_normalize``: divide each log-ratio by its response length (policy and reference log-probs
      alike). Default True for ``ipo`` -- TRL 1.16's IPO, so beta means the same as there -- False otherwise.
    * ``sft_weight``: add sft_weight x the token-mean NLL of the chosen responses (RPO, Liu et al. 2024). Each
      pair's term is -logp(y+) * B / (chosen tokens in the batch's counted pairs), so the batch mean is TRL's
      "sft" loss over the counted pairs.
    * ``reward_bound``: experimental; clip each implicit reward into [-reward_bound, reward_bound] (zero
      gradient outside) before forming the margin. The margin clip lets the rejected reward fall without limit
      once the margin is inside the band; this brakes that push-down side too.

    Metrics: ``rewards/chosen`` and ``rewards/rejected`` (implicit rewards beta * (link(z) - link(1)), 0 at
    pi = pi_ref, before ``reward_bound``), ``rewards/margins`` (their difference, before any clip),
    ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected`` (summed), ``logratio/chosen`` and
    ``logratio/rejected`` (summed L, the distribution-shift signal), ``clipped`` (1 where the clip or the
    reward bound leaves the pair's preference term without gradient).
    """
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    opts = resolve_options(name, **options)
    divergence = get_divergence(opts["link"], **({"alpha": opts["alpha"]} if opts["link"] == "alpha" else {}))
    compute_dtype = torch.float64 if policy_chosen_logps.dtype == torch.float64 else torch.float32
    policy_chosen = policy_chosen_logps.to(compute_dtype)
    chosen_logratio = policy_chosen - ref_chosen_logps.to(compute_dtype)
    rejected_logratio = policy_rejected_logps.to(compute_dtype) - ref_rejected_logps.to(compute_dtype)

    chosen_score, rejected_score = chosen_logratio, rejected_logratio
    if opts["length_normalize"]:
        why = f"length_normalize (on by default for {name})" if name == "ipo" else "length_normalize"
        # An empty response has log-ratio 0; clamping its length at 1 avoids 0/0 (TRL clamps the same way).
        chosen_score = chosen_logratio / _lengths(chosen_lengths, chosen_logratio, "chosen", why).clamp(min=1.0)
        rejected_score = rejected_logratio / _lengths(rejected_lengths, rejected_logratio, "rejected",
                                                      why).clamp(min=1.0)

    c = opts["exp_clamp"]
    origin = torch.zeros_like(chosen_score)
    chosen_reward = beta * divergence.link_difference(chosen_score, origin, c)
    rejected_reward = beta * divergence.link_difference(rejected_score, origin, c)
    # One link difference, not chosen_reward - rejected_reward: exact in sign and size past exp's clamp.
    margin = beta * divergence.link_difference(chosen_score, rejected_score, c)
    effective = margin
    no_gradient = torch.zeros_like(margin, dtype=torch.bool)
    if opts["reward_bound"] is not None:
        bound = opts["reward_bound"]
        bounded_chosen = torch.clamp(chosen_reward, -bound, bound)
        bounded_rejected = torch.clamp(rejected_reward, -bound, bound)
        effective = bounded_chosen - bounded_rejected
        no_gradient = (bounded_chosen != chosen_reward) & (bounded_rejected != rejected_reward)
    clipped_margin = effective
    if opts["r_max"] is not None:
        bound = 2.0 * opts["r_max"]
        # clamp: identity inside the band, constant (zero gradient) outside -- exactly the paper's clip.
        lower = None if opts["margin_clip"] == "upper" else -bound
        clipped_margin = torch.clamp(effective, lower, bound)
        if opts["margin_clip"] == "log":  # value unchanged; past the band, the gradient of beta (L+ - L-)
            log_margin = beta * (chosen_score - rejected_score)
            outside = (effective.detach() < -bound) | (effective.detach() > bound)
            clipped_margin = clipped_margin + torch.where(outside, log_margin - log_margin.detach(), 0.0)
    losses = PAIRWISE_LOSSES[opts["pairwise"]](clipped_margin, beta=beta, label_smoothing=opts["label_smoothing"])
    counted = torch.ones_like(policy_chosen, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    if opts["sft_weight"]:
        lengths = _lengths(chosen_lengths, policy_chosen, "chosen", "sft_weight")
        # Only counted pairs enter the token total: a dropped pair's NLL is not in the sum, so its tokens must not
        # be in the denominator either (else each dropped pair dilutes sft_weight).
        tokens = torch.where(counted, lengths, torch.zeros_like(lengths)).sum().clamp(min=1.0)
        losses = losses - opts["sft_weight"] * policy_chosen * (policy_chosen.numel() / tokens)
    if mask is not None:
        losses = torch.where(counted, losses, torch.zeros_like(losses))

    metrics = {
        "rewards/chosen": chosen_reward.detach(),
        "rewards/rejected": rejected_reward.detach(),
        "rewards/margins": margin.detach(),
        "rewards/accuracies": (margin.detach() > 0).to(compute_dtype),
        "logps/chosen": policy_chosen_logps.detach().to(compute_dtype),
        "logps/rejected": policy_rejected_logps.detach().to(compute_dtype),
        "logratio/chosen": chosen_logratio.detach(),
        "logratio/rejected": rejected_logratio.detach(),
        "clipped": ((clipped_margin.detach() != effective.detach()) | no_gradient).to(compute_dtype),
    }
    return losses, metrics


__all__ = ["LOSSES", "MARGIN_CLIPS", "LossSpec", "preference_loss", "loss_names", "resolve_options",
           "CHIPO_DEFAULT_R_MAX"]
