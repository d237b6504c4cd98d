"""``chipo online`` configuration: every field has help text; ``__post_init__`` validates values.

A ``transformers.TrainingArguments`` subclass like every chipo trainer config: the optimizer, schedule, precision,
logging and checkpoint keys are TrainingArguments' own (the loop builds the optimizer and schedule as Trainer does,
``chipo.train.loop``). The objective's keys (loss, beta, r_max, link, alpha, sft_weight, ...) are ``chipo train``'s
(``PreferenceLossFields``); XPO's exploration coefficient is ``xpo_alpha``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from transformers import TrainingArguments

from chipo.config import ConfigError, _field
from chipo.losses import MARGIN_CLIPS, loss_names, resolve_options
from chipo.losses.online import LABEL_MODES
from chipo.sequences import LOGPROB_IMPLS
from chipo.train.common import check_common_arguments, finish_training_arguments
from chipo.train.config import PreferenceLossFields
from chipo.train.loop import interval

NASH_MD = "nash-md"
EXPLORATIONS = ("none", "xpo")
REGULARIZERS = ("kl", "chi2", "chi2mix")
JUDGE_PROMPTS = ("general", "tldr")


@dataclass
class OnlineConfig(TrainingArguments, PreferenceLossFields):
    """Online preference optimization (online DPO / chiPO, XPO, Nash-MD) of a causal LM against a judge."""

    policy: str = _field(None, "Policy to train: hub name or local HF causal-LM directory (also pi_ref by default).")
    prompts: str = _field(None, "Prompt data with a 'prompt' column (strings or message lists): .json/.jsonl/"
                                ".parquet/.arrow file, datasets directory or hub name.")
    judge: str = _field(None, "Preference oracle: 'openai' (an OpenAI-compatible LLM judge, pairwise; judge_* keys) "
                              "or a scorer: reward-model directory, 'module:function' or 'world' (the lab), whose "
                              "scores become labels per `label`.")
    prompts_split: str = _field("train", "Split of `prompts`.")
    max_prompts: int | None = _field(None, "Use only the first N prompts.")
    ref_model: str | None = _field(None, "Reference pi_ref: model name/path; default: the initial policy.")
    tokenizer: str | None = _field(None, "Tokenizer name or path; default: `policy`.")
    output_dir: str = _field("outputs/chipo-online", "Checkpoints, the final HF policy, run_config.yaml and "
                                                     "metrics.jsonl.")
    overwrite_output_dir: bool = _field(False, "Allow writing into a non-empty output_dir (otherwise an error).")
    # --- the objective
    loss: str = _field("dpo", f"'nash-md' or a preference loss on the labelled pair: {', '.join(loss_names())}.")
    exploration: str = _field("none", "'none': both responses from pi (online DPO / chiPO). 'xpo': one from pi, "
                                      "one from pi_ref, plus alpha * log pi(y~) on the pi_ref sample (Xie et al. "
                                      "2024, arXiv 2405.21046, Alg. 1).")
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
    # --- generation
    max_new_tokens: int = _field(64, "Max response tokens sampled per prompt.")
    temperature: float = _field(1.0, "Sampling temperature (1.0: samples from pi itself, as the losses assume).")
    max_prompt_length: int | None = _field(None, "Max prompt tokens; longer prompts keep their last tokens.")
    # --- optimisation
    max_steps: int = _field(100, "Optimizer steps (fewer when max_labels runs out first).")
    prompts_per_step: int = _field(8, "Prompts (pairs, judge calls) per optimizer step over all processes; a "
                                      "multiple of the number of processes.")
    learning_rate: float = _field(5e-7, "Peak learning rate.")
    lr_scheduler_type: str = _field("constant", "transformers scheduler name (constant, linear, cosine, ...).")
    optim: str = _field("adamw_torch", "Optimizer (transformers optim name; adam_beta1/2, adam_epsilon, "
                                       "weight_decay apply).")
    seed: int = _field(0, "Random seed: prompt order, sampling and labels are functions of (seed, step, prompt).")
    logprobs_impl: str = _field("auto", "'fused', 'logits' or 'auto' (see chipo train).")
    logprob_chunk: int = _field(1024, "Tokens per chunk in the fused log-prob path.")
    packing: bool = _field(True, "Padding-free log-prob passes (policy and reference): the sampled sequences side "
                                 "by side in rows no wider than the longest, position_ids restarting per "
                                 "sequence, attention confined to each (as chipo train's packing). Checked once "
                                 "against padded rows (falls back with a warning if the model ignores "
                                 "position_ids); same results up to round-off; one forward, so DDP works too. "
                                 "false: padded rows.")
    # --- logging, checkpoints
    logging_steps: float = _field(1, "Log metrics (metrics.jsonl, stdout) every N steps.")
    save_steps: float = _field(50, "Checkpoint (accelerate state: policy, optimizer, RNG; step, labels) every N steps "
                                 "and at the last step (0: never; the final policy is always saved).")
    save_total_limit: int | None = _field(2, "Keep at most N checkpoints (null: all).")
    resume_from_checkpoint: str | None = _field(None, "'latest' or a checkpoint directory to resume from.")

    def __post_init__(self) -> None:
        for name in ("policy", "prompts", "judge"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is required")
        if self.loss == NASH_MD:
            if self.exploration != "none":
                raise ConfigError("exploration=xpo applies to pairwise losses; nash-md samples its own opponent")
            if self.regularizer is not None and self.regularizer not in REGULARIZERS:
                raise ConfigError(f"regularizer must be one of {', '.join(REGULARIZERS)}, got {self.regularizer!r}")
            if not 0.0 <= self.mixture_coef <= 1.0:
                raise ConfigError(f"mixture_coef must lie in [0, 1], got {self.mixture_coef}")
        else:
            if self.regularizer is not None:
                raise ConfigError(f"regularizer applies to loss=nash-md; loss={self.loss} regularises through its "
                                  "link (set link=...)")
            try:
                self.check_loss()
            except ConfigError as e:
                raise ConfigError(f"{e}; or loss=nash-md" if "unknown loss" in str(e) else str(e)) from None
        if self.margin_clip not in MARGIN_CLIPS:
            raise ConfigError(f"margin_clip must be one of {', '.join(MARGIN_CLIPS)}, got {self.margin_clip!r}")
        if self.policy_penalty is not None and not (self.policy_penalty >= 0 and math.isfinite(self.policy_penalty)):
            raise ConfigError(f"policy_penalty must be a finite number >= 0, got {self.policy_penalty}")
        if self.nash_md and (self.policy_penalty or self.policy_penalty_bound):
            raise ConfigError("policy_penalty applies to pairwise losses; nash-md penalises through `regularizer`")
        if not self.nash_md and self.policy_penalty_bound and self.loss_resolved()["r_max"] is None:
            raise ConfigError("policy_penalty_bound needs a reward bound: set r_max (the loss has no clip)")
        if self.exploration not in EXPLORATIONS:
            raise ConfigError(f"exploration must be one of {', '.join(EXPLORATIONS)}, got {self.exploration!r}")
        if self.xpo_alpha < 0:
            raise ConfigError(f"xpo_alpha must be >= 0, got {self.xpo_alpha}")
        if self.label not in LABEL_MODES:
            raise ConfigError(f"label must be one of {', '.join(LABEL_MODES)}, got {self.label!r}")
        if self.judge_prompt not in JUDGE_PROMPTS:
            raise ConfigError(f"judge_prompt must be one of {', '.join(JUDGE_PROMPTS)}, got {self.judge_prompt!r}")
        if self.logprobs_impl not in LOGPROB_IMPLS:
            raise ConfigError(f"logprobs_impl must be one of {', '.join(LOGPROB_IMPLS)}, got {self.logprobs_impl!r}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        if not self.beta > 0:
            raise ConfigError(f"beta must be positive, got {self.beta}")
        if not self.exp_clamp > 0:
            raise ConfigError(f"exp_clamp must be positive, got {self.exp_clamp}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError("weight_decay and max_grad_norm must be >= 0")
        if not self.logging_steps > 0:
            raise ConfigError(f"logging_steps must be positive, got {self.logging_steps}")
        for name in ("max_new_tokens", "max_steps", "prompts_per_step", "logprob_chunk",
                     "judge_max_concurrency", "judge_max_attempts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.save_steps < 0:
            raise ConfigError(f"save_steps must be >= 0, got {self.save_steps}")
        for name in ("max_prompts", "max_prompt_length", "save_total_limit", "max_labels"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        check_common_arguments(self)
        finish_training_arguments(self, TrainingArguments)

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

        Defaults (null keys) for loss=chipo: weight 1, bounded at the clip's r_max -- the variant that held in
        every seed of the experiment in docs/online-lab (variants.md); other losses: off.
        """
        if self.nash_md:
            return None
        opts = self.loss_resolved()
        weight = self.policy_penalty if self.policy_penalty is not None else float(self.loss == "chipo")
        if not weight:
            return None
        bounded = self.policy_penalty_bound if self.policy_penalty_bound is not None else opts["r_max"] is not None
        return {"beta": weight * self.beta, "divergence": opts["link"], "bound": opts["r_max"] if bounded else None}

    def accelerate_precision(self) -> str:
        """accelerate's name of the mixed precision that ``bf16`` / ``fp16`` ask for."""
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "no"

    def every(self, what: str) -> int:
        """Interval in steps of 'logging' or 'save' (0: never), per the *_strategy and *_steps fields."""
        if str(getattr(self, f"{what}_strategy")).split(".")[-1].lower() == "no":
            return 0
        return interval(getattr(self, f"{what}_steps"), self.max_steps)

    @property
    def nash_md(self) -> bool:
        return self.loss == NASH_MD
