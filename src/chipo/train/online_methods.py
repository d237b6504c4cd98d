"""The methods of ``chipo online``, one record each: where the second response of a pair comes from, which loss the
judged pair feeds, the terms added to it, and the config checks of the method. ``chipo.train.online.OnlineTrainer``
runs any of them with the same step (sample -> judge -> loss); a new online method is one entry here.

Every method samples y_a ~ pi. The methods (``method_for`` picks one from a config):

* ``exploration=none`` with a pairwise loss (online DPO / chiPO; Guo et al. 2024, arXiv 2402.04792): y_b ~ pi too;
  the labelled pair goes through ``chipo.losses.preference_loss``, plus chiPO's bounded on-policy penalty
  (``chipo.losses.online.policy_penalty``) on both samples.
* ``exploration=xpo`` (XPO, Xie et al. 2024, arXiv 2405.21046, Alg. 1): y_b ~ pi_ref, the same pairwise loss plus
  the exploration bonus alpha log pi(y_b), and the penalty on y_a (the only sample of pi).
* ``loss=nash-md`` (Nash-MD-PG, Munos et al. 2023, arXiv 2312.00886): y_b ~ pi^(1-m) pi_ref^m, its own
  policy-gradient loss on y_a with the judge's probability (no label is drawn, y_b's log-probs are not needed).

Methods receive configs duck-typed (``chipo.train.online_config.OnlineConfig``), which imports this module.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from chipo.config import ConfigError
from chipo.divergences import get_divergence
from chipo.losses import preference_loss
from chipo.losses.online import nash_md_loss, policy_penalty, xpo_bonus
from chipo.train.rl_config import REGULARIZERS

OPPONENTS = ("policy", "ref", "mixture")
"""Where y_b comes from: pi, pi_ref, or the token-level geometric mixture pi^(1-m) pi_ref^m (m = mixture_coef)."""


@dataclass(frozen=True)
class JudgedBatch:
    """One micro-batch of ``n`` judged pairs as a method's loss sees it.

    ``logps`` / ``ref_logps`` / ``lengths``: log pi, log pi_ref (fp32) and token counts of y_a (rows 0..n-1), then of
    y_b (rows n..2n-1) when the method reads it; the first ``policy_rows`` rows are samples of pi (the on-policy
    estimates -- KL, chi-squared, the penalty -- average over them). ``prob``: P(y_a > y_b) from the judge, NaN
    without a verdict; ``label``: the drawn or given label (1, 0, 1/2 a tie, NaN missing).
    """

    logps: Tensor
    ref_logps: Tensor
    lengths: Tensor
    prob: Tensor
    label: Tensor
    n: int
    policy_rows: int


LossFn = Callable[[object, JudgedBatch], tuple[Tensor, Tensor, dict[str, Tensor]]]
"""(config, batch) -> (per-pair losses [n], pairs that count [n] bool, per-pair metric columns)."""
Term = Callable[[object, JudgedBatch], tuple[str, Tensor] | None]
"""(config, batch) -> (metric name, per-pair term [n]) added to the loss, or None when the config turns it off."""


@dataclass(frozen=True)
class OnlineMethod:
    name: str
    summary: str
    opponent: str
    pairwise: bool
    """True: the judged pair feeds ``preference_loss`` (both responses' log-probs; labels drawn from the judge's
    probability under ``label=bt``). False: the method's own loss on y_a with the probability itself."""
    loss: LossFn
    terms: tuple[Term, ...] = ()
    check: Callable[[object], None] = lambda config: None

    def __post_init__(self) -> None:
        if self.opponent not in OPPONENTS:
            raise ValueError(f"opponent must be one of {OPPONENTS}, got {self.opponent!r}")

    def policy_rows(self, n: int) -> int:
        return 2 * n if self.opponent == "policy" else n

    def losses(self, config, batch: JudgedBatch) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """The method's loss plus its terms, in order, with their metric columns."""
        losses, kept, columns = self.loss(config, batch)
        for term in self.terms:
            added = term(config, batch)
            if added is not None:
                name, value = added
                losses = losses + value
                columns[name] = value.detach()
        return losses, kept, columns


# ----------------------------------------------------------------------------------------------------- the losses


def pairwise_loss(config, batch: JudgedBatch) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """``chipo.losses.preference_loss`` on the labelled pair (winner first); ties and missing verdicts masked out."""
    n, label = batch.n, batch.label
    kept = (label == 1.0) | (label == 0.0)
    a_wins = label == 1.0

    def pick(rows: Tensor, winner: bool) -> Tensor:  # the winner's (or loser's) value of each pair
        first, second = (rows[:n], rows[n:]) if winner else (rows[n:], rows[:n])
        return torch.where(a_wins, first, second)

    pair, metrics = preference_loss(
        config.loss, pick(batch.logps, True), pick(batch.logps, False), pick(batch.ref_logps, True),
        pick(batch.ref_logps, False), beta=config.beta, chosen_lengths=pick(batch.lengths, True),
        rejected_lengths=pick(batch.lengths, False), mask=kept, **config.loss_options())
    columns = {name: metrics[name] for name in ("rewards/chosen", "rewards/rejected", "rewards/margins",
                                                "rewards/accuracies", "logps/chosen", "logps/rejected", "clipped")}
    columns["loss/preference"] = pair.detach()
    columns["labels/ties"] = ((label == 0.5) & ~torch.isnan(batch.prob)).float()
    return pair, kept, columns


def nash_md(config, batch: JudgedBatch) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """Nash-MD-PG's loss on y_a against y_b ~ pi^(1-m) pi_ref^m; a missing verdict counts as 1/2 (no gradient)."""
    missing = torch.isnan(batch.prob)
    losses, metrics = nash_md_loss(batch.logps, batch.ref_logps, torch.where(missing, 0.5, batch.prob),
                                   beta=config.beta, divergence=get_divergence(config.regularizer or "kl"),
                                   exp_clamp=config.exp_clamp)
    return losses, ~missing, {k: metrics[k] for k in ("loss/score", "loss/kl", "rewards/probabilities",
                                                      "logps/chosen")}


def exploration_bonus(config, batch: JudgedBatch) -> tuple[str, Tensor]:
    """XPO's alpha (log pi(y_b) - log pi_ref(y_b)) on the pi_ref sample (``chipo.losses.online.xpo_bonus``)."""
    n = batch.n
    return "loss/xpo", xpo_bonus(batch.logps[n:], batch.ref_logps[n:], config.xpo_alpha)


def on_policy_penalty(config, batch: JudgedBatch) -> tuple[str, Tensor] | None:
    """beta grad D_f(pi || pi_ref) on the policy's own samples, averaged per pair (``policy_penalty``); None when
    the config turns it off (``OnlineConfig.penalty_options``)."""
    options = config.penalty_options()
    if not options:
        return None
    n, rows = batch.n, batch.policy_rows
    penalty = policy_penalty(batch.logps[:rows].view(-1, n), batch.ref_logps[:rows].view(-1, n),
                             exp_clamp=config.exp_clamp, **options).mean(0)
    return "loss/penalty", penalty


# ----------------------------------------------------------------------------------------------------- the checks


def check_pairwise(config) -> None:
    if config.regularizer is not None:
        raise ConfigError(f"regularizer applies to loss=nash-md; loss={config.loss} regularises through its link "
                          "(set link=...)")
    try:
        config.check_loss()
    except ConfigError as e:
        raise ConfigError(f"{e}; or loss={', '.join(OWN_LOSS)}" if "unknown loss" in str(e) else str(e)) from None
    if config.policy_penalty_bound and config.loss_resolved()["r_max"] is None:
        raise ConfigError("policy_penalty_bound needs a reward bound: set r_max (the loss has no clip)")


def check_nash_md(config) -> None:
    if config.exploration != "none":
        raise ConfigError(f"exploration={config.exploration} applies to pairwise losses; nash-md samples its own "
                          "opponent")
    if config.regularizer is not None and config.regularizer not in REGULARIZERS:
        raise ConfigError(f"regularizer must be one of {', '.join(REGULARIZERS)}, got {config.regularizer!r}")
    if not 0.0 <= config.mixture_coef <= 1.0:
        raise ConfigError(f"mixture_coef must lie in [0, 1], got {config.mixture_coef}")
    if config.policy_penalty or config.policy_penalty_bound:
        raise ConfigError("policy_penalty applies to pairwise losses; nash-md penalises through `regularizer`")


# ----------------------------------------------------------------------------------------------------- the registry

EXPLORATION = {
    "none": OnlineMethod("online", "online DPO / chiPO: both responses from pi", opponent="policy", pairwise=True,
                         loss=pairwise_loss, terms=(on_policy_penalty,), check=check_pairwise),
    "xpo": OnlineMethod("xpo", "XPO: y_b from pi_ref plus alpha log pi(y_b)", opponent="ref", pairwise=True,
                        loss=pairwise_loss, terms=(exploration_bonus, on_policy_penalty), check=check_pairwise),
}
"""Methods for pairwise losses, by ``exploration``."""
OWN_LOSS = {
    "nash-md": OnlineMethod("nash-md", "Nash-MD-PG against pi^(1-m) pi_ref^m", opponent="mixture", pairwise=False,
                            loss=nash_md, check=check_nash_md),
}
"""Methods with a loss of their own, by ``loss`` (instead of a pairwise loss of ``chipo.losses``)."""


def method_for(config) -> OnlineMethod:
    """The method a config asks for: by ``loss`` when it names a method with its own loss, else by
    ``exploration``; one ConfigError line for an unknown exploration."""
    if config.loss in OWN_LOSS:
        return OWN_LOSS[config.loss]
    if config.exploration not in EXPLORATION:
        raise ConfigError(f"exploration must be one of {', '.join(EXPLORATION)}, got {config.exploration!r}")
    return EXPLORATION[config.exploration]
