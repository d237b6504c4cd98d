"""Gold-free overoptimization signals: pure functions of log-probabilities a user can compute without a gold reward.

The lab's account of overoptimization (Huang et al. 2024, arXiv 2407.13399, section 3; Gao et al. 2023,
arXiv 2210.10760) is the same in every run that overoptimizes: probability mass leaves pi_ref's support, the chosen
responses lose probability too, KL and chi-squared to pi_ref grow, and the held-out implicit-reward accuracy stalls
while the training accuracy climbs. Each function below measures one of these from samples and log-probs alone:

* ``divergence_signals``: Monte-Carlo KL(pi || pi_ref) (k1 and k3) and chi-squared (the 1/2 convention of Huang et al.
  2024) on the policy's own samples, from ``chipo.divergences`` (the estimators live there, once);
* ``off_support_threshold`` / ``off_support_rate``: the fraction of the policy's samples to which pi_ref gives a
  log-prob below the ``quantile``-quantile of pi_ref's own samples' log-probs -- by construction about ``quantile``
  at pi = pi_ref, and near 1 when the policy writes text pi_ref would not;
* ``displacement_signals``: mean log pi - log pi_ref of held-out chosen and rejected responses (likelihood
  displacement: the chosen log-ratio falling below 0 means the chosen responses lose mass too);
* ``pair_signals``: held-out implicit-reward accuracy, mean margin and clip rate with the loss's own link and options
  (``chipo.losses.preference_loss``, what the optimiser sees);
* ``sample_signals``: response length and the policy's sequence entropy H(pi(.|x)) ~ -E_pi[log pi(y|x)];
* ``judge_disagreement``: for online training with several judges or reward models, how often two of them order
  a pair of samples differently.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from torch import Tensor

from chipo.divergences import CHI2, KL
from chipo.losses import preference_loss


def divergence_signals(log_ratio: Tensor) -> dict[str, float]:
    """KL and chi-squared to pi_ref from L = log pi(y|x) - log pi_ref(y|x) of samples y ~ pi [N].

    ``kl_k1`` = E_pi[L] (unbiased, noisy), ``kl_k3`` = ``KL.estimate_from_policy`` = E_pi[1/z - 1 + log z] (unbiased,
    non-negative per sample; Schulman 2020), ``chi2`` = ``CHI2.estimate_from_policy`` = E_pi[(z - 2 + 1/z)/2]
    (Huang et al. 2024's D_chi2 = 1/2 E_ref[(z - 1)^2]; a noisy lower bound when large: a finite sample misses the
    rare y with huge z), ``log_ratio_max`` the largest L. Computed in float64 (exp is clamped inside the estimators).
    """
    L = log_ratio.detach().double().cpu()
    return {"kl_k1": float(L.mean()), "kl_k3": float(KL.estimate_from_policy(L)),
            "chi2": float(CHI2.estimate_from_policy(L)), "log_ratio_max": float(L.max())}


def off_support_threshold(ref_logps: Tensor, quantile: float = 0.02) -> float:
    """The ``quantile``-quantile of log pi_ref(y|x) over pi_ref's own samples y ~ pi_ref (the calibration).

    One threshold over all prompts' samples (the log-probs of one length-bounded response space are comparable
    across prompts; per-prompt quantiles of a few samples would be little more than the minimum)."""
    if not 0.0 < quantile < 1.0:
        raise ValueError(f"quantile must lie in (0, 1), got {quantile}")
    values = ref_logps.detach().double().cpu()
    if values.numel() == 0:
        raise ValueError("off_support_threshold needs at least one pi_ref sample")
    # Linear interpolation between order statistics (torch's default): at most a fraction quantile + 1/n of the
    # calibration samples lies strictly below the threshold.
    return float(torch.quantile(values, quantile))


def off_support_rate(ref_logps_of_policy_samples: Tensor, threshold: float) -> float:
    """Fraction of the policy's samples y ~ pi with log pi_ref(y|x) < ``threshold`` (``off_support_threshold``).

    At pi = pi_ref this is ``quantile`` in expectation; text outside pi_ref's support (log pi_ref -> -inf) counts."""
    values = ref_logps_of_policy_samples.detach().double().cpu()
    return float((values < threshold).double().mean())


def displacement_signals(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor,
                         ref_rejected: Tensor) -> dict[str, float]:
    """Likelihood displacement on held-out pairs: mean log pi - log pi_ref of chosen and rejected responses [B]."""
    chosen = (policy_chosen.double() - ref_chosen.double()).cpu()
    rejected = (policy_rejected.double() - ref_rejected.double()).cpu()
    return {"chosen_logratio": float(chosen.mean()), "rejected_logratio": float(rejected.mean())}


def pair_signals(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor, *,
                 loss: str, beta: float, chosen_lengths: Tensor | None = None, rejected_lengths: Tensor | None = None,
                 loss_options: dict | None = None) -> dict[str, float]:
    """Held-out implicit-reward accuracy (margin > 0, ties 1/2), mean margin and clip rate, with the loss's own
    link and options (``chipo.losses.preference_loss``: margins in fp64 here, exp clamped)."""
    _, metrics = preference_loss(loss, policy_chosen.double().cpu(), policy_rejected.double().cpu(),
                                 ref_chosen.double().cpu(), ref_rejected.double().cpu(), beta=beta,
                                 chosen_lengths=None if chosen_lengths is None else chosen_lengths.double().cpu(),
                                 rejected_lengths=None if rejected_lengths is None else rejected_lengths.double().cpu(),
                                 **(loss_options or {}))
    margins = metrics["rewards/margins"].double()
    accuracy = (margins > 0).double() + 0.5 * (margins == 0).double()
    return {"implicit_acc": float(accuracy.mean()), "margin": float(margins.mean()),
            "clip_rate": float(metrics["clipped"].double().mean())}


def sample_signals(policy_logps: Tensor, lengths: Tensor | np.ndarray, finished: Tensor | np.ndarray
                   ) -> dict[str, float]:
    """Response length (tokens, EOS excluded), the fraction finished (EOS emitted within the budget) and the
    Monte-Carlo sequence entropy -E_pi[log pi(y|x)] (nats per response; of the truncated responses when unfinished)."""
    return {"length": float(np.mean(np.asarray(lengths, dtype=float))),
            "finished": float(np.mean(np.asarray(finished, dtype=float))),
            "entropy": float(-policy_logps.detach().double().cpu().mean())}


def judge_disagreement(scores: np.ndarray, groups: np.ndarray | None = None) -> float:
    """How often two judges order two samples differently: ``scores`` [J, N] (J >= 2 judges' scores of N samples),
    over every pair of samples of the same group (prompt) and every pair of judges, pairs one judge ties left out.

    0 when the judges agree on every ordering, about 1/2 for unrelated judges: a proxy reward that keeps rising while
    a second judge disagrees with it more and more is being exploited (Gao et al. 2023, arXiv 2210.10760)."""
    scores = np.asarray(scores, dtype=float)
    if scores.ndim != 2 or scores.shape[0] < 2:
        raise ValueError(f"judge_disagreement needs scores of shape [judges >= 2, samples], got {scores.shape}")
    groups = np.zeros(scores.shape[1], dtype=int) if groups is None else np.asarray(groups)
    disagree = total = 0.0
    for g in np.unique(groups):
        s = scores[:, groups == g]
        i, j = np.triu_indices(s.shape[1], k=1)
        signs = np.sign(s[:, i] - s[:, j])  # [J, pairs]
        for a, b in itertools.combinations(range(len(s)), 2):
            both = (signs[a] != 0) & (signs[b] != 0)
            disagree += float((signs[a][both] != signs[b][both]).sum())
            total += float(both.sum())
    return disagree / total if total else math.nan
