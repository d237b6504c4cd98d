"""``chipo rl`` configuration: ``SampledConfig`` (a ``transformers.TrainingArguments`` subclass, shared with
``chipo online``) plus the RL objective, sampling and evaluation fields.

The TrainingArguments keys the loop reads (``chipo.train.honoured.RL_HONOURED``: optimizer, schedule, accumulation,
precision, gradient checkpointing, logging, evaluation, checkpoints, trackers, seed) mean what they mean for
``transformers.Trainer``; any other TrainingArguments key set to a non-default value is refused in one line.
``__post_init__`` validates the RL fields with one-line ``ConfigError``s, then ``SampledConfig`` validates the
shared ones and TrainingArguments sets up the (possibly distributed) device state.

Steps, not epochs: one optimizer step consumes ``prompts_per_step`` prompts with ``k`` samples each, split over
the processes and then into ``gradient_accumulation_steps`` micro-batches (see ``chipo.train.rl``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from chipo.config import ConfigError, _field
from chipo.divergences import EXP_CLAMP
from chipo.losses.rloo import ESTIMATORS
from chipo.train.honoured import RL_HONOURED
from chipo.train.sampled_config import SampledConfig

REGULARIZERS = ("kl", "chi2", "chi2mix")


@dataclass
class RLConfig(SampledConfig):
    """Online RL (RLOO policy gradient) of a causal LM against a reward, regularised by an f-divergence."""

    honoured: ClassVar[frozenset[str]] = RL_HONOURED
    command: ClassVar[str] = "chipo rl"
    objective_keys: ClassVar[tuple[str, ...]] = (
        "policy", "ref_model", "prompts", "prompts_split", "max_prompts", "reward", "regularizer", "estimator",
        "beta", "k", "exp_clamp", "temperature", "max_new_tokens", "max_prompt_length")
    """run_config keys that define the RL objective: resuming a checkpoint trained on another is refused."""

    reward: str = _field(None, "Reward: an HF sequence-classification model directory (e.g. from `chipo reward`), "
                               "'module:function' (fn(prompts, responses) -> list[float]) or 'world' (the lab).")
    output_dir: str = _field("outputs/chipo-rl", "Where checkpoints, the final HF policy, run_config.yaml and "
                                                 "metrics.jsonl go.")
    # --- the objective
    regularizer: str = _field("chi2mix", "Divergence D_f(pi || pi_ref) penalised: kl, chi2, chi2mix (chi2 + KL, "
                                         "chiPO's implicit regulariser, Huang et al. 2024, arXiv 2407.13399). "
                                         "Per-sample penalty beta * f'(pi/pi_ref).")
    estimator: str = _field("k1", "k1: penalty beta * f'(z) in the reward (exact gradient of the objective; for "
                                  "kl the k1 estimator beta * log z). k3 (kl only): GRPO-style loss term "
                                  "beta * ((1/z - 1) + log z), whose gradient is that of KL(pi_ref || pi).")
    beta: float = _field(0.05, "Regularisation strength beta (>= 0).")
    k: int = _field(4, "Samples per prompt (>= 2): the RLOO leave-one-out baseline.")
    exp_clamp: float = _field(EXP_CLAMP, "Largest exponent in z = exp(log pi - log pi_ref) (overflow guard).")
    # --- generation
    generation_batch_size: int = _field(64, "Sequences per HF generate call (rounded down to whole prompts). Each "
                                            "call's sampling seed is a function of (seed, step, position of its "
                                            "first prompt in the step's batch), so runs on 1 or N processes draw the "
                                            "same samples when generation_batch_size // k divides prompts_per_step "
                                            "/ N.")
    # --- evaluation (every eval_steps steps and at step 0 when eval_steps is set)
    eval_samples: int = _field(2, "Samples per evaluation prompt.")
    gold: str | None = _field(None, "Gold reward for evaluation (lab): same forms as `reward`, e.g. 'world'.")
    eval_steps: float | None = _field(None, "Evaluate on `eval_prompts` every N steps (and at step 0): proxy reward, "
                                            "KL, chi2, with `gold` the gold reward, and the overoptimization "
                                            "monitor's signals (`monitor`). null: no evaluation.")

    def __post_init__(self) -> None:
        if not self.reward:
            raise ConfigError("reward is required")
        if self.regularizer not in REGULARIZERS:
            raise ConfigError(f"regularizer must be one of {', '.join(REGULARIZERS)}, got {self.regularizer!r}")
        if self.estimator not in ESTIMATORS:
            raise ConfigError(f"estimator must be one of {', '.join(ESTIMATORS)}, got {self.estimator!r}")
        if self.estimator == "k3" and self.regularizer != "kl":
            raise ConfigError(f"estimator k3 is a KL estimator; regularizer {self.regularizer} takes k1")
        if self.beta < 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta}")
        if self.k < 2:
            raise ConfigError(f"k must be at least 2 (RLOO's leave-one-out baseline), got {self.k}")
        if not self.exp_clamp > 0:
            raise ConfigError(f"exp_clamp must be positive, got {self.exp_clamp}")
        for name in ("generation_batch_size", "eval_samples"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        super().__post_init__()
