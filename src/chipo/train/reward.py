"""Bradley-Terry reward models: ``RewardTrainer`` on ``transformers.Trainer`` and the ``chipo reward`` recipe.

Model: ``AutoModelForSequenceClassification`` with one output; r(x, y) is its logit at the last non-pad token of
``prompt + response`` (HF pools at the rightmost token that is not ``pad_token_id``; with right padding that is the
response's EOS). Sequences come from ``chipo.data``: prompt and response tokenized separately, response + EOS,
right-padded by ``PreferenceCollator`` (chosen rows first, then rejected, one forward pass for both).
``chipo.inference.rewards.RewardModelScorer`` scores new text with exactly this tokenization. (A tokenizer whose pad
token *is* its EOS makes HF pool at the token before EOS, in training and scoring alike.)

Loss per pair (Bradley-Terry, P[y+ > y-] = sigmoid(r+ - r-); Christiano et al. 2017, Ouyang et al. 2022)::

    -log sigmoid(r+ - r- - m)  +  c * (r+ + r-)^2

with an optional per-pair margin m from a data column (Llama 2, Touvron et al. 2023: the pair must be won by at
least m) and optional centering coefficient c (Eisenstein et al. 2023, "Helping or herding?"): BT is invariant
to a shift of r, the penalty pins the mean reward near 0 so rewards of different runs are comparable.

Metrics (train and eval): ``rewards/accuracies`` (fraction of pairs with r+ > r-, ties 1/2), ``rewards/margins``
(mean r+ - r-), ``rewards/chosen``, ``rewards/rejected``, ``rewards/mean``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from transformers import AutoModelForSequenceClassification, Trainer, TrainingArguments
from transformers.trainer_utils import get_last_checkpoint

from chipo.config import ConfigError, dump_yaml
from chipo.data import DataError, PreferenceCollator, load_preference_dataset, prepare_preference_dataset
from chipo.train.io import JsonlMetricsCallback, atomic_write_text
from chipo.train.preference import NonFiniteError, NonFiniteGradientGuard
from chipo.train.reward_config import RewardConfig
from chipo.train.run import check_output_dir, load_tokenizer, save_final_model

logger = logging.getLogger("chipo")

_METRICS = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "rewards/mean")


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, margin: Tensor | None = None,
                       center_coefficient: float | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-pair losses [B] and metrics [B] from rewards r+ [B], r- [B] (fp32), optional margins m [B]."""
    diff = chosen - rejected
    losses = -F.logsigmoid(diff - margin if margin is not None else diff)
    if center_coefficient:
        losses = losses + center_coefficient * (chosen + rejected) ** 2
    metrics = {
        "rewards/accuracies": (diff > 0).float() + 0.5 * (diff == 0).float(),
        "rewards/margins": diff.detach(),
        "rewards/chosen": chosen.detach(),
        "rewards/rejected": rejected.detach(),
        "rewards/mean": 0.5 * (chosen + rejected).detach(),
    }
    return losses, metrics


@dataclass
class RewardCollator:
    """``PreferenceCollator`` plus a float ``margin`` [B] when the rows carry one."""

    pad_token_id: int

    def __call__(self, features: list[dict]) -> dict[str, Tensor]:
        batch = PreferenceCollator(pad_token_id=self.pad_token_id)(features)
        if "margin" in features[0]:
            batch["margin"] = torch.tensor([float(f["margin"]) for f in features], dtype=torch.float32)
        return batch


class RewardTrainer(Trainer):
    """``transformers.Trainer`` whose loss is the Bradley-Terry loss above (one forward over chosen + rejected).

    Args (beyond Trainer's): ``center_rewards_coefficient`` (None: off). A ``margin`` key in the batch enables the
    margin term.
    """

    def __init__(self, *args: Any, center_rewards_coefficient: float | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.center_rewards_coefficient = center_rewards_coefficient
        self.loss_is_scaled_for_ga = False  # the loss is a mean over pairs: Trainer divides by accumulation steps
        self.model_accepts_loss_kwargs = False
        self._sums: dict[str, Tensor] = {}  # split -> [count, sum of each metric], kept on device
        self.add_callback(NonFiniteGradientGuard())

    def pair_losses(self, model, inputs: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        rewards = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        use_cache=False).logits[:, 0].float()
        chosen, rejected = rewards.chunk(2)
        return bradley_terry_loss(chosen, rejected, inputs.get("margin"), self.center_rewards_coefficient)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        losses, metrics = self.pair_losses(model, inputs)
        if not torch.isfinite(losses).all():
            raise NonFiniteError(f"non-finite reward-model loss at optimizer step {self.state.global_step + 1}; "
                                 f"the last good checkpoint is kept in {self.args.output_dir}")
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
        first = metrics[_METRICS[0]]
        sums = torch.stack([torch.tensor(float(first.numel()), dtype=torch.float64, device=first.device),
                            *(metrics[n].double().sum() for n in _METRICS)])
        self._sums[split] = sums if split not in self._sums else self._sums[split] + sums

    def _reduced(self, split: str) -> dict[str, float]:
        sums = self._sums.pop(split, None)
        if self.accelerator.num_processes > 1:
            if sums is None:
                sums = torch.zeros(len(_METRICS) + 1, dtype=torch.float64)
            sums = self.accelerator.reduce(sums.to(self.args.device), reduction="sum")
        if sums is None or sums[0].item() == 0:
            return {}
        totals = sums.tolist()
        return {name: totals[i + 1] / totals[0] for i, name in enumerate(_METRICS)}

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        split = "eval" if any(k.startswith("eval_") for k in logs) else "train"
        prefix = "eval_" if split == "eval" else ""
        logs.update({prefix + k: v for k, v in self._reduced(split).items()})
        super().log(logs, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------- recipe


def prepare_reward_split(config: RewardConfig, tokenizer, source: str, split: str, limit: int | None = None):
    """Load + tokenize one split; attach the margin column (by original row) when ``margin_column`` is set."""
    dataset = load_preference_dataset(source, split)
    if limit is not None:
        dataset = dataset.select(range(min(limit, len(dataset))))
    margins = None
    if config.margin_column:
        if config.margin_column not in dataset.column_names:
            raise DataError(source, f"margin_column {config.margin_column!r} not found (columns: "
                                    f"{', '.join(dataset.column_names)})")
        margins = dataset[config.margin_column]
        for row, value in enumerate(margins):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise DataError(source, f"margin must be a finite number, got {value!r}", row=row,
                                field=config.margin_column)
    try:
        prepared, stats = prepare_preference_dataset(dataset, tokenizer, source=source, max_length=config.max_length,
                                                     max_prompt_length=config.max_prompt_length,
                                                     num_proc=config.num_proc)
    except ValueError as e:
        if isinstance(e, DataError):
            raise
        raise ConfigError(str(e)) from None
    logger.info("%s[%s]: %s", source, split, stats)
    if margins is not None:
        prepared = prepared.add_column("margin", [float(margins[r]) for r in prepared["row"]])
    return prepared


def reward_training_arguments(config: RewardConfig, has_eval: bool) -> TrainingArguments:
    eval_strategy = "no" if not has_eval else ("steps" if config.eval_steps else "epoch")
    return TrainingArguments(
        output_dir=config.output_dir, num_train_epochs=config.num_train_epochs, max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps, learning_rate=config.learning_rate,
        optim=config.optim, lr_scheduler_type=config.lr_scheduler_type,
        warmup_steps=config.warmup_ratio,  # transformers 5: a float in [0, 1) is a ratio of total steps
        weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm, seed=config.seed, bf16=config.bf16,
        fp16=config.fp16, activation_checkpointing=config.gradient_checkpointing,
        logging_steps=config.logging_steps, logging_first_step=True, eval_strategy=eval_strategy,
        eval_steps=config.eval_steps, save_strategy=config.save_strategy, save_steps=config.save_steps,
        save_total_limit=config.save_total_limit,
        report_to=[r for r in config.report_to.split(",") if r and r != "none"] or "none",
        dataloader_num_workers=config.dataloader_num_workers, dataloader_pin_memory=torch.cuda.is_available(),
        disable_tqdm=config.disable_tqdm, remove_unused_columns=False,
        use_cpu=not (torch.cuda.is_available() or torch.backends.mps.is_available()),
    )


def load_reward_model(name: str, pad_token_id: int):
    try:
        model = AutoModelForSequenceClassification.from_pretrained(name, num_labels=1)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load model {name!r} for sequence classification: {str(e).splitlines()[0]}") \
            from None
    # HF pools the score at the rightmost non-pad token: it must know the pad id (saved with the model).
    model.config.pad_token_id = pad_token_id
    return model


def run_reward_training(config: RewardConfig) -> Path:
    """Train per ``config``; returns the output directory holding the final HF reward model + tokenizer."""
    tokenizer = load_tokenizer(config.tokenizer or config.model)
    args = reward_training_arguments(config, has_eval=bool(config.eval_split))
    datasets = {"train": prepare_reward_split(config, tokenizer, config.dataset, config.split,
                                              config.max_train_samples)}
    if config.eval_split:
        datasets["eval"] = prepare_reward_split(config, tokenizer, config.eval_dataset or config.dataset,
                                                config.eval_split)
    out = check_output_dir(config)
    model = load_reward_model(config.model, tokenizer.pad_token_id)
    if config.gradient_checkpointing:
        model.config.use_cache = False

    # Everything above validated the run without touching the disk.
    atomic_write_text(out / "run_config.yaml", dump_yaml(config))
    trainer = RewardTrainer(
        model=model, args=args, data_collator=RewardCollator(tokenizer.pad_token_id),
        train_dataset=datasets["train"], eval_dataset=datasets.get("eval"), processing_class=tokenizer,
        callbacks=[JsonlMetricsCallback(out / "metrics.jsonl")],
        center_rewards_coefficient=config.center_rewards_coefficient,
    )
    resume = config.resume_from_checkpoint
    if resume == "latest":
        resume = get_last_checkpoint(str(out))
        if resume is None:
            logger.warning("resume_from_checkpoint=latest but no checkpoint in %s: starting fresh", out)
    trainer.train(resume_from_checkpoint=resume)
    if datasets.get("eval") is not None:
        trainer.evaluate()
    save_final_model(trainer, tokenizer, out, merge_lora=False)
    return out
