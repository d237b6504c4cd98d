"""``chipo rl`` configuration: a ``transformers.TrainingArguments`` subclass, as ``chipo train``'s config is.

Every TrainingArguments option is a config key; the standard ones mean what they mean for ``transformers.Trainer``
(``output_dir``, ``learning_rate``, ``lr_scheduler_type``, ``max_steps``, ``seed``, ``logging_steps``,
``save_steps`` / ``save_strategy`` / ``save_total_limit``, ``resume_from_checkpoint`` ('latest' or a directory),
``max_grad_norm``, ``weight_decay``, ``optim`` and ``adam_*``, ``gradient_accumulation_steps``, ``eval_steps``,
``report_to``, ``bf16`` / ``fp16``, ``gradient_checkpointing``, ``disable_tqdm``). chipo adds the RL fields below,
each with help text; ``__post_init__`` validates them with one-line ``ConfigError``s before TrainingArguments
validates (and sets up the possibly distributed device state for) the rest.

Steps, not epochs: one optimizer step consumes ``prompts_per_step`` prompts with ``k`` samples each, split over
the processes and then into ``gradient_accumulation_steps`` micro-batches (see ``chipo.train.rl``).
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import TrainingArguments

from chipo.config import ConfigError, _field
from chipo.divergences import EXP_CLAMP
from chipo.losses.rloo import ESTIMATORS
from chipo.sequences import LOGPROB_IMPLS
from chipo.train.common import check_common_arguments, finish_training_arguments
from chipo.train.loop import interval

REGULARIZERS = ("kl", "chi2", "chi2mix")


@dataclass
class RLConfig(TrainingArguments):
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
    overwrite_output_dir: bool = _field(False, "Start over in a non-empty output_dir: its previous run (checkpoints, "
                                               "metrics) is removed first. Otherwise a non-empty output_dir is an "
                                               "error unless resuming.")
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
    max_new_tokens: int = _field(64, "Max response tokens sampled per prompt.")
    temperature: float = _field(1.0, "Sampling temperature. The estimator assumes samples from pi itself (1.0); "
                                     "other values make the gradient biased.")
    max_prompt_length: int | None = _field(None, "Max prompt tokens; longer prompts keep their last tokens.")
    generation_batch_size: int = _field(64, "Sequences per HF generate call (rounded down to whole prompts). Each "
                                            "call's sampling seed is a function of (seed, step, position of its "
                                            "first prompt in the step's batch), so runs on 1 or N processes draw the "
                                            "same samples when generation_batch_size // k divides prompts_per_step "
                                            "/ N.")
    # --- optimisation
    prompts_per_step: int = _field(8, "Prompts per optimizer step over all processes (each with k samples); must be "
                                      "divisible by num_processes x gradient_accumulation_steps.")
    logprobs_impl: str = _field("auto", "'fused', 'logits' or 'auto' (see chipo train).")
    logprob_chunk: int = _field(1024, "Tokens per chunk in the fused log-prob path.")
    packing: bool = _field(True, "Padding-free log-prob passes (policy, reference, evaluation): the sampled "
                                 "sequences side by side in rows no wider than the longest, position_ids "
                                 "restarting per sequence, attention confined to each (as chipo train's packing). "
                                 "Checked once against padded rows (falls back with a warning if the model "
                                 "ignores position_ids); same results up to round-off; one forward, so DDP works "
                                 "too. false: padded rows.")
    # --- evaluation (every eval_steps steps and at step 0 when eval_steps is set)
    eval_prompts: str | None = _field(None, "Held-out prompt data (same forms as `prompts`); default: `prompts`.")
    eval_split: str = _field("train", "Split of `eval_prompts`.")
    max_eval_prompts: int | None = _field(64, "Use only the first N evaluation prompts.")
    eval_samples: int = _field(2, "Samples per evaluation prompt.")
    gold: str | None = _field(None, "Gold reward for evaluation (lab): same forms as `reward`, e.g. 'world'.")
    # TrainingArguments fields with chipo rl's defaults
    max_steps: int = _field(100, "Optimizer steps (RL has no epochs).")
    learning_rate: float = _field(1e-5, "Peak learning rate.")
    lr_scheduler_type: str = _field("constant", "transformers scheduler name (constant, linear, cosine, ...).")
    optim: str = _field("adamw_torch", "Optimizer (transformers optim name; adam_beta1/2, adam_epsilon, "
                                       "weight_decay apply).")
    seed: int = _field(0, "Random seed: initial state, prompt order and the sampling seeds derive from it.")
    logging_steps: float = _field(1, "Log metrics (metrics.jsonl, stdout, report_to) every N steps (< 1: a fraction "
                                     "of max_steps).")
    eval_steps: float | None = _field(None, "Evaluate on `eval_prompts` every N steps (and at step 0): proxy reward, "
                                            "KL, chi2 and, with `gold`, the gold reward. null: no evaluation.")
    save_steps: float = _field(50, "Checkpoint (accelerate state: policy, optimizer, scheduler, RNG) every N steps "
                                   "and at the last step, as checkpoint-<step>; save_strategy=no disables.")
    save_total_limit: int | None = _field(2, "Keep at most N checkpoints (null: all).")
    # None first: HfArgumentParser (TRL's TrlParser) then reads it as str; str | list[str] | None crashes it
    report_to: None | str | list[str] = _field("none", "Trackers: none, tensorboard, wandb, ... (comma-separated).")
    resume_from_checkpoint: str | None = _field(None, "'latest' (the newest checkpoint-<step> in output_dir; a fresh "
                                                      "start when there is none) or a checkpoint directory.")

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
        for name in ("max_new_tokens", "generation_batch_size", "max_steps", "prompts_per_step", "eval_samples",
                     "logprob_chunk", "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("logging_steps", "save_steps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.eval_steps is not None and not self.eval_steps > 0:
            raise ConfigError(f"eval_steps must be positive or null, got {self.eval_steps}")
        if self.prompts_per_step % self.gradient_accumulation_steps:
            raise ConfigError(f"prompts_per_step ({self.prompts_per_step}) must be divisible by "
                              f"gradient_accumulation_steps ({self.gradient_accumulation_steps})")
        for name in ("max_prompts", "max_eval_prompts", "max_prompt_length", "save_total_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.logprobs_impl not in LOGPROB_IMPLS:
            raise ConfigError(f"logprobs_impl must be one of {', '.join(LOGPROB_IMPLS)}, got {self.logprobs_impl!r}")
        for name in ("save_strategy", "eval_strategy", "logging_strategy"):
            if str(getattr(self, name)).split(".")[-1].lower() in ("epoch", "best"):
                raise ConfigError(f"{name} must be 'steps' or 'no' (chipo rl counts steps, not epochs)")
        check_common_arguments(self)
        if self.eval_steps and str(self.eval_strategy).split(".")[-1].lower() == "no":
            self.eval_strategy = "steps"
        finish_training_arguments(self, TrainingArguments)

    # --- step intervals as integers (0: never)
    def every(self, what: str) -> int:
        """Interval in steps of 'logging', 'eval' or 'save' (0: never), per the *_strategy and *_steps fields."""
        strategy = str(getattr(self, f"{what}_strategy")).split(".")[-1].lower()
        if strategy == "no":
            return 0
        return interval(getattr(self, f"{what}_steps"), self.max_steps)
