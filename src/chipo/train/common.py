"""What every chipo command built on ``transformers.Trainer`` shares: config fields and TrainingArguments.

``TrainerConfig`` holds the data, sequence and optimisation fields that ``chipo train``, ``chipo sft`` and
``chipo reward`` spell and validate identically; each command's config subclasses it, adds its own fields and may
redeclare a field to change its default or help (a redeclared field keeps its place). ``training_arguments``
turns any of them into ``TrainingArguments``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from transformers import TrainingArguments

from chipo.config import ConfigError, _field
from chipo.rundir import latest_complete_checkpoint

logger = logging.getLogger("chipo")


@dataclass
class TrainerConfig:
    """Fields shared by the Trainer-based commands (see the subclasses for what ``dataset`` holds)."""

    model: str = _field(None, "Model to train: a hub model name or a local HF directory.")
    dataset: str = _field(None, "Training data: hub dataset name, local .json/.jsonl/.parquet/.arrow file, or a "
                                "directory saved by datasets.")
    output_dir: str = _field("outputs/chipo-run", "Where checkpoints, the final HF model, run_config.yaml and "
                                                  "metrics.jsonl go.")
    overwrite_output_dir: bool = _field(False, "Allow writing into a non-empty output_dir (otherwise an error).")
    split: str = _field("train", "Training split of `dataset`.")
    eval_dataset: str | None = _field(None, "Evaluation data (same forms as `dataset`); default: `dataset`.")
    eval_split: str | None = _field(None, "Evaluation split; null disables evaluation.")
    max_train_samples: int | None = _field(None, "Use only the first N training rows (debugging, demos).")
    tokenizer: str | None = _field(None, "Tokenizer name or path; default: `model`.")
    # --- sequence handling
    max_length: int = _field(512, "Max tokens of prompt + response; responses are cut to fit.")
    max_prompt_length: int | None = _field(None, "Max prompt tokens; longer prompts keep their last tokens.")
    # --- optimisation (passed to transformers.TrainingArguments)
    num_train_epochs: float = _field(1.0, "Epochs over the training data.")
    max_steps: int = _field(-1, "Stop after this many optimizer steps (overrides epochs when > 0).")
    per_device_train_batch_size: int = _field(8, "Rows (pairs) per device per micro-batch.")
    per_device_eval_batch_size: int = _field(8, "Rows (pairs) per device per evaluation batch.")
    gradient_accumulation_steps: int = _field(1, "Micro-batches per optimizer step.")
    learning_rate: float = _field(1e-5, "Peak learning rate.")
    optim: str = _field("adamw_torch_fused", "Optimizer name understood by transformers (adamw_torch_fused, "
                                             "adamw_torch, sgd, adafactor, ...).")
    lr_scheduler_type: str = _field("linear", "transformers scheduler name (linear, cosine, constant, ...).")
    warmup_ratio: float = _field(0.0, "Fraction of steps of linear warm-up, in [0, 1).")
    weight_decay: float = _field(0.0, "AdamW weight decay.")
    max_grad_norm: float = _field(1.0, "Gradient clipping norm (0 disables).")
    seed: int = _field(42, "Random seed (data order, initialisation, dropout).")
    bf16: bool = _field(False, "bf16 mixed precision (losses, margins and divergences stay fp32).")
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
        if self.eval_steps is not None and self.eval_steps < 1:
            raise ConfigError(f"eval_steps must be at least 1, got {self.eval_steps}")
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


def resolve_resume(resume: str | None, output_dir: str | os.PathLike) -> str | None:
    """``resume_from_checkpoint`` for Trainer.train: 'latest' becomes the newest checkpoint in ``output_dir``
    (None, with a warning, when there is none yet, so the same command starts or resumes a run)."""
    if resume != "latest":
        return resume
    latest = latest_complete_checkpoint(output_dir)  # skips checkpoints a kill cut short
    if latest is None:
        logger.warning("resume_from_checkpoint=latest but no checkpoint in %s: starting fresh", output_dir)
    return None if latest is None else str(latest)


def training_arguments(config: TrainerConfig, has_eval: bool) -> TrainingArguments:
    """``TrainingArguments`` for ``config``. Build it before anything distributed: it sets up accelerate's state."""
    eval_strategy = "no" if not has_eval else ("steps" if config.eval_steps else "epoch")
    group_by_length = getattr(config, "group_by_length", False)
    return TrainingArguments(
        output_dir=config.output_dir,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        optim=config.optim,
        lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of total steps
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        bf16=config.bf16,
        fp16=config.fp16,
        activation_checkpointing=config.gradient_checkpointing,
        logging_steps=config.logging_steps,
        logging_first_step=True,
        eval_strategy=eval_strategy,
        eval_steps=config.eval_steps,
        save_strategy=config.save_strategy,
        save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        report_to=[r for r in config.report_to.split(",") if r and r != "none"] or "none",
        dataloader_num_workers=config.dataloader_num_workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=config.disable_tqdm,
        remove_unused_columns=False,
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        length_column_name="length",
        # Without an accelerator, use_cpu makes accelerate set up gloo DDP under torchrun / accelerate launch.
        use_cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
    )
