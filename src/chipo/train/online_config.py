"""``chipo online`` configuration: every field has help text; ``__post_init__`` validates values.

``SampledConfig`` (a ``transformers.TrainingArguments`` subclass, shared with ``chipo rl``) plus the online objective,
labels and judge: the optimizer, schedule, accumulation, precision, logging and checkpoint keys are TrainingArguments'
own, read by the shared loop (``chipo.train.sampled``); other TrainingArguments keys are refused when set. The
objective's keys (loss, beta, r_max, link, alpha, sft_weight, ...) are ``chipo train``'s
(``PreferenceLossFields``); XPO's exploration coefficient is ``xpo_alpha``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from chipo.config import ConfigError, _field
from chipo.losses import MARGIN_CLIPS, loss_names, resolve_options
from chipo.losses.online import LABEL_MODES
from chipo.train.config import PreferenceLossFields
from chipo.train.honoured import ONLINE_HONOURED
from chipo.train.online_methods import EXPLORATION, OWN_LOSS, OnlineMethod, method_for
from chipo.train.sampled_config import SampledConfig

JUDGE_PROMPTS = ("general", "tldr")


@dataclass
class OnlineConfig(SampledConfig, PreferenceLossFields):
    """Online preference optimization (online DPO / chiPO, XPO, Nash-MD) of a causal LM against a judge."""

    honoured: ClassVar[frozenset[str]] = ONLINE_HONOURED
    command: ClassVar[str] = "chipo online"
    objective_keys: ClassVar[tuple[str, ...]] = (
        "policy", "ref_model", "prompts", "prompts_split", "max_prompts", "judge", "judge_model", "judge_prompt",
        "label", "loss", "beta", "r_max", "clip_margin", "link", "label_smoothing", "alpha", "length_normalize",
        "sft_weight", "reward_bound", "exploration", "xpo_alpha", "mixture_coef", "regularizer", "temperature",
        "max_new_tokens", "max_prompt_length", "margin_clip", "policy_penalty", "policy_penalty_bound")
    """run_config keys that define the online objective: resuming a checkpoint trained on another is refused."""

    judge: str = _field(None, "Preference oracle: 'openai' (an OpenAI-compatible LLM judge, pairwise; judge_* keys) "
                              "or a scorer: reward-model directory, 'module:function' or 'world' (the lab), whose "
                              "scores become labels per `label`.")
    output_dir: str = _field("outputs/chipo-online", "Checkpoints, the final HF policy, run_config.yaml and "
                                                     "metrics.jsonl.")
    # --- the objective
    loss: str = _field("dpo", "A method with a loss of its own (" + "; ".join(f"'{k}': {m.summary}" for k, m in
                                                                        OWN_LOSS.items())
                       + f") or a preference loss on the labelled pair: {', '.join(loss_names())}.")
    exploration: str = _field("none", "Pairwise losses: " + "; ".join(f"'{k}': {m.summary}" for k, m in
                                                                      EXPLORATION.items())
                              + " (XPO: Xie et al. 2024, arXiv 2405.21046, Alg. 1).")
    xpo_alpha: float = _field(1e-5, "XPO's exploration coefficient (exploration=xpo).")
    mixture_coef: float = _field(0.5, "Nash-MD: sample the opponent from pi^(1-m) pi_ref^m, m = this (Munos et "
                                      "al. 2023, arXiv 2312.00886).")
    margin_clip: str = _field("both", "Sides of the margin clip [-2 r_max, 2 r_max]: 'both' (Huang et al. 2024, "
                                      "Alg. 1) or 'upper' (clip only margins above 2 r_max, so a rejected response "
                                      "the policy over-samples is still pushed down).")
    policy_penalty: float | None = _field(None, "Pairwise losses: add weight*beta*(f'(z) - f'(1)) log pi(y) on the "
                                                "policy's own samples, f' the loss's link (chiPO: z + log z): its "
                                                "expected gradient is weight*beta grad D_f(pi || pi_ref), chipo rl's "
                                                "penalty. null: 1 for loss=chipo, 0 (off) otherwise.")
    policy_penalty_bound: bool | None = _field(None, "Apply policy_penalty only to the part of the implicit reward "
                                                     "beta*(f'(z) - f'(1)) above r_max, the bound of chiPO's clip: a "
                                                     "barrier that is 0 inside the bounded-reward policy class. null: "
                                                     "true when the loss has a clip (chipo), false otherwise.")
    regularizer: str | None = _field(None, "Nash-MD's regulariser: kl (default; Nash-MD), chi2 or chi2mix "
                                           "(per-sample penalty beta * f'(pi/pi_ref), as chipo rl).")
    # --- labels
    label: str = _field("bt", "Scorer judges: 'bt' samples the label from sigmoid(r_a - r_b) (Bradley-Terry; "
                              "Nash-MD uses that probability), 'argmax' prefers the higher score (ties dropped).")
    max_labels: int | None = _field(None, "Label budget: stop before a step that would exceed this many judge "
                                          "calls (one per pair). Compare online methods at equal budgets.")
    judge_base_url: str | None = _field(None, "judge=openai: endpoint root (default $CHIPO_JUDGE_BASE_URL, ...).")
    judge_model: str | None = _field(None, "judge=openai: model name (default $CHIPO_JUDGE_MODEL).")
    judge_prompt: str = _field("general", "judge=openai: 'general' (which response answers better) or 'tldr'.")
    judge_cache: str | None = _field("~/.cache/chipo/judge_cache.sqlite", "judge=openai: reply cache (null: off).")
    judge_max_concurrency: int = _field(8, "judge=openai: requests in flight at once.")
    judge_max_attempts: int = _field(5, "judge=openai: attempts per request on 429/5xx/timeouts.")
    judge_timeout: float = _field(120.0, "judge=openai: seconds one request attempt may take in all (connect, "
                                         "headers, whole reply) and any single read; an overrun is retried, so a "
                                         "hanging judge costs at most judge_max_attempts x this per item.")
    # --- optimisation
    max_steps: int = _field(100, "Optimizer steps (fewer when max_labels runs out first).")
    prompts_per_step: int = _field(8, "Prompts (pairs, judge calls) per optimizer step over all processes; must be "
                                      "divisible by num_processes x gradient_accumulation_steps.")
    learning_rate: float = _field(5e-7, "Peak learning rate.")

    def __post_init__(self) -> None:
        if not self.judge:
            raise ConfigError("judge is required")
        if self.margin_clip not in MARGIN_CLIPS:
            raise ConfigError(f"margin_clip must be one of {', '.join(MARGIN_CLIPS)}, got {self.margin_clip!r}")
        if self.policy_penalty is not None and not (self.policy_penalty >= 0 and math.isfinite(self.policy_penalty)):
            raise ConfigError(f"policy_penalty must be a finite number >= 0, got {self.policy_penalty}")
        self.method.check(self)  # the method's own keys (chipo.train.online_methods)
        if self.xpo_alpha < 0:
            raise ConfigError(f"xpo_alpha must be >= 0, got {self.xpo_alpha}")
        if self.label not in LABEL_MODES:
            raise ConfigError(f"label must be one of {', '.join(LABEL_MODES)}, got {self.label!r}")
        if self.judge_prompt not in JUDGE_PROMPTS:
            raise ConfigError(f"judge_prompt must be one of {', '.join(JUDGE_PROMPTS)}, got {self.judge_prompt!r}")
        if not self.beta > 0:
            raise ConfigError(f"beta must be positive, got {self.beta}")
        if not self.exp_clamp > 0:
            raise ConfigError(f"exp_clamp must be positive, got {self.exp_clamp}")
        if not self.judge_timeout > 0:
            raise ConfigError(f"judge_timeout must be positive, got {self.judge_timeout}")
        for name in ("judge_max_concurrency", "judge_max_attempts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.max_labels is not None and self.max_labels < 1:
            raise ConfigError(f"max_labels must be at least 1, got {self.max_labels}")
        super().__post_init__()

    def loss_options(self) -> dict:
        """``chipo train``'s loss options plus the side of the margin clip."""
        opts = super().loss_options()
        if self.margin_clip != "both":
            opts["margin_clip"] = self.margin_clip
        return opts

    def loss_resolved(self) -> dict:
        """The pairwise loss's options after its preset's defaults (``chipo.losses.resolve_options``)."""
        return resolve_options(self.loss, **self.loss_options())

    def penalty_options(self) -> dict | None:
        """``chipo.losses.online.policy_penalty``'s beta, divergence and bound for this config; None when off.

        Defaults (null keys) for loss=chipo: weight 1, bounded at the clip's r_max -- of the variants tried in
        docs/online-lab (variants.md), the one that left the language least often; other losses: off.
        """
        if not self.method.pairwise:
            return None
        opts = self.loss_resolved()
        weight = self.policy_penalty if self.policy_penalty is not None else float(self.loss == "chipo")
        if not weight:
            return None
        bounded = self.policy_penalty_bound if self.policy_penalty_bound is not None else opts["r_max"] is not None
        return {"beta": weight * self.beta, "divergence": opts["link"], "bound": opts["r_max"] if bounded else None}

    def last_step(self) -> int:
        """The run's last step: ``max_steps``, or fewer when the label budget ``max_labels`` runs out first."""
        if self.max_labels is None:
            return self.max_steps
        return min(self.max_steps, self.max_labels // self.prompts_per_step)

    @property
    def method(self) -> OnlineMethod:
        """The online method these keys select (``chipo.train.online_methods.method_for``)."""
        return method_for(self)
