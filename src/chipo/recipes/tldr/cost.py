"""GPU time of the TL;DR recipe, estimated from FLOPs, with every assumption stated (``chipo tldr cost``).

FLOPs per token for a model of N parameters (Kaplan et al. 2020):

- training (forward + backward): 6 N per token; SFT trains on prompt + summary tokens, a preference pair on both
  sequences (chosen and rejected each carry the prompt): 2 (P + R) tokens per pair;
- reference log-probs: 2 N per token, once for the whole sweep (``reference=precompute``, cached on disk);
- sampling: 2 N per token (prefill P + decode R); decoding is memory-bound, so it runs at a far lower utilisation
  (``generation_mfu``) than training; log-probs of the samples under pi and pi_ref: 2 x 2 N (P + R);
- a reward-model judge: 2 N_rm per token on both summaries; an LLM judge is counted in tokens (an API bills
  tokens; a self-hosted judge of ``judge_params`` parameters is converted to GPU time like sampling).

GPU hours = FLOPs / (peak x MFU) / 3600. Padding, evaluation passes, checkpoint writes and start-up are not
counted: treat the result as a lower bound within a factor of about 1.5.
"""

from __future__ import annotations

from dataclasses import dataclass

from chipo.config import ConfigError, _field
from chipo.markdown import markdown_table

PYTHIA_PARAMS = {"pythia-1b": 1_011_781_632, "pythia-2.8b": 2_775_208_960}  # total, embeddings included (Pythia)


@dataclass
class CostAssumptions:
    """The numbers behind the GPU-time estimate (every one is printed with the estimate)."""

    model_params: float | None = _field(None, "Policy parameters N; null: counted from the SFT model's config when "
                                              "it is at hand (report), else Pythia-2.8B's 2.78e9.")
    sft_rows: int = _field(116_722, "SFT examples per epoch (trl-lib/tldr train split).")
    sft_epochs: float = _field(1.0, "SFT epochs.")
    pref_pairs: int = _field(92_858, "Preference pairs per epoch (trl-lib/tldr-preference train split).")
    prompt_tokens: int = _field(400, "Mean prompt (post) tokens, Pythia tokenizer (assumed, rounded up).")
    response_tokens: int = _field(50, "Mean summary tokens incl. EOS (assumed; TL;DR summaries are < 50 tokens).")
    runs: int = _field(12, "Training runs: losses x betas x seeds (2 x 2 x 3 in the paper).")
    epochs: int = _field(4, "Epochs per run.")
    eval_cells: int = _field(37, "Policies sampled and judged: runs x kept epochs (12 x 3) + the SFT model.")
    eval_prompts: int = _field(512, "Test prompts per cell.")
    gpu: str = _field("H100 SXM", "GPU of the estimate.")
    gpu_peak_tflops: float = _field(989.0, "Peak dense bf16 TFLOP/s of that GPU (H100 SXM: 989).")
    mfu: float = _field(0.4, "Model FLOPs utilisation of training and scoring (40% is typical for a well-fed "
                             "dense model of this size).")
    generation_mfu: float = _field(0.05, "Utilisation while sampling (memory-bound decoding with HF generate; vLLM "
                                         "reaches several times more).")
    rm_params: float | None = _field(None, "Reward-model judge parameters; null: N (a reward model of the policy's "
                                           "size).")
    judge_params: float | None = _field(None, "Parameters of a self-hosted LLM judge (GPU time like sampling); "
                                              "null: a hosted API, counted in tokens only.")
    judge_overhead_tokens: int = _field(250, "Judge instruction tokens per comparison (the TL;DR judge prompt).")
    judge_reply_tokens: int = _field(60, "Judge reply tokens per comparison (a short comparison + verdict).")

    def __post_init__(self) -> None:
        for name in ("sft_rows", "pref_pairs", "prompt_tokens", "response_tokens", "runs", "epochs", "eval_cells",
                     "eval_prompts"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("mfu", "generation_mfu"):
            if not 0 < getattr(self, name) <= 1:
                raise ConfigError(f"{name} must lie in (0, 1], got {getattr(self, name)}")
        if self.gpu_peak_tflops <= 0:
            raise ConfigError(f"gpu_peak_tflops must be positive, got {self.gpu_peak_tflops}")
        if self.model_params is not None and self.model_params <= 0:
            raise ConfigError(f"model_params must be positive, got {self.model_params}")


@dataclass
class StageCost:
    stage: str
    flops: float
    gpu_hours: float
    basis: str  # the formula with the numbers put in


def estimate(a: CostAssumptions, n_params: float) -> tuple[list[StageCost], dict]:
    """(per-stage GPU time, LLM-judge token counts) for ``n_params`` policy parameters."""
    seq = a.prompt_tokens + a.response_tokens
    train_rate = a.gpu_peak_tflops * 1e12 * a.mfu
    gen_rate = a.gpu_peak_tflops * 1e12 * a.generation_mfu

    def hours(flops: float, rate: float) -> float:
        return flops / rate / 3600

    n = n_params
    sft = 6 * n * a.sft_rows * seq * a.sft_epochs
    ref = 2 * n * a.pref_pairs * 2 * seq
    per_run = 6 * n * a.pref_pairs * 2 * seq * a.epochs
    sample = 2 * n * a.eval_cells * a.eval_prompts * seq
    score = 2 * 2 * n * a.eval_cells * a.eval_prompts * seq
    rm = a.rm_params or n
    rm_judge = 2 * rm * a.eval_cells * a.eval_prompts * 2 * seq
    rows = [
        StageCost("sft", sft, hours(sft, train_rate),
                  f"6 N x {a.sft_rows:,} rows x {seq} tokens x {a.sft_epochs:g} epoch(s)"),
        StageCost("sweep: reference log-probs (once)", ref, hours(ref, train_rate),
                  f"2 N x {a.pref_pairs:,} pairs x 2 x {seq} tokens"),
        StageCost(f"sweep: training ({a.runs} runs)", per_run * a.runs, hours(per_run * a.runs, train_rate),
                  f"6 N x {a.pref_pairs:,} pairs x 2 x {seq} tokens x {a.epochs} epochs x {a.runs} runs "
                  f"({hours(per_run, train_rate):.2f} h per run)"),
        StageCost("generate: sampling", sample, hours(sample, gen_rate),
                  f"2 N x {a.eval_cells} cells x {a.eval_prompts} prompts x {seq} tokens at "
                  f"{a.generation_mfu:.0%} MFU"),
        StageCost("generate: log pi and log pi_ref", score, hours(score, train_rate),
                  f"2 x 2 N x {a.eval_cells} cells x {a.eval_prompts} prompts x {seq} tokens"),
        StageCost("judge: reward model (option b)", rm_judge, hours(rm_judge, train_rate),
                  f"2 N_rm x {a.eval_cells} cells x {a.eval_prompts} prompts x 2 summaries x {seq} tokens"
                  + ("" if a.rm_params else " (N_rm = N)")),
    ]
    comparisons = a.eval_cells * a.eval_prompts
    tokens_in = comparisons * (a.prompt_tokens + 2 * a.response_tokens + a.judge_overhead_tokens)
    tokens_out = comparisons * a.judge_reply_tokens
    if a.judge_params:
        flops = 2 * a.judge_params * (tokens_in + tokens_out)
        rows.append(StageCost("judge: self-hosted LLM (option a)", flops, hours(flops, gen_rate),
                              f"2 x {a.judge_params:.3g} params x {tokens_in + tokens_out:,} tokens at "
                              f"{a.generation_mfu:.0%} MFU"))
    return rows, {"comparisons": comparisons, "input_tokens": tokens_in, "output_tokens": tokens_out}


def render_markdown(a: CostAssumptions, n_params: float, n_source: str) -> str:
    """The estimate as a markdown table, followed by every assumption."""
    rows, judge = estimate(a, n_params)
    main = [r for r in rows if not r.stage.startswith("judge")]
    table = [[r.stage, f"{r.gpu_hours:.2f}", f"{r.flops:.2e}", r.basis] for r in rows]
    table.append(["**total without the judge**", f"**{sum(r.gpu_hours for r in main):.1f}**",
                  f"{sum(r.flops for r in main):.2e}", ""])
    lines = [markdown_table(["stage", f"GPU hours ({a.gpu})", "FLOPs", "basis"], table), ""]
    lines += [
        f"LLM judge through an API (option a): {judge['comparisons']:,} comparisons, about "
        f"{judge['input_tokens'] / 1e6:.1f}M input and {judge['output_tokens'] / 1e6:.2f}M output tokens "
        f"(prompt {a.prompt_tokens} + 2 summaries x {a.response_tokens} + {a.judge_overhead_tokens} instruction "
        f"tokens in, {a.judge_reply_tokens} out, per comparison; multiply by your provider's prices).",
        "",
        f"Assumptions: N = {n_params:.3g} parameters ({n_source}); {a.gpu} at {a.gpu_peak_tflops:g} TFLOP/s peak "
        f"(bf16 dense), {a.mfu:.0%} MFU for training and scoring, {a.generation_mfu:.0%} while sampling; mean "
        f"prompt {a.prompt_tokens} and summary {a.response_tokens} tokens; 6N FLOPs per trained token, 2N per "
        "token of a forward pass (reference log-probs once for the whole sweep, sampling, scoring). Padding, "
        "evaluation, checkpointing and start-up are not counted: read these as lower bounds within about 1.5x.",
    ]
    return "\n".join(lines)


def count_parameters(model: str) -> float | None:
    """Parameters of ``model`` (HF directory or hub name) from its config alone (meta device), or None."""
    try:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(model)
        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(config)
        return float(sum(p.numel() for p in meta.parameters()))
    except Exception:  # no network for a hub name, an unknown architecture: the caller falls back and says so
        return None


def resolve_params(a: CostAssumptions, model: str | None) -> tuple[float, str]:
    """(N, where N came from): the configured value, else counted from ``model``, else Pythia-2.8B's."""
    if a.model_params:
        return float(a.model_params), "given"
    if model:
        counted = count_parameters(model)
        if counted:
            return counted, f"counted from {model}"
    return float(PYTHIA_PARAMS["pythia-2.8b"]), "Pythia-2.8B, the paper's model"
