"""PreferenceTrainer: chiPO / DPO / variants on ``transformers.Trainer``.

Checkpointing, resume, gradient accumulation, mixed precision, loggers and ``accelerate launch`` (DDP, FSDP,
DeepSpeed) all come from ``transformers.Trainer``; this class only supplies the loss (``compute_loss``), the
evaluation step and the metrics. The loss is ``chipo.losses.preference_loss`` on per-sequence log-probs of one
forward pass over chosen and rejected rows together.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback

from chipo.losses import preference_loss
from chipo.train.logps import batch_sequence_logps


class NonFiniteError(RuntimeError):
    """A NaN or inf reached the loss or the gradients; training stops before the optimizer sees it."""


class NonFiniteGradientGuard(TrainerCallback):
    """Checks gradients right before each optimizer step (after accumulation) and stops on NaN/inf."""

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        grads = [p.grad for p in model.parameters() if p.grad is not None]
        # One fused norm and one host sync; NaN/inf in any gradient make it non-finite. Names only on failure.
        if not grads or torch.isfinite(torch.nn.utils.get_total_norm(grads, foreach=True)):
            return
        bad = [n for n, p in model.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad:
            raise NonFiniteError(f"non-finite gradient at optimizer step {state.global_step + 1} in "
                                 f"{len(bad)} parameter(s), first: {bad[0]}; the last good checkpoint is kept "
                                 f"in {args.output_dir}")


# Metrics reported as a mean over pairs (TRL's names where TRL has them) and as a max (distribution shift).
_MEAN_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
                 "logps/chosen", "logps/rejected", "logratio/chosen", "logratio/rejected", "clipped")
_MAX_METRICS = ("logratio/chosen", "logratio/rejected")
_MEAN_NAMES = {"logratio/chosen": "logratio/chosen_mean", "logratio/rejected": "logratio/rejected_mean"}


class PreferenceTrainer(Trainer):
    """``transformers.Trainer`` whose loss is a chipo preference loss.

    Args (beyond Trainer's): ``loss_name``, ``beta``, ``loss_options`` (see ``chipo.losses``), ``ref_model``
    (a frozen reference evaluated each step; None when the batches carry precomputed ``ref_*_logps`` or when
    ``ref_adapter_disabled``), ``ref_adapter_disabled`` (LoRA: reference = policy with adapters off),
    ``logprobs_impl``, ``logprob_chunk`` and ``padding_buckets`` (length buckets per batch, single process only;
    see ``chipo.train.logps.batch_sequence_logps``).
    """

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
        # The loss is a mean over pairs: let Trainer divide it by the accumulation steps (equal micro-batches).
        self.loss_is_scaled_for_ga = False
        self.model_accepts_loss_kwargs = False
        self.ref_model = None
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
            self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        self._sums: dict[str, Tensor] = {}  # split -> [count, sum of each mean metric]
        self._maxes: dict[str, Tensor] = {}  # split -> [max of each max metric]
        self.add_callback(NonFiniteGradientGuard())

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
        return preference_loss(self.loss_name, policy_chosen, policy_rejected, ref_chosen, ref_rejected,
                               beta=self.beta, **self.loss_options)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        losses, metrics = self.pair_losses(model, inputs)
        if not torch.isfinite(losses).all():
            rows = inputs["row"][~torch.isfinite(losses)].tolist() if "row" in inputs else "?"
            raise NonFiniteError(f"non-finite loss at optimizer step {self.state.global_step + 1} (dataset rows "
                                 f"{rows}); stopping before the optimizer step, the last good checkpoint is kept "
                                 f"in {self.args.output_dir}")
        self._record(metrics, "train" if model.training else "eval")
        loss = losses.mean()
        return (loss, metrics) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            losses, metrics = self.pair_losses(model, inputs)
        self._record(metrics, "eval")
        return losses.mean().detach(), None, None

    # --- metrics: accumulate on device (no per-step host sync), reduce across processes when logging
    def _record(self, metrics: dict[str, Tensor], split: str) -> None:
        margins = metrics["rewards/margins"]
        sums = torch.stack([torch.tensor(float(margins.numel()), dtype=torch.float64, device=margins.device),
                            *(metrics[n].double().sum() for n in _MEAN_METRICS)])
        maxes = torch.stack([metrics[n].double().max() for n in _MAX_METRICS])
        previous_sums, previous_maxes = self._sums.get(split), self._maxes.get(split)
        self._sums[split] = sums if previous_sums is None else previous_sums + sums
        self._maxes[split] = maxes if previous_maxes is None else torch.maximum(previous_maxes, maxes)

    def _reduced(self, split: str) -> dict[str, float]:
        sums, maxes = self._sums.pop(split, None), self._maxes.pop(split, None)
        if self.accelerator.num_processes > 1:
            # Every process logs at the same step; one with no batch yet contributes zeros / -inf.
            device = self.args.device
            sums = sums.to(device) if sums is not None else torch.zeros(len(_MEAN_METRICS) + 1, dtype=torch.float64,
                                                                         device=device)
            maxes = maxes.to(device) if maxes is not None else torch.full((len(_MAX_METRICS),), -float("inf"),
                                                                            dtype=torch.float64, device=device)
            sums = self.accelerator.reduce(sums, reduction="sum")
            maxes = self.accelerator.gather(maxes).view(-1, len(_MAX_METRICS)).max(0).values
        if sums is None or sums[0].item() == 0:
            return {}
        totals = sums.tolist()
        out = {_MEAN_NAMES.get(name, name): totals[i + 1] / totals[0] for i, name in enumerate(_MEAN_METRICS)}
        out.update({f"{name}_max": value for name, value in zip(_MAX_METRICS, maxes.tolist())})
        return out

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if split == "eval" else ""
        logs.update({prefix + k: v for k, v in self._reduced(split).items()})
        super().log(logs, *args, **kwargs)
