"""``chipo reward`` configuration: every field has help text; ``__post_init__`` validates values."""

from __future__ import annotations

from dataclasses import dataclass

from chipo.config import ConfigError, _field


@dataclass
class RewardConfig:
    """Bradley-Terry reward-model training on preference data (the same formats as ``chipo train``)."""

    model: str = _field(None, "Base model: a hub name or local HF directory (a causal LM gets a fresh 1-output "
                              "score head via AutoModelForSequenceClassification).")
    dataset: str = _field(None, "Preference data: hub name, .json/.jsonl/.parquet/.arrow file or a datasets "
                                "directory; TRL formats standard, conversational, implicit prompt.")
    output_dir: str = _field("outputs/chipo-reward", "Where checkpoints, the final HF reward model, "
                                                     "run_config.yaml and metrics.jsonl go.")
    overwrite_output_dir: bool = _field(False, "Allow writing into a non-empty output_dir (otherwise an error).")
    split: str = _field("train", "Training split of `dataset`.")
    eval_dataset: str | None = _field(None, "Evaluation data (same forms as `dataset`); default: `dataset`.")
    eval_split: str | None = _field(None, "Evaluation split (accuracy and margin are logged on it); null: none.")
    max_train_samples: int | None = _field(None, "Use only the first N training rows (debugging, demos).")
    tokenizer: str | None = _field(None, "Tokenizer name or path; default: `model`.")
    # --- the objective
    margin_column: str | None = _field(None, "Optional column of per-pair margins m: loss -log sigmoid(r+ - r- - m) "
                                             "(Llama 2's margin loss). null: no margin.")
    center_rewards_coefficient: float | None = _field(None, "Optional reward centering: adds coef * (r+ + r-)^2 "
                                                            "per pair, pulling rewards toward zero mean "
                                                            "(Eisenstein et al. 2023). null: off.")
    # --- sequence handling
    max_length: int = _field(512, "Max tokens of prompt + response; responses are cut to fit.")
    max_prompt_length: int | None = _field(None, "Max prompt tokens; longer prompts keep their last tokens.")
    # --- optimisation (passed to transformers.TrainingArguments)
    num_train_epochs: float = _field(1.0, "Epochs over the training data.")
    max_steps: int = _field(-1, "Stop after this many optimizer steps (overrides epochs when > 0).")
    per_device_train_batch_size: int = _field(8, "Preference pairs per device per micro-batch.")
    per_device_eval_batch_size: int = _field(8, "Pairs per device per evaluation batch.")
    gradient_accumulation_steps: int = _field(1, "Micro-batches per optimizer step.")
    learning_rate: float = _field(1e-5, "Peak learning rate.")
    optim: str = _field("adamw_torch", "Optimizer name understood by transformers.")
    lr_scheduler_type: str = _field("linear", "transformers scheduler name (linear, cosine, constant, ...).")
    warmup_ratio: float = _field(0.0, "Fraction of steps of linear warm-up, in [0, 1).")
    weight_decay: float = _field(0.0, "AdamW weight decay.")
    max_grad_norm: float = _field(1.0, "Gradient clipping norm (0 disables).")
    seed: int = _field(42, "Random seed (data order, score-head initialisation).")
    bf16: bool = _field(False, "bf16 mixed precision (the loss stays fp32).")
    fp16: bool = _field(False, "fp16 mixed precision with loss scaling.")
    gradient_checkpointing: bool = _field(False, "Recompute activations in backward to save memory.")
    logging_steps: int = _field(10, "Log metrics every N optimizer steps.")
    eval_steps: int | None = _field(None, "Evaluate every N steps (default: at the end of each epoch).")
    save_strategy: str = _field("epoch", "When to save checkpoints: epoch, steps or no.")
    save_steps: int = _field(500, "Checkpoint every N steps when save_strategy=steps.")
    save_total_limit: int | None = _field(None, "Keep at most N checkpoints.")
    report_to: str = _field("none", "Loggers: none, tensorboard, wandb (comma-separated).")
    resume_from_checkpoint: str | None = _field(None, "'latest' or a checkpoint directory to resume from.")
    dataloader_num_workers: int = _field(0, "DataLoader worker processes.")
    num_proc: int | None = _field(None, "Processes for dataset tokenisation.")
    disable_tqdm: bool = _field(False, "Hide progress bars.")

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model is required (a hub name or a local directory)")
        if not self.dataset:
            raise ConfigError("dataset is required (a hub name or a local file/directory)")
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise ConfigError(f"center_rewards_coefficient must be >= 0, got {self.center_rewards_coefficient}")
        if self.margin_column is not None and not self.margin_column.strip():
            raise ConfigError("margin_column must be a column name or null")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2, got {self.max_length}")
        if self.max_prompt_length is not None and not 0 < self.max_prompt_length < self.max_length:
            raise ConfigError(f"max_prompt_length must lie in (0, max_length={self.max_length}), "
                              f"got {self.max_prompt_length}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.learning_rate <= 0:
            raise ConfigError(f"learning_rate must be positive, got {self.learning_rate}")
        if self.num_train_epochs <= 0 and self.max_steps <= 0:
            raise ConfigError("set num_train_epochs > 0 or max_steps > 0")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ConfigError(f"warmup_ratio must lie in [0, 1), got {self.warmup_ratio}")
        if self.bf16 and self.fp16:
            raise ConfigError("choose at most one of bf16 and fp16")
        if self.save_strategy not in ("epoch", "steps", "no"):
            raise ConfigError(f"save_strategy must be epoch, steps or no, got {self.save_strategy!r}")
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ConfigError(f"max_train_samples must be at least 1, got {self.max_train_samples}")
