"""``chipo rl`` configuration: every field has help text; ``__post_init__`` validates values."""

from __future__ import annotations

from dataclasses import dataclass

from chipo.config import ConfigError, _field
from chipo.divergences import EXP_CLAMP

REGULARIZERS = ("kl", "chi2", "chi2mix")
ESTIMATORS = ("k1", "k3")
LOGPROB_IMPLS = ("auto", "fused", "logits")


@dataclass
class RLConfig:
    """Online RL (RLOO policy gradient) of a causal LM against a reward, regularised by an f-divergence."""

    policy: str = _field(None, "Policy to train: hub name or local HF causal-LM directory (also pi_ref by default).")
    reward: str = _field(None, "Reward: an HF sequence-classification model directory (e.g. from `chipo reward`), "
                               "'module:function' (fn(prompts, responses) -> list[float]) or 'world' (the lab).")
    prompts: str = _field(None, "Prompt data with a 'prompt' column (strings, or message lists for chat models): "
                                ".json/.jsonl/.parquet/.arrow file, datasets directory or hub name.")
    prompts_split: str = _field("train", "Split of `prompts`.")
    max_prompts: int | None = _field(None, "Use only the first N prompts.")
    ref_model: str | None = _field(None, "Reference pi_ref: model name/path; default: the initial policy.")
    tokenizer: str | None = _field(None, "Tokenizer name or path; default: `policy`.")
    output_dir: str = _field("outputs/chipo-rl", "Where checkpoints, the final HF policy, run_config.yaml and "
                                                 "metrics.jsonl go.")
    overwrite_output_dir: bool = _field(False, "Allow writing into a non-empty output_dir (otherwise an error).")
    # --- the objective
    regularizer: str = _field("chi2mix", "Divergence D_f(pi || pi_ref) penalised: kl, chi2, chi2mix (chi2 + KL, "
                                         "chiPO's implicit regulariser). Per-sample penalty beta * f'(pi/pi_ref).")
    estimator: str = _field("k1", "k1: penalty beta * f'(z) in the reward (exact gradient of the objective; for "
                                  "kl the k1 estimator beta * log z). k3 (kl only): GRPO-style loss term "
                                  "beta * ((1/z - 1) + log z), whose gradient is that of KL(pi_ref || pi).")
    beta: float = _field(0.05, "Regularisation strength beta (>= 0).")
    k: int = _field(4, "Samples per prompt (>= 2): the RLOO leave-one-out baseline.")
    exp_clamp: float = _field(EXP_CLAMP, "Largest exponent in z = exp(log pi - log pi_ref) (overflow guard).")
    # --- generation
    max_new_tokens: int = _field(64, "Max response tokens sampled per prompt.")
    temperature: float = _field(1.0, "Sampling temperature. The estimator assumes samples from pi itself (1.0); "
                                     "other values make the gradient biased.")
    max_prompt_length: int | None = _field(None, "Max prompt tokens; longer prompts keep their last tokens.")
    generation_batch_size: int = _field(64, "Sequences per HF generate call.")
    # --- optimisation
    max_steps: int = _field(100, "Optimizer steps.")
    prompts_per_step: int = _field(8, "Prompts per optimizer step (each with k samples).")
    mini_batch_prompts: int | None = _field(None, "Prompts per forward/backward chunk (gradient accumulation within "
                                                  "a step); default: all of them at once.")
    learning_rate: float = _field(1e-5, "AdamW learning rate (constant).")
    weight_decay: float = _field(0.0, "AdamW weight decay.")
    max_grad_norm: float = _field(1.0, "Gradient clipping norm (0 disables).")
    seed: int = _field(0, "Random seed (prompt order, sampling).")
    logprobs_impl: str = _field("auto", "'fused', 'logits' or 'auto' (see chipo train).")
    logprob_chunk: int = _field(1024, "Tokens per chunk in the fused log-prob path.")
    # --- logging, evaluation, checkpoints
    logging_steps: int = _field(1, "Log metrics (metrics.jsonl and stdout) every N steps.")
    eval_every: int = _field(0, "Evaluate on `eval_prompts` every N steps (0: never): proxy reward, KL and, with "
                                "`gold`, the gold reward.")
    eval_prompts: str | None = _field(None, "Held-out prompt data (same forms as `prompts`); default: `prompts`.")
    eval_split: str = _field("train", "Split of `eval_prompts`.")
    max_eval_prompts: int | None = _field(64, "Use only the first N evaluation prompts.")
    eval_samples: int = _field(2, "Samples per evaluation prompt.")
    gold: str | None = _field(None, "Gold reward for evaluation (lab): same forms as `reward`, e.g. 'world'.")
    save_every: int = _field(50, "Checkpoint (policy, optimizer, step, RNG state) every N steps and at the last "
                                 "step (0: never; the final policy is always saved).")
    save_total_limit: int | None = _field(2, "Keep at most N checkpoints (null: all).")
    resume_from_checkpoint: str | None = _field(None, "'latest' or a checkpoint directory to resume from.")
    disable_tqdm: bool = _field(False, "Hide the progress bar.")

    def __post_init__(self) -> None:
        for name in ("policy", "reward", "prompts"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is required")
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
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        for name in ("max_new_tokens", "generation_batch_size", "max_steps", "prompts_per_step", "logging_steps",
                     "eval_samples", "logprob_chunk"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.mini_batch_prompts is not None and not 1 <= self.mini_batch_prompts <= self.prompts_per_step:
            raise ConfigError(f"mini_batch_prompts must lie in [1, prompts_per_step={self.prompts_per_step}], "
                              f"got {self.mini_batch_prompts}")
        for name in ("max_prompts", "max_eval_prompts", "max_prompt_length", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.logprobs_impl not in LOGPROB_IMPLS:
            raise ConfigError(f"logprobs_impl must be one of {', '.join(LOGPROB_IMPLS)}, got {self.logprobs_impl!r}")
