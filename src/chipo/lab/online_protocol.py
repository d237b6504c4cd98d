"""The online lab's protocol: its methods (``chipo online`` keys), their names and colours in reports, and
``OnlineLabSettings`` (shared by ``chipo.lab.online``, which runs the lab, ``chipo.lab.online_report``, which
renders it, and the method table; none imports another's module back)."""

from __future__ import annotations

from dataclasses import dataclass

from chipo.config import ConfigError
from chipo.lab.protocol import PreferenceData

# method name -> chipo online keys. chi-squared XPO = chiPO's pairwise loss + XPO's (KL-form) exploration bonus;
# see chipo.losses.online for why the bonus stays KL-form. Both chi-squared methods take chipo online's defaults for
# loss=chipo, which include the bounded penalty on the policy's own samples (docs/online-lab/variants.md).
METHODS = {
    "online-dpo": {"loss": "dpo", "exploration": "none"},
    "online-chipo": {"loss": "chipo", "exploration": "none"},
    "xpo": {"loss": "dpo", "exploration": "xpo"},
    "chi2-xpo": {"loss": "chipo", "exploration": "xpo"},
}
# Every online method ``_train`` can run: the lab's four, and Nash-MD (Munos et al. 2023, arXiv 2312.00886: self-play
# against pi^(1-m) pi_ref^m, chipo online's defaults), which the method table (chipo.lab.methods) also runs.
SPECS = {**METHODS, "nash-md": {"loss": "nash-md", "exploration": "none"}}
# Variants of the chi-squared methods, for the experiment in docs/online-lab (not run by default), named
# "<method>.<variant>" (``method_keys``). Each fixes the keys it tests explicitly, so its results do not move when
# chipo online's defaults do. learning_rate_factor scales the settings' learning rate.
_PAPER_CLIP = {"margin_clip": "both", "policy_penalty": 0.0, "policy_penalty_bound": False}
VARIANTS = {
    "paper-clip": _PAPER_CLIP,  # the paper's two-sided clip at 2 r_max, nothing else (the default before)
    "no-clip": {**_PAPER_CLIP, "clip_margin": False},
    "upper-clip": {**_PAPER_CLIP, "margin_clip": "upper"},
    "penalty": {**_PAPER_CLIP, "policy_penalty": 1.0},  # + beta (f'(z) - f'(1)) log pi on the policy's samples
    "upper-clip+penalty": {**_PAPER_CLIP, "margin_clip": "upper", "policy_penalty": 1.0},
    "upper-clip+penalty-0.3": {**_PAPER_CLIP, "margin_clip": "upper", "policy_penalty": 0.3},
    "lr-0.3": {**_PAPER_CLIP, "learning_rate_factor": 0.3},
    "log-clip": {**_PAPER_CLIP, "margin_clip": "log"},  # the paper's value, the log link's gradient past it
    "bounded-penalty": {**_PAPER_CLIP, "policy_penalty": 1.0, "policy_penalty_bound": True},
    "upper-clip+bounded-penalty": {"margin_clip": "upper", "policy_penalty": 1.0, "policy_penalty_bound": True},
}
VARIANT_BASES = ("online-chipo", "chi2-xpo")


def method_keys(method: str) -> dict:
    """chipo online keys of a method: ``SPECS[method]``, or for "<base>.<variant>" the base's plus the variant's."""
    base, _, variant = method.partition(".")
    if base not in SPECS or (variant and (base not in VARIANT_BASES or variant not in VARIANTS)):
        valid = list(SPECS) + [f"{b}.{v}" for b in VARIANT_BASES for v in VARIANTS]
        raise ConfigError(f"unknown online lab method {method!r}; valid: {', '.join(valid)}")
    return {**SPECS[base], **VARIANTS.get(variant, {})}


LABELS = {"online-dpo": "online DPO", "online-chipo": "online chiPO", "xpo": "XPO", "chi2-xpo": "chi2-XPO",
          "nash-md": "Nash-MD",
          "offline-dpo": "offline DPO", "offline-chipo": "offline chiPO", "pi_ref": "pi_ref"}
LABELS.update({f"{b}.{v}": f"{LABELS[b]} ({v})" for b in VARIANT_BASES for v in VARIANTS})
COLORS = {"online-dpo": "tab:red", "online-chipo": "tab:blue", "xpo": "tab:orange", "chi2-xpo": "tab:cyan",
          "nash-md": "tab:purple",
          "offline-dpo": "darkred", "offline-chipo": "navy"}
METRICS = ("gold", "win_rate_vs_ref", "kl", "sqrt_kl", "chi2", "mass_malformed")


@dataclass(frozen=True)
class OnlineLabSettings(PreferenceData):
    """Sizes of the online lab. Budget, scale, betas, learning rate and response length are the offline demo's
    (``PreferenceData``), so the two are compared at equal labels, noise, regularization and optimizer."""

    seeds: int = 3
    methods: tuple[str, ...] = tuple(METHODS)
    eval_fractions: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0)  # of the budget, rounded to whole steps
    prompts_per_step: int = 8
    alpha: float = 1e-5  # XPO's coefficient: chipo online's (and TRL's) default
    max_eval_prompts: int | None = None

    @staticmethod
    def quick(seeds: int = 1) -> OnlineLabSettings:
        return OnlineLabSettings(seeds=seeds, betas=(0.05,), pairs_per_prompt=2, eval_fractions=(0.5, 1.0),
                                 prompts_per_step=4, max_eval_prompts=4)

    def __post_init__(self) -> None:
        for m in self.methods:
            method_keys(m)
        if self.seeds < 1 or not self.betas or any(not b > 0 for b in self.betas):
            raise ConfigError("seeds must be >= 1 and betas positive and non-empty")
        if not self.eval_fractions or any(not 0 < f <= 1 for f in self.eval_fractions):
            raise ConfigError(f"eval_fractions must lie in (0, 1], got {self.eval_fractions}")

    def eval_labels(self, n_train_prompts: int) -> list[int]:
        """Label counts evaluated: fractions of the budget, in whole steps (at least one step)."""
        steps = self.pairs_per_prompt * n_train_prompts // self.prompts_per_step
        if steps < 1:
            raise ConfigError(f"label budget {self.pairs_per_prompt * n_train_prompts} is below one step of "
                              f"{self.prompts_per_step} prompts")
        return sorted({max(1, round(f * steps)) * self.prompts_per_step for f in self.eval_fractions})
