"""Preference losses as pure functions of per-sequence log-probs.

A loss is a *link* (an f-divergence's f', ``chipo.divergences``) composed with a *pairwise loss* of the
margin (``chipo.losses.pairwise``)::

    L+ = logp_policy(y+) - logp_ref(y+),  L- likewise          (whole-sequence log-ratios, fp32)
    margin = beta * (link(L+) - link(L-))                       (implicit-reward difference)
    margin = clip(margin, -2 r_max, 2 r_max)   if r_max given   (chiPO, Huang et al. 2024, Alg. 1)
    loss   = pairwise(margin)

Named presets (``LOSSES``) fix the link, the pairwise loss and defaults; any option can be overridden,
e.g. ``preference_loss("hinge", ..., link="chi2mix")`` is a chi-squared hinge loss.
"""

from __future__ import annotations

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
    "ipo": LossSpec("kl", "squared", "IPO (Azar et al. 2023): log link, squared loss"),
    "hinge": LossSpec("kl", "hinge", "SLiC hinge (Zhao et al. 2023): log link, hinge loss"),
    "robust": LossSpec("kl", "robust", "robust DPO (Chowdhury et al. 2024), needs label_smoothing",
                       {"label_smoothing": 0.1}),
    "cdpo": LossSpec("kl", "logistic", "conservative DPO: logistic loss with label smoothing",
                     {"label_smoothing": 0.1}),
    "chi2": LossSpec("chi2", "logistic", "pure chi-squared link z - 1, logistic loss (bounded-below link)"),
    "fkl": LossSpec("fkl", "logistic", "f-DPO with forward KL link -1/z (Wang et al. 2023)"),
    "js": LossSpec("js", "logistic", "f-DPO with Jensen-Shannon link log(2z/(1+z))"),
    "alpha": LossSpec("alpha", "logistic", "f-DPO with alpha-divergence link (1 - z^-a)/a", {"alpha": 0.5}),
}

_OPTIONS = ("link", "pairwise", "r_max", "label_smoothing", "alpha", "exp_clamp")


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
    resolved: dict[str, Any] = {"link": spec.link, "pairwise": spec.pairwise, "r_max": None,
                                "label_smoothing": 0.0, "alpha": 0.5, "exp_clamp": EXP_CLAMP}
    resolved.update(spec.defaults)
    resolved.update({k: v for k, v in options.items() if v is not None or k == "r_max"})
    if resolved["pairwise"] not in PAIRWISE_LOSSES:
        raise ValueError(f"unknown pairwise loss {resolved['pairwise']!r}; valid: {', '.join(PAIRWISE_LOSSES)}")
    if resolved["r_max"] is not None and not resolved["r_max"] > 0:
        raise ValueError(f"r_max must be positive or None, got {resolved['r_max']}")
    if not 0.0 <= resolved["label_smoothing"] < 0.5:
        raise ValueError(f"label_smoothing must lie in [0, 0.5), got {resolved['label_smoothing']}")
    get_divergence(resolved["link"], **({"alpha": resolved["alpha"]} if resolved["link"] == "alpha" else {}))
    return resolved


def preference_loss(
    name: str,
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    **options: Any,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-example preference losses [B] and detached per-example metrics (each [B]).

    Inputs are per-sequence log-probs (sums over response tokens), shape [B], any float dtype; all
    arithmetic runs in fp32 (fp64 if given fp64) so margins stay exact under bf16 training.
    Options: ``link``, ``pairwise``, ``r_max`` (None disables the clip), ``label_smoothing``, ``alpha``,
    ``exp_clamp`` (largest exponent passed to exp, see ``chipo.divergences``).

    Metrics: ``rewards/chosen`` and ``rewards/rejected`` (implicit rewards beta * link(z)),
    ``rewards/margins`` (unclipped), ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``,
    ``logratio/chosen`` and ``logratio/rejected`` (L, the distribution-shift signal), ``clipped``.
    """
    if not beta > 0:
        raise ValueError(f"beta must be positive, got {beta}")
    opts = resolve_options(name, **options)
    divergence = get_divergence(opts["link"], **({"alpha": opts["alpha"]} if opts["link"] == "alpha" else {}))
    compute_dtype = torch.float64 if policy_chosen_logps.dtype == torch.float64 else torch.float32
    chosen_logratio = policy_chosen_logps.to(compute_dtype) - ref_chosen_logps.to(compute_dtype)
    rejected_logratio = policy_rejected_logps.to(compute_dtype) - ref_rejected_logps.to(compute_dtype)

    chosen_reward = beta * divergence.link(chosen_logratio, opts["exp_clamp"])
    rejected_reward = beta * divergence.link(rejected_logratio, opts["exp_clamp"])
    margin = chosen_reward - rejected_reward
    clipped_margin = margin
    if opts["r_max"] is not None:
        bound = 2.0 * opts["r_max"]
        # clamp: identity inside the band, constant (zero gradient) outside -- exactly the paper's clip.
        clipped_margin = torch.clamp(margin, -bound, bound)
    losses = PAIRWISE_LOSSES[opts["pairwise"]](clipped_margin, beta=beta, label_smoothing=opts["label_smoothing"])

    metrics = {
        "rewards/chosen": chosen_reward.detach(),
        "rewards/rejected": rejected_reward.detach(),
        "rewards/margins": margin.detach(),
        "rewards/accuracies": (margin.detach() > 0).to(compute_dtype),
        "logps/chosen": policy_chosen_logps.detach().to(compute_dtype),
        "logps/rejected": policy_rejected_logps.detach().to(compute_dtype),
        "logratio/chosen": chosen_logratio.detach(),
        "logratio/rejected": rejected_logratio.detach(),
        "clipped": (clipped_margin.detach() != margin.detach()).to(compute_dtype),
    }
    return losses, metrics


__all__ = ["LOSSES", "LossSpec", "preference_loss", "loss_names", "resolve_options", "CHIPO_DEFAULT_R_MAX"]
