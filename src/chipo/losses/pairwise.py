"""Pairwise losses: functions of the implicit-reward margin m = beta * (link(z+) - link(z-)), shape [B].

Each maps margins to per-example losses. They compose with any link (``chipo.divergences``), so
"DPO" is (kl link, logistic), "chiPO" is (chi2mix link, logistic), "IPO" is (kl link, squared), and
e.g. (chi2mix link, hinge) is a chi-squared hinge loss with no new code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

PairwiseLoss = Callable[..., Tensor]


def logistic(margin: Tensor, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """Bradley-Terry negative log-likelihood -log sigmoid(m) (DPO, Rafailov et al. 2023, eq. 7).

    With ``label_smoothing`` eps > 0 this is conservative DPO (cDPO, Mitchell 2023): the label is taken to
    be flipped with probability eps, loss = -(1 - eps) log sigmoid(m) - eps log sigmoid(-m).
    """
    loss = -F.logsigmoid(margin)
    if label_smoothing:
        loss = (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-margin)
    return loss


def robust(margin: Tensor, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024, eq. 8): an unbiased loss under label-flip rate eps < 1/2.

    loss = ((1 - eps) * (-log sigmoid(m)) + eps * log sigmoid(-m)) / (1 - 2 eps).
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust loss needs 0 <= label_smoothing < 0.5, got {label_smoothing}")
    eps = label_smoothing
    return ((1.0 - eps) * -F.logsigmoid(margin) + eps * F.logsigmoid(-margin)) / (1.0 - 2.0 * eps)


def hinge(margin: Tensor, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """SLiC hinge loss max(0, 1 - m) (Zhao et al. 2023), as TRL's ``hinge``: m = beta * log-ratio margin."""
    return F.relu(1.0 - margin)


def squared(margin: Tensor, *, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """IPO (Azar et al. 2023, eq. 17): (h - 1/(2 tau))^2 with h = m / beta the link difference, tau = beta."""
    return (margin / beta - 1.0 / (2.0 * beta)) ** 2


PAIRWISE_LOSSES: dict[str, PairwiseLoss] = {
    "logistic": logistic,
    "robust": robust,
    "hinge": hinge,
    "squared": squared,
}
