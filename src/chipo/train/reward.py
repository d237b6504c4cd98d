"""Bradley-Terry reward models: ``RewardTrainer`` on ``transformers.Trainer`` and the ``chipo reward`` recipe.

Model: ``AutoModelForSequenceClassification`` with one output; r(x, y) is its logit at the last non-pad token of
``prompt + response`` (HF pools at the rightmost token that is not ``pad_token_id``; with right padding that is the
response's EOS). Sequences come from ``chipo.data``: prompt and response tokenized separately, response + EOS,
right-padded by ``PreferenceCollator`` (chosen rows first, then rejected, one forward pass for both).
``chipo.rewards.RewardModelScorer`` scores new text with exactly this tokenization. (A tokenizer whose pad
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

from chipo.config import ConfigError, dump_yaml
from chipo.data import DataError, PreferenceCollator, load_preference_dataset, prepare_preference_dataset
from chipo.io import atomic_write_text
from chipo.models import load_sequence_classifier, load_tokenizer
from chipo.train.common import check_output_dir, resolve_resume, save_final_model
from chipo.train.pairwise import PairwiseTrainer
from chipo.train.reward_config import RewardConfig
from chipo.train.rundir import MetricsLog

logger = logging.getLogger("chipo")


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


class RewardTrainer(PairwiseTrainer):
    """``transformers.Trainer`` whose loss is the Bradley-Terry loss above (one forward over chosen + rejected).

    Args (beyond Trainer's): ``center_rewards_coefficient`` (None: off). A ``margin`` key in the batch enables the
    margin term.
    """

    mean_metrics = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "rewards/mean")

    def __init__(self, *args: Any, center_rewards_coefficient: float | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.center_rewards_coefficient = center_rewards_coefficient

    def pair_losses(self, model, inputs: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        rewards = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        use_cache=False).logits[:, 0].float()
        chosen, rejected = rewards.chunk(2)
        return bradley_terry_loss(chosen, rejected, inputs.get("margin"), self.center_rewards_coefficient)


# ---------------------------------------------------------------------------------------------------- recipe


def prepare_reward_split(config: RewardConfig, tokenizer, source: str, split: str, limit: int | None = None):
    """Load + tokenize one split; attach the margin column (by original row) when ``margin_column`` is set."""
    dataset = load_preference_dataset(source, split, max_rows=limit)
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
        prepared, _ = prepare_preference_dataset(dataset, tokenizer, source=source, max_length=config.max_length,
                                                 max_prompt_length=config.max_prompt_length, num_proc=config.num_proc,
                                                 drop_ties=config.drop_ties)
    except ValueError as e:
        if isinstance(e, DataError):
            raise
        raise ConfigError(str(e)) from None
    if margins is not None:
        prepared = prepared.add_column("margin", [float(margins[r]) for r in prepared["row"]])
    return prepared


def run_reward_training(config: RewardConfig) -> Path:
    """Train per ``config``; returns the output directory holding the final HF reward model + tokenizer."""
    config.require_model_and_data()
    tokenizer = load_tokenizer(config.tokenizer or config.model)
    datasets = {"train": prepare_reward_split(config, tokenizer, config.dataset, config.split,
                                              config.max_train_samples)}
    if config.eval_split:
        datasets["eval"] = prepare_reward_split(config, tokenizer, config.eval_dataset or config.dataset,
                                                config.eval_split)
    out = check_output_dir(config)
    # HF pools the score at the rightmost non-pad token: it must know the pad id (saved with the model).
    model = load_sequence_classifier(config.model, "model", num_labels=1, pad_token_id=tokenizer.pad_token_id)
    if config.gradient_checkpointing:
        model.config.use_cache = False

    # Everything above validated the run without touching the disk.
    atomic_write_text(out / "run_config.yaml", dump_yaml(config))
    trainer = RewardTrainer(
        model=model, args=config, data_collator=RewardCollator(tokenizer.pad_token_id),
        train_dataset=datasets["train"], eval_dataset=datasets.get("eval"), processing_class=tokenizer,
        callbacks=[MetricsLog(out / "metrics.jsonl")],
        center_rewards_coefficient=config.center_rewards_coefficient,
    )
    trainer.train(resume_from_checkpoint=resolve_resume(config.resume_from_checkpoint, out))
    if datasets.get("eval") is not None:
        trainer.evaluate()
    save_final_model(trainer, tokenizer, out, merge_lora=False)
    return out
