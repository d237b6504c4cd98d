"""PairwiseTrainer: the part of ``transformers.Trainer`` subclassing that every pairwise loss shares.

A subclass supplies ``pair_losses(model, inputs) -> (losses [B], metrics {name: [B]})``; this class turns it into
Trainer's loss (mean over pairs, divided by Trainer for gradient accumulation), stops on NaN/inf naming the step
and dataset rows, evaluates, and logs metrics reduced across processes: means of ``mean_metrics`` and maxima of
``max_metrics``, accumulated on device so a step costs no host synchronisation.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from transformers import Trainer, TrainerCallback

from chipo.train.rundir import checkpoint_note


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
                                 f"{len(bad)} parameter(s), first: {bad[0]}; {checkpoint_note(args.output_dir)}")


class PairwiseTrainer(Trainer):
    """Trainer whose loss is the mean of per-pair losses from ``pair_losses`` (see the module docstring)."""

    mean_metrics: tuple[str, ...] = ()
    max_metrics: tuple[str, ...] = ()
    metric_names: dict[str, str] = {}  # logged name of a mean metric, where it differs

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        # The loss is a mean over pairs: let Trainer divide it by the accumulation steps (equal micro-batches).
        self.loss_is_scaled_for_ga = False
        self.model_accepts_loss_kwargs = False
        self._sums: dict[str, Tensor] = {}  # split -> [count, sum of each mean metric]
        self._maxes: dict[str, Tensor] = {}  # split -> [max of each max metric]
        self.add_callback(NonFiniteGradientGuard())

    def pair_losses(self, model: nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        losses, metrics = self.pair_losses(model, inputs)
        if not torch.isfinite(losses).all():
            rows = inputs["row"][~torch.isfinite(losses)].tolist() if "row" in inputs else "?"
            raise NonFiniteError(f"non-finite loss at optimizer step {self.state.global_step + 1} (dataset rows "
                                 f"{rows}); stopping before the optimizer step; "
                                 f"{checkpoint_note(self.args.output_dir)}")
        self._record(metrics, "train" if model.training else "eval")
        loss = losses.mean()
        return (loss, metrics) if return_outputs else loss

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            losses, metrics = self.pair_losses(model, inputs)
        self._record(metrics, "eval")
        return losses.mean().detach(), None, None

    def _record(self, metrics: dict[str, Tensor], split: str) -> None:
        first = metrics[self.mean_metrics[0]]
        sums = torch.stack([torch.tensor(float(first.numel()), dtype=torch.float64, device=first.device),
                            *(metrics[n].double().sum() for n in self.mean_metrics)])
        self._sums[split] = sums if split not in self._sums else self._sums[split] + sums
        if self.max_metrics:
            maxes = torch.stack([metrics[n].double().max() for n in self.max_metrics])
            self._maxes[split] = maxes if split not in self._maxes else torch.maximum(self._maxes[split], maxes)

    def _reduced(self, split: str) -> dict[str, float]:
        sums, maxes = self._sums.pop(split, None), self._maxes.pop(split, None)
        if self.accelerator.num_processes > 1:
            # Every process logs at the same step; one with no batch yet contributes zeros / -inf.
            device = self.args.device
            sums = (sums.to(device) if sums is not None
                    else torch.zeros(len(self.mean_metrics) + 1, dtype=torch.float64, device=device))
            sums = self.accelerator.reduce(sums, reduction="sum")
            if self.max_metrics:
                maxes = (maxes.to(device) if maxes is not None
                         else torch.full((len(self.max_metrics),), -float("inf"), dtype=torch.float64, device=device))
                maxes = self.accelerator.gather(maxes).view(-1, len(self.max_metrics)).max(0).values
        if sums is None or sums[0].item() == 0:
            return {}
        totals = sums.tolist()
        out = {self.metric_names.get(n, n): totals[i + 1] / totals[0] for i, n in enumerate(self.mean_metrics)}
        if maxes is not None:
            out.update({f"{n}_max": value for n, value in zip(self.max_metrics, maxes.tolist())})
        return out

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if split == "eval" else ""
        logs.update({prefix + k: v for k, v in self._reduced(split).items()})
        super().log(logs, *args, **kwargs)
