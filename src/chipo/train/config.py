"""``chipo train`` configuration: every field has help text; ``__post_init__`` validates values."""

from __future__ import annotations

from dataclasses import dataclass

from chipo.config import ConfigError, _field
from chipo.losses import loss_names, resolve_options

REFERENCE_MODES = ("precompute", "model")
LOGPROB_IMPLS = ("auto", "fused", "logits")


@dataclass
class TrainConfig:
    """Preference training of a causal LM (chiPO, DPO and variants) on a preference dataset."""

    model: str = _field(None, "Policy to train: a hub model name or a local HF directory (also pi_ref by default).")
    dataset: str = _field(None, "Preference data: hub dataset name, local .json/.jsonl/.parquet/.arrow file, or a "
                                "directory saved by datasets. TRL formats: standard, conversational, implicit prompt.")
    output_dir: str = _field("outputs/chipo-run", "Where checkpoints, the final HF model, run_config.yaml and "
                                                  "metrics.jsonl go.")
    overwrite_output_dir: bool = _field(False, "Allow writing into a non-empty output_dir (otherwise an error).")
    split: str = _field("train", "Training split of `dataset`.")
    eval_dataset: str | None = _field(None, "Evaluation data (same forms as `dataset`); default: `dataset`.")
    eval_split: str | None = _field(None, "Evaluation split; null disables evaluation.")
    max_train_samples: int | None = _field(None, "Use only the first N training rows (debugging, demos).")
    tokenizer: str | None = _field(None, "Tokenizer name or path; default: `model`.")
    # --- the objective
    loss: str = _field("chipo", f"Preference loss preset: {', '.join(loss_names())}.")
    beta: float = _field(0.1, "Regularisation strength beta (> 0): implicit reward = beta * link(pi/pi_ref).")
    r_max: float | str | None = _field("default", "Reward bound of the margin clip [-2 r_max, 2 r_max]. 'default': "
                                                  "the loss's own (chipo: 5.0, others: none); a number clips any "
                                                  "loss; null: no clip.")
    link: str | None = _field(None, "Override the loss's link: kl, chi2mix, chi2, fkl, js, alpha.")
    label_smoothing: float | None = _field(None, "Label-flip rate for robust/cdpo (default: the loss's own, 0.1).")
    alpha: float = _field(0.5, "Parameter of the alpha-divergence link, in (0, 1).")
    # --- reference model
    reference: str = _field("precompute", "How pi_ref's log-probs are obtained: 'precompute' (once, before "
                                          "training, cached on disk and shared by sweeps) or 'model' (a frozen "
                                          "copy evaluated every step).")
    ref_model: str | None = _field(None, "Reference model name/path; default: the initial policy (`model`).")
    ref_cache_dir: str = _field("~/.cache/chipo/ref_logps", "Directory of the reference log-prob cache.")
    # --- sequence handling
    max_length: int = _field(512, "Max tokens of prompt + response; responses are cut to fit (see docs).")
    max_prompt_length: int | None = _field(None, "Max prompt tokens; longer prompts keep their last tokens.")
    logprobs_impl: str = _field("auto", "'fused' (logits only at response tokens, chunked, recomputed in "
                                        "backward), 'logits' (chunked log-softmax of full logits), or 'auto'.")
    logprob_chunk: int = _field(1024, "Tokens per chunk in the fused log-prob path.")
    padding_buckets: int = _field(4, "Run each batch as up to N forwards over rows of similar length, skipping most "
                                     "padding; same results up to round-off, sample order unchanged. Single-process "
                                     "runs only (DDP needs one forward per backward); 1 disables.")
    group_by_length: bool = _field(False, "Batch rows of similar length together (less padding; changes the "
                                          "sample order beyond plain shuffling, so off by default).")
    # --- LoRA
    lora: bool = _field(False, "Train LoRA adapters (peft); the reference is the base model with adapters off.")
    lora_r: int = _field(16, "LoRA rank.")
    lora_alpha: int = _field(32, "LoRA scaling alpha.")
    lora_dropout: float = _field(0.0, "LoRA dropout.")
    lora_target_modules: str = _field("all-linear", "Modules to adapt (peft syntax, comma-separated or all-linear).")
    # --- optimisation (passed to transformers.TrainingArguments)
    num_train_epochs: float = _field(1.0, "Epochs over the training data.")
    max_steps: int = _field(-1, "Stop after this many optimizer steps (overrides epochs when > 0).")
    per_device_train_batch_size: int = _field(8, "Preference pairs per device per micro-batch.")
    per_device_eval_batch_size: int = _field(8, "Pairs per device per evaluation batch.")
    gradient_accumulation_steps: int = _field(1, "Micro-batches per optimizer step.")
    learning_rate: float = _field(5e-7, "Peak learning rate.")
    optim: str = _field("adamw_torch_fused", "Optimizer name understood by transformers (adamw_torch_fused, "
                                             "adamw_torch, sgd, adafactor, ...).")
    lr_scheduler_type: str = _field("linear", "transformers scheduler name (linear, cosine, constant, ...).")
    warmup_ratio: float = _field(0.0, "Fraction of steps of linear warm-up, in [0, 1).")
    weight_decay: float = _field(0.0, "AdamW weight decay.")
    max_grad_norm: float = _field(1.0, "Gradient clipping norm (0 disables).")
    seed: int = _field(42, "Random seed (data order, initialisation of adapters, dropout).")
    bf16: bool = _field(False, "bf16 mixed precision (margins and divergences stay fp32).")
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
        if isinstance(self.r_max, str):
            if self.r_max.lower() in ("none", "null", "off"):
                self.r_max = None
            elif self.r_max != "default":
                raise ConfigError(f"r_max: expected a number, 'default' or null, got {self.r_max!r}")
        if not self.beta > 0:
            raise ConfigError(f"beta must be positive, got {self.beta}")
        try:
            resolve_options(self.loss, **self.loss_options())
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if self.reference not in REFERENCE_MODES:
            raise ConfigError(f"reference must be one of {', '.join(REFERENCE_MODES)}, got {self.reference!r}")
        if self.logprobs_impl not in LOGPROB_IMPLS:
            raise ConfigError(f"logprobs_impl must be one of {', '.join(LOGPROB_IMPLS)}, got {self.logprobs_impl!r}")
        if self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2, got {self.max_length}")
        if self.max_prompt_length is not None and not 0 < self.max_prompt_length < self.max_length:
            raise ConfigError(f"max_prompt_length must lie in (0, max_length={self.max_length}), "
                              f"got {self.max_prompt_length}")
        for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps",
                     "logging_steps", "logprob_chunk", "lora_r", "padding_buckets"):
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

    def loss_options(self) -> dict:
        """Options for ``chipo.losses.preference_loss`` (only those that differ from the preset's defaults)."""
        opts: dict = {"alpha": self.alpha}
        if self.r_max != "default":
            opts["r_max"] = self.r_max
        if self.link is not None:
            opts["link"] = self.link
        if self.label_smoothing is not None:
            opts["label_smoothing"] = self.label_smoothing
        return opts
