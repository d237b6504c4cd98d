"""The config base of the sampled-data trainers (``chipo rl``, ``chipo online``): ``SampledConfig``.

A ``transformers.TrainingArguments`` subclass, as every chipo trainer config is. It declares the fields both loops
read in the same way (the policy and its prompts, sampling, the optimizer and schedule, logging, checkpoints,
resume) with their help text, and validates them; ``RLConfig`` and ``OnlineConfig`` add their objective. The loop
that reads them is ``chipo.train.sampled.SampledTrainer``; the TrainingArguments keys it does not read are refused
(``chipo.train.honoured``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from transformers import TrainingArguments

from chipo.config import ConfigError, _field
from chipo.sequences import LOGPROB_IMPLS
from chipo.train.common import check_common_arguments, finish_training_arguments
from chipo.train.honoured import SAMPLED_HONOURED, help_keys, refuse_unread
from chipo.train.loop import interval
from chipo.train.monitor_fields import MonitorFields


def strategy(value) -> str:
    """'steps', 'no', 'epoch', 'best' from an IntervalStrategy / SaveStrategy or its string."""
    return str(value).split(".")[-1].lower()


@dataclass
class SampledConfig(TrainingArguments, MonitorFields):
    """Fields shared by the trainers that sample their own data from the policy (``chipo rl``, ``chipo online``)."""

    honoured: ClassVar[frozenset[str]] = SAMPLED_HONOURED
    """TrainingArguments keys the loop reads; others are refused when set (``chipo.train.honoured``)."""
    command: ClassVar[str] = "chipo rl/online"
    objective_keys: ClassVar[tuple[str, ...]] = ("policy", "ref_model", "prompts")
    """run_config keys that define the objective (``chipo.train.rundir.open_run`` refuses a resume that changes one)."""

    policy: str = _field(None, "Policy to train: hub name or local HF causal-LM directory (also pi_ref by default).")
    prompts: str = _field(None, "Prompt data with a 'prompt' column (strings, or message lists for chat models): "
                                ".json/.jsonl/.parquet/.arrow file, datasets directory or hub name.")
    prompts_split: str = _field("train", "Split of `prompts`.")
    max_prompts: int | None = _field(None, "Use only the first N prompts.")
    ref_model: str | None = _field(None, "Reference pi_ref: model name/path; default: the initial policy.")
    tokenizer: str | None = _field(None, "Tokenizer name or path; default: `policy`.")
    output_dir: str = _field("outputs/chipo-sampled", "Where checkpoints, the final HF policy, run_config.yaml and "
                                                      "metrics.jsonl go.")
    overwrite_output_dir: bool = _field(False, "Start over in a non-empty output_dir: its previous run (checkpoints, "
                                               "metrics, final model) is removed first. Otherwise a non-empty "
                                               "output_dir is an error unless resuming.")
    # --- evaluation (every eval_steps steps and at step 0 when eval_steps is set)
    eval_prompts: str | None = _field(None, "Held-out prompt data (same forms as `prompts`); default: `prompts`.")
    eval_split: str = _field("train", "Split of `eval_prompts`.")
    max_eval_prompts: int | None = _field(64, "Use only the first N evaluation prompts.")
    # --- generation
    max_new_tokens: int = _field(64, "Max response tokens sampled per prompt.")
    temperature: float = _field(1.0, "Sampling temperature. The estimators assume samples from pi itself (1.0).")
    max_prompt_length: int | None = _field(None, "Max prompt tokens; longer prompts keep their last tokens.")
    # --- optimisation
    max_steps: int = _field(100, "Optimizer steps (no epochs: the data are sampled).")
    prompts_per_step: int = _field(8, "Prompts per optimizer step over all processes; must be divisible by "
                                      "num_processes x gradient_accumulation_steps.")
    gradient_accumulation_steps: int = _field(1, "Micro-batches per optimizer step on each process (each takes "
                                                 "prompts_per_step / (num_processes x this) prompts): same gradient, "
                                                 "less memory in the loss pass.")
    learning_rate: float = _field(1e-5, "Peak learning rate.")
    lr_scheduler_type: str = _field("constant", "transformers scheduler name (constant, linear, cosine, ...).")
    optim: str = _field("adamw_torch", "Optimizer (transformers optim name; adam_beta1/2, adam_epsilon, "
                                       "weight_decay apply).")
    seed: int = _field(0, "Random seed: prompt order and sampling are functions of (seed, step, prompt position).")
    logprobs_impl: str = _field("auto", "'fused', 'logits' or 'auto' (see chipo train).")
    logprob_chunk: int = _field(1024, "Tokens per chunk in the fused log-prob path.")
    packing: bool = _field(True, "Padding-free log-prob passes: the sampled sequences side by side in rows no wider "
                                 "than the longest, position_ids restarting per sequence, attention confined to each "
                                 "(as chipo train's packing). Checked once against padded rows (falls back with a "
                                 "warning if the model ignores position_ids); same results up to round-off; one "
                                 "forward, so DDP works too. false: padded rows.")
    # --- logging, checkpoints
    logging_steps: float = _field(1, "Log metrics (metrics.jsonl, stdout, report_to) every N steps (< 1: a fraction "
                                     "of max_steps) and at the last step.")
    save_steps: float = _field(50, "Checkpoint (accelerate state: policy, optimizer, scheduler, RNG; the step) every N "
                                   "steps and at the last step, as checkpoint-<step>; 0 or save_strategy=no: never "
                                   "(the final policy is always saved).")
    save_total_limit: int | None = _field(2, "Keep at most N checkpoints (null: all).")
    # None first: HfArgumentParser (TRL's TrlParser) then reads it as str; str | list[str] | None crashes it
    report_to: None | str | list[str] = _field("none", "Trackers (accelerate's): none, tensorboard, wandb, ... "
                                                       "(comma-separated).")
    resume_from_checkpoint: str | None = _field(None, "'latest' (the newest complete checkpoint-<step> in output_dir; "
                                                      "a fresh start when there is none) or a checkpoint directory.")

    @classmethod
    def help_keys(cls) -> set[str]:
        return help_keys(cls)

    def __post_init__(self) -> None:
        """Shared checks (one-line ``ConfigError``s), then TrainingArguments' own validation. Subclasses check
        their fields first and call this last."""
        for name in ("policy", "prompts"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is required")
        refuse_unread(self, type(self).honoured, type(self).command)
        if self.logprobs_impl not in LOGPROB_IMPLS:
            raise ConfigError(f"logprobs_impl must be one of {', '.join(LOGPROB_IMPLS)}, got {self.logprobs_impl!r}")
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be positive, got {self.temperature}")
        if not self.learning_rate > 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            raise ConfigError("weight_decay and max_grad_norm must be >= 0")
        for name in ("max_new_tokens", "max_steps", "prompts_per_step", "logprob_chunk",
                     "gradient_accumulation_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not self.logging_steps > 0:
            raise ConfigError(f"logging_steps must be positive, got {self.logging_steps}")
        if self.save_steps < 0:
            raise ConfigError(f"save_steps must be >= 0, got {self.save_steps}")
        if self.eval_steps is not None and not self.eval_steps > 0:
            raise ConfigError(f"eval_steps must be positive or null, got {self.eval_steps}")
        if self.prompts_per_step % self.gradient_accumulation_steps:
            raise ConfigError(f"prompts_per_step ({self.prompts_per_step}) must be divisible by "
                              f"gradient_accumulation_steps ({self.gradient_accumulation_steps})")
        for name in ("max_prompts", "max_prompt_length", "save_total_limit", "max_eval_prompts"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}")
        for name in ("save_strategy", "eval_strategy", "logging_strategy"):
            if strategy(getattr(self, name)) in ("epoch", "best"):
                raise ConfigError(f"{name} must be 'steps' or 'no' ({type(self).command} counts steps, not epochs)")
        self.check_monitor()
        check_common_arguments(self)
        if self.eval_steps and strategy(self.eval_strategy) == "no":
            self.eval_strategy = "steps"
        finish_training_arguments(self, TrainingArguments)

    def last_step(self) -> int:
        """The run's last optimizer step."""
        return self.max_steps

    def every(self, what: str) -> int:
        """Interval in steps of 'logging', 'eval' or 'save' (0: never), per the *_strategy and *_steps fields."""
        if strategy(getattr(self, f"{what}_strategy")) == "no":
            return 0
        return interval(getattr(self, f"{what}_steps"), self.max_steps)

    def accelerate_precision(self) -> str:
        """accelerate's name of the mixed precision that ``bf16`` / ``fp16`` ask for."""
        return "bf16" if self.bf16 else "fp16" if self.fp16 else "no"
