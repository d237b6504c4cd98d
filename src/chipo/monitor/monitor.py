"""``OveroptimizationMonitor``: the gold-free signals of ``chipo.monitor.signals`` for one policy, on a fixed small
prompt set (and held-out preference pairs when there are some), against pi_ref.

pi_ref's side is computed once (``calibrate``): its own samples' log-probs give the off-support threshold, and its
log-probs of the held-out pairs (unless the pairs carry them, as a precomputed reference cache does). Each
``measure(policy)`` then samples the policy with the *same* seed every time, so successive measurements differ by
the policy, not by the sampling noise (common random numbers), scores the samples under pi and pi_ref
(``chipo.sequences.sequence_logps``) and returns the signals as a flat dict of floats.

Everything works on token ids (prompts, responses), so a tokenized training set serves as well as text
(``from_texts`` tokenizes text the way ``chipo.data`` does).
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from chipo.data.tokenize import encode_text_pairs
from chipo.generation import encode_prompts, generate
from chipo.models import pad_id
from chipo.monitor import signals
from chipo.sequences import sequence_logps

# pi_ref's calibration samples use a seed far from the policy's, so no policy sample shares its random stream.
REFERENCE_SEED_OFFSET = 100_003


@dataclass(frozen=True)
class MonitorSettings:
    """How the monitor samples (recorded with its signals); the defaults keep it cheap (benchmarks/RESULTS.md)."""

    num_samples: int = 8  # samples per prompt
    max_new_tokens: int = 64
    temperature: float = 1.0
    quantile: float = 0.02  # off-support: below this quantile of pi_ref's own samples' log-probs
    seed: int = 0
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.num_samples < 1 or self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("num_samples, max_new_tokens and batch_size must be at least 1")
        if not 0.0 < self.quantile < 1.0:
            raise ValueError(f"quantile must lie in (0, 1), got {self.quantile}")


@dataclass
class HeldoutPairs:
    """Tokenized preference pairs (response ids end with EOS, as ``chipo.data`` tokenizes them); ``ref_*`` are
    pi_ref's log-probs (filled in by ``calibrate`` when missing)."""

    prompt_ids: list[list[int]]
    chosen_ids: list[list[int]]
    rejected_ids: list[list[int]]
    ref_chosen: torch.Tensor | None = None
    ref_rejected: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.prompt_ids)


class OveroptimizationMonitor:
    """Measures the gold-free signals of a policy (module docstring).

    Args:
      tokenizer: the policy's tokenizer (EOS and pad ids for sampling and scoring).
      prompt_ids: token ids of the monitor's prompts (a small held-out set: 8-32 prompts).
      ref_model: pi_ref; None with a PEFT policy means pi_ref = the policy with its adapters disabled.
      pairs: held-out ``HeldoutPairs`` for displacement and implicit-reward accuracy (optional).
      loss, beta, loss_options: the training objective, for the implicit-reward accuracy, margin and clip rate.
    """

    def __init__(self, tokenizer, prompt_ids: Sequence[Sequence[int]], *, ref_model: nn.Module | None = None,
                 pairs: HeldoutPairs | None = None, settings: MonitorSettings | None = None, loss: str | None = None,
                 beta: float | None = None, loss_options: dict | None = None):
        if not prompt_ids:
            raise ValueError("the monitor needs at least one prompt")
        self.tokenizer = tokenizer
        self.prompt_ids = [list(p) for p in prompt_ids]
        self.ref_model = ref_model
        self.pairs = pairs if pairs is not None and len(pairs) else None
        self.settings = settings or MonitorSettings()
        self.loss, self.beta, self.loss_options = loss, beta, dict(loss_options or {})
        self.threshold: float | None = None
        self.pad = pad_id(tokenizer)

    @classmethod
    def from_texts(cls, tokenizer, prompts: Sequence[str], pairs: Sequence[dict] | None = None,
                   **kwargs) -> OveroptimizationMonitor:
        """A monitor on text prompts and text preference rows (``prompt`` / ``chosen`` / ``rejected``; rows with
        chosen == rejected carry no preference and are left out), tokenized as ``chipo.data`` tokenizes them."""
        prompt_ids, _ = encode_prompts(tokenizer, list(prompts))
        held = None
        rows = [r for r in pairs or () if r["chosen"] != r["rejected"]]
        if rows:
            p, c = encode_text_pairs(tokenizer, [r["prompt"] for r in rows], [r["chosen"] for r in rows])
            _, rj = encode_text_pairs(tokenizer, [r["prompt"] for r in rows], [r["rejected"] for r in rows])
            held = HeldoutPairs(p, c, rj)
        return cls(tokenizer, prompt_ids, pairs=held, **kwargs)

    # --- pi_ref
    @contextlib.contextmanager
    def reference(self, policy: nn.Module | None = None):
        """pi_ref as a module: ``ref_model``, or the (PEFT) policy with its adapters disabled."""
        if self.ref_model is not None:
            yield self.ref_model
        elif policy is not None and hasattr(policy, "disable_adapter"):
            with policy.disable_adapter():
                yield policy
        else:
            raise ValueError("the monitor needs ref_model (or a PEFT policy whose adapters can be disabled)")

    def _logps(self, model: nn.Module, prompt_ids, response_ids) -> torch.Tensor:
        was_training = model.training
        model.eval()  # dropout off: the log-probs of the deterministic network
        try:
            return sequence_logps(model, prompt_ids, response_ids, self.pad, batch_size=self.settings.batch_size
                                  ).double().cpu()
        finally:
            model.train(was_training)

    def _sample(self, model: nn.Module, seed: int):
        s = self.settings
        return generate(model, self.tokenizer, self.prompt_ids, s.num_samples, max_new_tokens=s.max_new_tokens,
                        temperature=s.temperature, batch_size=s.batch_size, seed=seed)

    @torch.no_grad()
    def calibrate(self, policy: nn.Module | None = None) -> float:
        """pi_ref's side of the samples, once: the off-support threshold (``signals.off_support_threshold``)."""
        if self.threshold is None:
            with self.reference(policy) as ref:
                samples = self._sample(ref, self.settings.seed + REFERENCE_SEED_OFFSET)
                prompts = [self.prompt_ids[i] for i in samples.prompt_index]
                ref_logps = self._logps(ref, prompts, samples.response_ids)
            self.threshold = signals.off_support_threshold(ref_logps, self.settings.quantile)
        return self.threshold

    @torch.no_grad()
    def measure(self, policy: nn.Module) -> dict[str, float]:
        """Every signal for ``policy`` (names as in ``chipo.monitor.signals``; pair signals when there are pairs)."""
        threshold = self.calibrate(policy)
        samples = self._sample(policy, self.settings.seed)
        prompts = [self.prompt_ids[i] for i in samples.prompt_index]
        policy_logps = self._logps(policy, prompts, samples.response_ids)
        with self.reference(policy) as ref:
            ref_logps = self._logps(ref, prompts, samples.response_ids)
        out = signals.divergence_signals(policy_logps - ref_logps)
        out["off_support"] = signals.off_support_rate(ref_logps, threshold)
        out.update(signals.sample_signals(policy_logps, samples.lengths(), samples.finished))
        if self.pairs is not None:
            out.update(self.pair_measure(policy, self.pairs))
        return out

    @torch.no_grad()
    def pair_measure(self, policy: nn.Module, pairs: HeldoutPairs) -> dict[str, float]:
        """Displacement and (with the objective known) implicit-reward accuracy, margin and clip rate on ``pairs``;
        pi_ref's log-probs of the pairs are computed once, when the pairs do not carry them."""
        if pairs.ref_chosen is None or pairs.ref_rejected is None:
            with self.reference(policy) as ref:
                pairs.ref_chosen = self._logps(ref, pairs.prompt_ids, pairs.chosen_ids)
                pairs.ref_rejected = self._logps(ref, pairs.prompt_ids, pairs.rejected_ids)
        chosen = self._logps(policy, pairs.prompt_ids, pairs.chosen_ids)
        rejected = self._logps(policy, pairs.prompt_ids, pairs.rejected_ids)
        out = signals.displacement_signals(chosen, rejected, pairs.ref_chosen, pairs.ref_rejected)
        if self.loss is not None and self.beta is not None:
            lengths = [torch.tensor([len(r) for r in ids], dtype=torch.float64)
                       for ids in (pairs.chosen_ids, pairs.rejected_ids)]
            out.update(signals.pair_signals(chosen, rejected, pairs.ref_chosen, pairs.ref_rejected, loss=self.loss,
                                            beta=self.beta, chosen_lengths=lengths[0], rejected_lengths=lengths[1],
                                            loss_options=self.loss_options))
        return out
