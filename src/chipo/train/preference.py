"""PreferenceTrainer: chiPO / DPO / variants on ``transformers.Trainer`` (via ``PairwiseTrainer``).

Used like TRL's ``DPOTrainer`` (switching is two imports)::

    from chipo.train import PreferenceConfig, PreferenceTrainer

    args = PreferenceConfig(model="my/sft-model", dataset="unused", loss="chipo", beta=0.05, output_dir="runs/x")
    trainer = PreferenceTrainer(model="my/sft-model", args=args, train_dataset=rows, processing_class=tokenizer)
    trainer.train()

Given a ``PreferenceConfig`` it tokenizes and validates raw rows in any TRL format, computes (and caches on disk)
the reference log-probs, applies ``peft_config`` or ``lora=true`` (reference = adapters off), and takes the loss
and its options from the config. Checkpointing, resume, gradient accumulation, mixed precision, loggers and
``accelerate launch`` (DDP, FSDP, DeepSpeed) come from ``transformers.Trainer``; this class supplies the loss
(``compute_loss``), the evaluation step and the metrics. The loss is ``chipo.losses.preference_loss`` on
per-sequence log-probs of one forward pass over chosen and rejected rows together.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn

from chipo.config import ConfigError
from chipo.data import PreferenceCollator
from chipo.data.collator import REF_KEYS
from chipo.losses import preference_loss
from chipo.models import default_tokenizer, refuse_quantizing_loaded
from chipo.sequences import batch_sequence_logps, packing_matches
from chipo.train.config import PreferenceConfig
from chipo.train.monitor_callback import monitor_for
from chipo.train.pairwise import NonFiniteError, NonFiniteGradientGuard, PairwiseTrainer
from chipo.train.preference_setup import setup_preference_run

__all__ = ["NonFiniteError", "NonFiniteGradientGuard", "PreferenceTrainer"]

logger = logging.getLogger("chipo")


class PreferenceTrainer(PairwiseTrainer):
    """``transformers.Trainer`` whose loss is a chipo preference loss.

    With ``args`` a ``PreferenceConfig`` everything below defaults from it (module docstring). Args beyond
    Trainer's: ``peft_config`` and ``quantization_config`` (as in TRL's DPOTrainer: the latter is passed to
    ``from_pretrained`` when ``model`` is a name), ``loss_name``, ``beta``, ``loss_options`` (see
    ``chipo.losses``), ``ref_model`` (a frozen reference evaluated each step; None when the batches carry
    precomputed ``ref_*_logps`` or when ``ref_adapter_disabled``), ``ref_adapter_disabled`` (LoRA: reference =
    policy with adapters off), ``logprobs_impl``, ``logprob_chunk``, ``padding_buckets`` (length buckets per
    batch, single process only; see ``chipo.sequences.batch_sequence_logps``) and ``packing`` (padding-free packed
    rows, checked once against the padded layout; replaces the buckets).
    """

    # Means over pairs (TRL's names where TRL has them) and maxima (the distribution shift from pi_ref).
    mean_metrics = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                    "logps/chosen", "logps/rejected", "logratio/chosen", "logratio/rejected", "clipped")
    max_metrics = ("logratio/chosen", "logratio/rejected")
    metric_names = {"logratio/chosen": "logratio/chosen_mean", "logratio/rejected": "logratio/rejected_mean"}

    def __init__(self, model: nn.Module | str | None = None, args=None, data_collator=None, train_dataset=None,
                 eval_dataset=None, processing_class=None, peft_config=None, *, loss_name: str | None = None,
                 beta: float | None = None, loss_options: dict | None = None, ref_model: nn.Module | None = None,
                 ref_adapter_disabled: bool = False, logprobs_impl: str | None = None, logprob_chunk: int | None = None,
                 padding_buckets: int | None = None, packing: bool | None = None, quantization_config=None,
                 **kwargs: Any):
        refuse_quantizing_loaded(model, quantization_config)  # as TRL's DPOTrainer: quantization happens at loading
        if isinstance(args, PreferenceConfig):
            if processing_class is None:  # as TRL: the model's own tokenizer (a loaded model knows its path)
                processing_class = default_tokenizer(model, tokenizer=args.tokenizer, fallback=args.model,
                                                     trust_remote_code=args.trust_remote_code)
            data_collator = data_collator or PreferenceCollator(pad_token_id=processing_class.pad_token_id)
            run = setup_preference_run(args, model, processing_class, train_dataset, eval_dataset, data_collator,
                                       peft_config=peft_config, ref_model=ref_model,
                                       quantization_config=quantization_config)
            model, train_dataset, eval_dataset = run["model"], run["train_dataset"], run["eval_dataset"]
            ref_model = run["ref_model"]
            ref_adapter_disabled = ref_adapter_disabled or run["ref_adapter_disabled"]
            logprobs_impl = logprobs_impl or run["logprobs_impl"]
            loss_name = loss_name or args.loss
            beta = beta if beta is not None else args.beta
            loss_options = args.loss_options() if loss_options is None else loss_options
            logprob_chunk = logprob_chunk or args.logprob_chunk
            padding_buckets = padding_buckets or args.padding_buckets
            packing = args.packing if packing is None else packing
        elif quantization_config is not None or isinstance(model, str):
            raise ConfigError("PreferenceTrainer loads a model by name (with quantization_config) only with "
                              "args=PreferenceConfig(...)")
        if loss_name is None or beta is None:
            raise ValueError("PreferenceTrainer needs loss_name and beta (or args=PreferenceConfig(...))")
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        logprobs_impl, logprob_chunk, padding_buckets = logprobs_impl or "fused", logprob_chunk or 1024, \
            padding_buckets or 1
        self.loss_name = loss_name
        self.beta = beta
        self.loss_options = dict(loss_options or {})
        self.ref_adapter_disabled = ref_adapter_disabled
        self.logprobs_impl = logprobs_impl
        self.logprob_chunk = logprob_chunk
        # Several forwards per backward are only valid without DDP/FSDP/DeepSpeed wrapping (one process).
        self.padding_buckets = padding_buckets if self.accelerator.num_processes == 1 else 1
        self.packing = bool(packing)  # checked against the padded layout on the first batch (_logps)
        self._packing_checked = False
        self._warned_all_clipped = False
        self.ref_model = None
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        # The overoptimization monitor (``monitor`` key): gold-free signals at each evaluation, alarm by rule.
        self.monitor = monitor_for(self, args) if isinstance(args, PreferenceConfig) else None

    def _set_signature_columns_if_needed(self) -> None:
        # What remove_unused_columns keeps: the columns PreferenceCollator and the length-grouped sampler read.
        # Trainer's default, model.forward's arguments, would drop every one of them (rows are tokenized pairs).
        if self._signature_columns is None:
            self._signature_columns = ["prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "row",
                                       *REF_KEYS, self.args.length_column_name]

    # --- the loss
    def _logps(self, model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
        if self.packing and not self._packing_checked:
            self._packing_checked = True
            self.packing = packing_matches(self.accelerator.unwrap_model(model), inputs, self.logprobs_impl)
        return batch_sequence_logps(model, inputs, self.logprobs_impl, self.logprob_chunk, self.padding_buckets,
                                    packed=self.packing)

    def _reference_logps(self, model: nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        if "ref_chosen_logps" in inputs:
            return inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        with torch.no_grad():
            if self.ref_model is not None:
                logps = self._logps(self.ref_model, inputs)
            elif self.ref_adapter_disabled:
                unwrapped = self.accelerator.unwrap_model(model)
                with unwrapped.disable_adapter():
                    logps = self._logps(model, inputs)
            else:
                raise RuntimeError("no reference: pass ref_model, ref_adapter_disabled=True or precomputed logps")
        return logps.detach().chunk(2)

    def pair_losses(self, model: nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-pair losses [B] and per-pair metrics for a collated batch."""
        policy = self._logps(model, inputs)
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
