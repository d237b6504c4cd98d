"""``chipo train`` configuration: a ``TrainingArguments`` subclass (every HF option works) with the objective,
reference, speed and LoRA fields; every field has help text and ``__post_init__`` validates values."""

from __future__ import annotations

from dataclasses import dataclass

from chipo.config import ConfigError, _field
from chipo.divergences import EXP_CLAMP
from chipo.losses import loss_names, resolve_options
from chipo.sequences import LOGPROB_IMPLS
from chipo.train.common import TrainerConfig
from chipo.train.monitor_fields import MonitorFields

REFERENCE_MODES = ("precompute", "model")


@dataclass
class PreferenceLossFields:
    """The objective: a ``chipo.losses.preference_loss`` preset and its options (shared by ``chipo train`` and
    ``chipo online``)."""

    loss: str = _field("chipo", f"Preference loss preset: {', '.join(loss_names())}.")
    beta: float = _field(0.1, "Regularisation strength beta (> 0): implicit reward = beta * link(pi/pi_ref).")
    r_max: float | None = _field(None, "Reward bound of the margin clip [-2 r_max, 2 r_max]; a number clips any "
                                       "loss. null: the loss's own (chipo: 5.0; the others: no clip).")
    clip_margin: bool = _field(True, "false: no margin clip at all, whatever the loss (chiPO without its clip).")
    link: str | None = _field(None, "Override the loss's link: kl, chi2mix, chi2, fkl, js, alpha.")
    label_smoothing: float | None = _field(None, "Label-flip rate for robust/cdpo (default: the loss's own, 0.1).")
    alpha: float = _field(0.5, "alpha-divergence link (z^(alpha-1) - 1)/(alpha - 1), alpha in (0, 1): TRL's "
                               "f_alpha_divergence_coef.")
    length_normalize: bool | None = _field(None, "Average log-probs over the response length (default: the loss's "
                                                 "own; on for ipo, as in TRL).")
    sft_weight: float = _field(0.0, "Add this times the token-mean NLL of the chosen responses (RPO, Liu et al. "
                                    "2024, arXiv 2405.16436; TRL's 'sft' loss term).")
    reward_bound: float | None = _field(None, "Experimental: clip each implicit reward into [-bound, bound] (no "
                                              "gradient outside) before the margin; null: off.")
    exp_clamp: float = _field(EXP_CLAMP, "Largest exponent in z = exp(log pi - log pi_ref) (overflow guard).")

    def check_loss(self) -> None:
        """One-line ``ConfigError`` unless beta and the loss options are valid."""
        if not self.beta > 0:
            raise ConfigError(f"beta must be positive, got {self.beta}")
        try:
            resolve_options(self.loss, **self.loss_options())
        except ValueError as e:
            raise ConfigError(str(e)) from None

    def loss_options(self) -> dict:
        """Options for ``chipo.losses.preference_loss`` (only those that differ from the preset's defaults)."""
        opts: dict = {"alpha": self.alpha}
        if self.exp_clamp != EXP_CLAMP:
            opts["exp_clamp"] = self.exp_clamp
        if not self.clip_margin:
            opts["r_max"] = None
        elif self.r_max is not None:
            opts["r_max"] = self.r_max
        for name in ("link", "label_smoothing", "length_normalize", "reward_bound"):
            if getattr(self, name) is not None:
                opts[name] = getattr(self, name)
        if self.sft_weight:
            opts["sft_weight"] = self.sft_weight
        return opts


@dataclass
class PreferenceConfig(TrainerConfig, PreferenceLossFields, MonitorFields):
    """Preference training of a causal LM (chiPO, DPO and variants) on a preference dataset."""

    RENAMED_KEYS = {"lora_r": "lora_rank", "lora_alpha": "lora_scaling_alpha", "lora_dropout": "lora_dropout_rate",
                    "lora_target_modules": "lora_modules"}

    model: str = _field(None, "Policy to train: a hub model name or a local HF directory (also pi_ref by default).")
    dataset: str = _field(None, "Preference data: hub dataset name, local .json/.jsonl/.parquet/.arrow file, or a "
                                "directory saved by datasets. TRL formats: standard, conversational, implicit prompt.")
    learning_rate: float = _field(5e-7, "Peak learning rate.")
    drop_ties: bool = _field(False, "Drop rows whose chosen and rejected responses are identical (counted in the "
                                    "log); otherwise such rows are an error naming them.")
    # --- reference model
    reference: str = _field("precompute", "How pi_ref's log-probs are obtained: 'precompute' (once, before "
                                          "training, cached on disk and shared by sweeps) or 'model' (a frozen "
                                          "copy evaluated every step).")
    ref_model: str | None = _field(None, "Reference model name/path; default: the initial policy (`model`).")
    ref_cache_dir: str | None = _field(None, "Directory of the reference log-prob cache; null: "
                                             "$CHIPO_CACHE/ref_logps (CHIPO_CACHE defaults to ~/.cache/chipo).")
    # --- speed
    logprobs_impl: str = _field("auto", "'fused' (logits only at response tokens, chunked, recomputed in "
                                        "backward), 'logits' (chunked log-softmax of full logits), or 'auto'.")
    logprob_chunk: int = _field(1024, "Tokens per chunk in the fused log-prob path.")
    padding_buckets: int = _field(4, "Run each batch as up to N forwards over rows of similar length, skipping most "
                                     "padding; same results up to round-off, sample order unchanged. Single-process "
                                     "runs only (DDP needs one forward per backward); 1 disables.")
    packing: bool = _field(True, "Padding-free batches: chosen and rejected sequences side by side in rows no "
                                 "wider than the longest, position_ids restarting per sequence, attention "
                                 "confined to each (transformers' sdpa/eager/flex masks; flash-attention varlen "
                                 "in one row). Same results up to round-off; one forward, so DDP works too. "
                                 "Replaces padding_buckets; on by default: faster than padding_buckets=4 on CPU "
                                 "(benchmarks/RESULTS.md). false: padded rows.")
    remove_unused_columns: bool = _field(True, "Drop the dataset columns the trainer does not read (it reads the "
                                               "tokenized prompt/chosen/rejected, the row index, the cached reference "
                                               "log-probs and the length column); false keeps every column, for a "
                                               "data_collator of your own. On by default, as in TRL's DPOConfig.")
    # --- LoRA
    # Not lora_r / lora_alpha / lora_dropout / lora_target_modules: TRL's ModelConfig declares those (for its
    # peft_config), and TrlParser((ScriptArguments, PreferenceConfig, ModelConfig)) refuses a name declared twice.
    # chipo's parser still reads the old names (RENAMED_KEYS).
    lora: bool = _field(False, "Train LoRA adapters (peft); the reference is the base model with adapters off. "
                               "(From a TRL script: ModelConfig's --use_peft gives peft_config instead.)")
    lora_rank: int = _field(16, "LoRA rank r (also read as lora_r).")
    lora_scaling_alpha: int = _field(32, "LoRA scaling alpha (also read as lora_alpha).")
    lora_dropout_rate: float = _field(0.0, "LoRA dropout (also read as lora_dropout).")
    lora_modules: str = _field("all-linear", "Modules to adapt (peft syntax, comma-separated or all-linear; also "
                                             "read as lora_target_modules).")

    def __post_init__(self) -> None:
        self.check_loss()
        self.check_monitor()
        if self.reference not in REFERENCE_MODES:
            raise ConfigError(f"reference must be one of {', '.join(REFERENCE_MODES)}, got {self.reference!r}")
        if self.logprobs_impl not in LOGPROB_IMPLS:
            raise ConfigError(f"logprobs_impl must be one of {', '.join(LOGPROB_IMPLS)}, got {self.logprobs_impl!r}")
        for name in ("logprob_chunk", "lora_rank", "padding_buckets"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        super().__post_init__()
