"""PreferenceTrainer: chiPO / DPO / variants on ``transformers.Trainer`` (via ``PairwiseTrainer``).

Checkpointing, resume, gradient accumulation, mixed precision, loggers and ``accelerate launch`` (DDP, FSDP,
DeepSpeed) all come from ``transformers.Trainer``; this class only supplies the loss (``compute_loss``), the
evaluation step and the metrics. The loss is ``chipo.losses.preference_loss`` on per-sequence log-probs of one
forward pass over chosen and rejected rows together.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from chipo.losses import preference_loss
from chipo.sequences import batch_sequence_logps
from chipo.train.pairwise import NonFiniteError, NonFiniteGradientGuard, PairwiseTrainer

__all__ = ["NonFiniteError", "NonFiniteGradientGuard", "PreferenceTrainer"]

logger = logging.getLogger("chipo")


class PreferenceTrainer(PairwiseTrainer):
    """``transformers.Trainer`` whose loss is a chipo preference loss.

    Args (beyond Trainer's): ``loss_name``, ``beta``, ``loss_options`` (see ``chipo.losses``), ``ref_model``
    (a frozen reference evaluated each step; None when the batches carry precomputed ``ref_*_logps`` or when
    ``ref_adapter_disabled``), ``ref_adapter_disabled`` (LoRA: reference = policy with adapters off),
    ``logprobs_impl``, ``logprob_chunk`` and ``padding_buckets`` (length buckets per batch, single process only;
    see ``chipo.sequences.batch_sequence_logps``).
    """

    # Means over pairs (TRL's names where TRL has them) and maxima (the distribution shift from pi_ref).
    mean_metrics = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                    "logps/chosen", "logps/rejected", "logratio/chosen", "logratio/rejected", "clipped")
    max_metrics = ("logratio/chosen", "logratio/rejected")
    metric_names = {"logratio/chosen": "logratio/chosen_mean", "logratio/rejected": "logratio/rejected_mean"}

    def __init__(self, *args: Any, loss_name: str, beta: float, loss_options: dict | None = None,
                 ref_model: nn.Module | None = None, ref_adapter_disabled: bool = False,
                 logprobs_impl: str = "fused", logprob_chunk: int = 1024, padding_buckets: int = 1, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.loss_name = loss_name
        self.beta = beta
        self.loss_options = dict(loss_options or {})
        self.ref_adapter_disabled = ref_adapter_disabled
        self.logprobs_impl = logprobs_impl
        self.logprob_chunk = logprob_chunk
        # Several forwards per backward are only valid without DDP/FSDP/DeepSpeed wrapping (one process).
        self.padding_buckets = padding_buckets if self.accelerator.num_processes == 1 else 1
        self._warned_all_clipped = False
        self.ref_model = None
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)

    # --- the loss
    def _reference_logps(self, model: nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        if "ref_chosen_logps" in inputs:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        with torch.no_grad():
            if self.ref_model is not None:
                logps = batch_sequence_logps(self.ref_model, inputs, self.logprobs_impl, self.logprob_chunk,
                                             self.padding_buckets)
            elif self.ref_adapter_disabled:
                unwrapped = self.accelerator.unwrap_model(model)
                with unwrapped.disable_adapter():
                    logps = batch_sequence_logps(model, inputs, self.logprobs_impl, self.logprob_chunk,
                                                 self.padding_buckets)
            else:
                raise RuntimeError("no reference: pass ref_model, ref_adapter_disabled=True or precomputed logps")
        return logps.detach().chunk(2)

    def pair_losses(self, model: nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-pair losses [B] and per-pair metrics for a collated batch."""
        policy = batch_sequence_logps(model, inputs, self.logprobs_impl, self.logprob_chunk, self.padding_buckets)
        policy_chosen, policy_rejected = policy.chunk(2)
        ref_chosen, ref_rejected = self._reference_logps(model, inputs)
        # Response token counts (length-normalised IPO, the sft term); rows are chosen first, then rejected.
        chosen_lengths, rejected_lengths = inputs["response_mask"].sum(-1).chunk(2)
        return preference_loss(self.loss_name, policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                               beta=self.beta, chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths,
                               **self.loss_options)

    # --- logging
    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        super().log(logs, *args, **kwargs)  # fills in the window's metric means, "clipped" among them
        if not self._warned_all_clipped and logs.get("clipped", 0.0) >= 1.0:
            # Every pair of the window sat outside the clip band (or past the reward bound): the preference
            # term had zero gradient, so these steps moved the policy only through sft_weight / weight decay.
            self._warned_all_clipped = True
            logger.warning("every pair in the logging window up to step %d was clipped (margin outside "
                           "[-2 r_max, 2 r_max] or both rewards past reward_bound), so the preference loss gave no "
                           "gradient; if this persists, raise r_max / reward_bound or lower beta (shown once per "
                           "run)", self.state.global_step)
