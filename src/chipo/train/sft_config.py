"""``chipo sft`` configuration: every field has help text; ``__post_init__`` validates values.

Field names shared with ``TrainConfig`` mean the same thing and are spelled the same, so the recipe reuses
``chipo.train.run``'s helpers (``training_arguments``, ``check_output_dir``) instead of copying them.
"""

from __future__ import annotations

from dataclasses import dataclass

from chipo.config import ConfigError, _field


@dataclass
class SFTConfig:
    """Supervised fine-tuning of a causal LM on prompt/completion data, loss on completion tokens only."""

    model: str = _field(None, "Model to fine-tune: a hub model name or a local HF directory.")
    dataset: str = _field(None, "SFT data: hub dataset name (e.g. trl-lib/tldr), local .json/.jsonl/.parquet/.arrow "
                                "file, or a directory saved by datasets. Layouts: prompt + completion (strings, or "
                                "lists of messages), or messages (the final assistant message is the completion).")
    output_dir: str = _field("outputs/chipo-sft", "Where checkpoints, the final HF model, run_config.yaml and "
                                                  "metrics.jsonl go.")
    overwrite_output_dir: bool = _field(False, "Allow writing into a non-empty output_dir (otherwise an error).")
    split: str = _field("train", "Training split of `dataset`.")
    eval_dataset: str | None = _field(None, "Evaluation data (same forms as `dataset`); default: `dataset`.")
    eval_split: str | None = _field(None, "Evaluation split; null disables evaluation.")
    max_train_samples: int | None = _field(None, "Use only the first N training rows (debugging, demos).")
    tokenizer: str | None = _field(None, "Tokenizer name or path; default: `model`.")
    # --- sequence handling
    max_length: int = _field(1024, "Max tokens of prompt + completion; completions are cut to fit (see "
                                   "chipo.train.sft: truncation).")
    max_prompt_length: int | None = _field(None, "Max prompt tokens; longer prompts keep their last tokens.")
    completion_only_loss: bool = _field(True, "Loss on completion tokens only (labels -100 on the prompt); false "
                                              "also trains on the prompt tokens.")
    group_by_length: bool = _field(False, "Batch rows of similar length together (less padding; changes the "
                                          "sample order beyond plain shuffling, so off by default).")
    # --- optimisation (passed to transformers.TrainingArguments)
    num_train_epochs: float = _field(1.0, "Epochs over the training data.")
    max_steps: int = _field(-1, "Stop after this many optimizer steps (overrides epochs when > 0).")
    per_device_train_batch_size: int = _field(8, "Rows per device per micro-batch.")
    per_device_eval_batch_size: int = _field(8, "Rows per device per evaluation batch.")
    gradient_accumulation_steps: int = _field(1, "Micro-batches per optimizer step.")
    learning_rate: float = _field(2e-5, "Peak learning rate.")
    optim: str = _field("adamw_torch", "Optimizer name understood by transformers (adamw_torch, sgd, adafactor, ...).")
    lr_scheduler_type: str = _field("cosine", "transformers scheduler name (linear, cosine, constant, ...).")
    warmup_ratio: float = _field(0.03, "Fraction of steps of linear warm-up, in [0, 1).")
    weight_decay: float = _field(0.0, "AdamW weight decay.")
    max_grad_norm: float = _field(1.0, "Gradient clipping norm (0 disables).")
    seed: int = _field(42, "Random seed (data order, dropout).")
    bf16: bool = _field(False, "bf16 mixed precision.")
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
        if self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2, got {self.max_length}")
        if self.max_prompt_length is not None and not 0 < self.max_prompt_length < self.max_length:
            raise ConfigError(f"max_prompt_length must lie in (0, max_length={self.max_length}), "
                              f"got {self.max_prompt_length}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "save_steps"):
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
        if self.eval_steps is not None and self.eval_steps < 1:
            raise ConfigError(f"eval_steps must be at least 1, got {self.eval_steps}")
