"""Typed configs of the TL;DR recipe's stages (help text per field, validation in ``__post_init__``).

Read like every chipo config (``chipo.config``): a YAML file (``--config recipes/tldr/<stage>.yaml``) and
``key=value`` overrides. The SFT stage takes ``chipo sft``'s own ``SFTConfig``; the judge stage also takes the
chosen judge's config (``chipo.judges``) from a nested YAML section (``openai:`` or ``reward_model:``) or
``openai.<key>=...`` / ``reward_model.<key>=...`` overrides (``load_judge_stage``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from chipo.config import ConfigError, _field, build_config, parse_overrides, read_yaml_mapping
from chipo.recipes.tldr.cost import CostAssumptions

DEFAULT_OUT = "runs/tldr"
BACKENDS = ("auto", "hf", "vllm")
DTYPES = ("float32", "bfloat16", "float16")
# chipo train keys the sweep sets itself: an override of one of them would break the sweep's bookkeeping.
SWEEP_OWNED_KEYS = frozenset({"model", "dataset", "output_dir", "overwrite_output_dir", "loss", "beta", "seed",
                              "num_train_epochs", "max_steps", "save_strategy", "reference", "ref_cache_dir",
                              "resume_from_checkpoint", "lr_scheduler_type", "warmup_ratio"})


@dataclass
class SweepStageConfig:
    """Preference training: one ``chipo train`` run per (loss, beta, seed), a checkpoint after every epoch."""

    sft_model: str = _field(None, "pi_ref and the initial policy: the SFT stage's output directory, or a public "
                                  "TL;DR SFT checkpoint by hub name.")
    out_dir: str = _field(DEFAULT_OUT, "Recipe directory shared by the sweep, generate, judge and report stages.")
    dataset: str = _field("trl-lib/tldr-preference", "Preference data (prompt, chosen, rejected): hub name or "
                                                     "local file/directory.")
    split: str = _field("train", "Training split.")
    max_train_samples: int | None = _field(None, "Train on the first N pairs only (smoke tests).")
    losses: list[str] = field(default_factory=lambda: ["dpo", "chipo"], metadata={"help": "Loss presets."})
    betas: list[float] = field(default_factory=lambda: [0.05, 0.005], metadata={"help": "beta values."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Training seeds (data order)."})
    epochs: int = _field(4, "Epochs of every run.")
    eval_epochs: list[int] = field(default_factory=lambda: [1, 2, 4],
                                   metadata={"help": "Epochs whose checkpoints are kept for generation."})
    learning_rate: float = _field(1e-6, "Learning rate, constant after warm-up (so the epoch-e checkpoint of a long "
                                        "run is the policy an e-epoch run would give).")
    warmup_epochs: float = _field(0.1, "Linear warm-up length in epochs (the same number of steps whatever "
                                       "`epochs` is).")
    per_device_train_batch_size: int = _field(8, "Pairs per device per micro-batch.")
    gradient_accumulation_steps: int = _field(8, "Micro-batches per optimizer step (batch = the product x GPUs).")
    per_device_eval_batch_size: int = _field(16, "Pairs per batch when computing the reference log-probs.")
    max_length: int = _field(640, "Max prompt + response tokens.")
    max_prompt_length: int | None = _field(512, "Max prompt tokens (longer prompts keep their last tokens).")
    r_max: float | None = _field(None, "chiPO's margin clip bound: a number, or null (chiPO's own, 5). Losses "
                                       "that do not clip (DPO) ignore it.")
    bf16: bool = _field(False, "bf16 mixed precision (margins stay fp32).")
    gradient_checkpointing: bool = _field(False, "Recompute activations in backward (needed for 2.8B on 80 GB).")
    logging_steps: int = _field(10, "Log every N optimizer steps.")
    keep_optimizer_states: bool = _field(False, "Keep optimizer/scheduler states in the kept checkpoints after a "
                                                "run finishes (only resuming needs them; at 2.8B they are ~22 GB "
                                                "each).")
    train_overrides: list[str] = field(default_factory=list, metadata={
        "help": "Extra `chipo train` keys as key=value for every run (e.g. optim=rmsprop, lora=true, "
                "disable_tqdm=true). The keys the sweep sets itself are refused."})
    overwrite: bool = _field(False, "Clear out_dir's previous sweep and everything the later stages made from it "
                                    "(runs, reference cache, generations, judgements, report; nothing else) and start "
                                    "again. Without it a rerun resumes, and other settings are refused.")

    def __post_init__(self) -> None:
        if not self.sft_model:
            raise ConfigError("sft_model is required (the SFT stage's output_dir or a hub name)")
        from chipo.lab.sweep import validate_grid

        validate_grid(self.losses, self.betas, self.seeds, self.epochs)
        self.eval_epochs = sorted(set(self.eval_epochs))
        if not self.eval_epochs or not all(1 <= e <= self.epochs for e in self.eval_epochs):
            raise ConfigError(f"eval_epochs must be non-empty and lie in [1, epochs={self.epochs}], "
                              f"got {self.eval_epochs}")
        if not 0 <= self.warmup_epochs < self.epochs:
            raise ConfigError(f"warmup_epochs must lie in [0, epochs={self.epochs}), got {self.warmup_epochs}")
        owned = sorted(SWEEP_OWNED_KEYS & set(parse_overrides(self.train_overrides)))
        if owned:
            raise ConfigError(f"train_overrides may not set {', '.join(owned)}: the sweep sets them (use its own "
                              "keys: losses, betas, seeds, epochs, learning_rate, warmup_epochs, ...)")

    def settings_key(self) -> dict:
        """Fields that change what a run produces: a rerun in the same out_dir must match them.

        losses, betas and seeds are not part of it: a sweep may be split across processes (one GPU each) or
        extended by more seeds in the same directory.
        """
        key = dataclasses.asdict(self)
        for name in ("out_dir", "losses", "betas", "seeds", "keep_optimizer_states", "logging_steps", "overwrite"):
            key.pop(name)
        return key


@dataclass
class GenerateStageConfig:
    """Sampling one summary per test prompt from every kept checkpoint and from the SFT model."""

    out_dir: str = _field(DEFAULT_OUT, "Recipe directory (the sweep's).")
    prompts_dataset: str = _field("trl-lib/tldr", "Test prompts with reference summaries: hub name or local "
                                                  "file/directory in trl-lib/tldr's layout (prompt, completion).")
    prompts_split: str = _field("test", "Split of `prompts_dataset`.")
    num_prompts: int = _field(512, "Use the first N rows of the split (a fixed, documented subset; in dataset "
                                   "order, no shuffling).")
    prompt_field: str = _field("prompt", "Column of the posts (ending with 'TL;DR:').")
    reference_field: str = _field("completion", "Column of the reference (human-written) summaries.")
    sft_model: str | None = _field(None, "pi_ref; default: the sweep's `sft_model` (from sweep.json).")
    include_sft: bool = _field(True, "Also sample the SFT model itself (the epoch-0 row of the report).")
    epochs: list[int] | None = _field(None, "Epochs to sample; default: every kept checkpoint (the sweep's "
                                            "eval_epochs).")
    max_new_tokens: int = _field(64, "Max summary tokens (TL;DR reference summaries are under 50 tokens).")
    temperature: float = _field(1.0, "Sampling temperature. 1 samples pi itself, which the KL estimates assume; "
                                     "any other value makes the KL columns estimates for the tempered policy.")
    top_p: float = _field(1.0, "Nucleus sampling (1: off; as for temperature, keep 1 for valid KL estimates).")
    top_k: int = _field(0, "Top-k sampling (0: off).")
    seed: int = _field(0, "Sampling seed; a run's cells use seed + the run's seed.")
    batch_size: int = _field(64, "Prompts per generation batch (HF backend).")
    logprob_batch_size: int = _field(16, "Sequences per batch when scoring log pi and log pi_ref.")
    max_prompt_length: int | None = _field(512, "Max prompt tokens (longer prompts keep their last tokens, as in "
                                                "training).")
    backend: str = _field("auto", "Sampler: 'vllm' (needs vllm and a GPU), 'hf' (transformers generate), or "
                                  "'auto' (vllm when installed and a GPU is present, else hf).")
    vllm_gpu_memory_utilization: float = _field(0.5, "vLLM's share of GPU memory (the HF scorer needs the rest).")
    dtype: str = _field("float32", "Weights' dtype for HF sampling and for scoring log pi and log pi_ref: float32 "
                                   "(default: the KL columns are differences of summed log-probs, where bf16 rounding "
                                   "of ~1e-2 per token adds ~0.1 nat of noise per summary), bfloat16, float16. vLLM "
                                   "samples in the model's own dtype.")
    regenerate: bool = _field(False, "Sample again every cell whose samples were made with other settings (else "
                                     "such a cell is an error, so one report never mixes settings).")
    overwrite: bool = _field(False, "Clear generations/ and sample every cell again (the judge stage then judges "
                                    "them again).")

    def __post_init__(self) -> None:
        for name in ("num_prompts", "max_new_tokens", "batch_size", "logprob_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be positive (sampling), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must lie in (0, 1], got {self.top_p}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.epochs is not None and any(e < 1 for e in self.epochs):
            raise ConfigError(f"epochs must be >= 1 (epoch 0 is the SFT model: include_sft), got {self.epochs}")

    def sampling(self, seed: int) -> dict:
        """The settings recorded with (and deciding) a cell's samples."""
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "top_k": self.top_k, "seed": seed, "max_prompt_length": self.max_prompt_length}


JUDGE_SECTIONS = {"openai": "openai", "reward-model": "reward_model"}


@dataclass
class JudgeStageConfig:
    """Win rate of every generated cell against the reference summaries, by one judge."""

    out_dir: str = _field(DEFAULT_OUT, "Recipe directory (the sweep's).")
    judge: str = _field("openai", "Judge kind: 'openai' (an LLM behind any OpenAI-compatible endpoint, settings in "
                                  "the `openai:` section) or 'reward-model' (settings in `reward_model:`).")
    tag: str | None = _field(None, "Name of this judge's results (judgements/<tag>/); default: the judge kind. "
                                   "Several judges can be kept side by side.")
    response_prefix: str = _field(" ", "Both summaries are stripped and given this prefix before judging, so the "
                                       "judge sees generated and reference summaries in the same form (TL;DR "
                                       "completions start with a space after 'TL;DR:').")
    max_invalid_frac: float = _field(0.05, "A cell with a larger fraction of items without a verdict (malformed or "
                                           "failed) is flagged in the report.")
    rejudge: bool = _field(False, "Judge every cell again (otherwise only new cells, cells whose samples changed, "
                                  "and cells with failed requests; cached replies are reused either way).")
    overwrite: bool = _field(False, "Clear this judge's results (judgements/<tag>/) and judge every cell again "
                                    "(cached replies are reused).")

    def __post_init__(self) -> None:
        if self.judge not in JUDGE_SECTIONS:
            raise ConfigError(f"judge must be one of {', '.join(JUDGE_SECTIONS)}, got {self.judge!r}")
        if self.tag is None:
            self.tag = self.judge
        if not self.tag or "/" in self.tag or self.tag.startswith("."):
            raise ConfigError(f"tag must be a plain directory name, got {self.tag!r}")
        if not 0 <= self.max_invalid_frac <= 1:
            raise ConfigError(f"max_invalid_frac must lie in [0, 1], got {self.max_invalid_frac}")


@dataclass
class ReportStageConfig(CostAssumptions):
    """The report: Table 1 layout, KL per cell, plots, GPU time (estimated from FLOPs and measured), commands."""

    out_dir: str = _field(DEFAULT_OUT, "Recipe directory (the sweep's).")
    tag: str | None = _field(None, "Judge results to report (judgements/<tag>/); default: the only one there.")
    output_dir: str | None = _field(None, "Where the report goes; default: <out_dir>/report.")
    max_invalid_frac: float = _field(0.05, "Flag cells with a larger fraction of items without a verdict.")


def load_judge_stage(path: str | None, overrides: list[str]) -> tuple[JudgeStageConfig, Any]:
    """(stage config, the chosen judge's config) from YAML + overrides.

    Top-level keys are the stage's; the ``openai`` and ``reward_model`` sections (YAML mappings, or
    ``openai.<key>=value`` overrides) hold each judge's own keys (``chipo judge --help``). Only the chosen judge's
    section is validated, so one judge.yaml can carry both.
    """
    from chipo.judges import JUDGE_CONFIGS

    values = read_yaml_mapping(path)
    sections: dict[str, dict] = {}
    for name in JUDGE_SECTIONS.values():
        section = values.pop(name, None) or {}
        if not isinstance(section, dict):
            raise ConfigError(f"{name}: expected a mapping of the judge's keys")
        sections[name] = dict(section)
    for key, value in parse_overrides(overrides).items():
        prefix, dot, rest = key.partition(".")
        if dot and prefix in sections:
            sections[prefix][rest] = value
        else:
            values[key] = value
    stage = build_config(JudgeStageConfig, values)
    kind = stage.judge
    try:
        judge_config = build_config(JUDGE_CONFIGS[kind], sections[JUDGE_SECTIONS[kind]])
    except ConfigError as e:
        raise ConfigError(f"{JUDGE_SECTIONS[kind]}: {e}") from None
    return stage, judge_config
