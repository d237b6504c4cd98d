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

Packing (``packing=true``, the default): the chosen and rejected sequences go through the model padding-free, side
by side in rows (``chipo.sequences.pack_batch``: position_ids restart per sequence, no attention mask, so attention
stays within each sequence), asking for the final hidden states; r(x, y) is the model's score head applied to the
hidden state at the very token HF would pool in the padded batch (``packed_rewards``). Same rewards and gradients
up to float round-off; checked once on the first batch, with a fallback to padded rows and one warning for models
whose attention ignores position_ids or whose score head is not found.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import TrainingArguments, set_seed

from chipo.config import ConfigError
from chipo.data import DataError, PreferenceCollator, lengths, prepare_preference_dataset
from chipo.models import (
    add_adapters,
    check_one_output,
    default_tokenizer,
    from_pretrained_kwargs,
    is_loaded,
    load_sequence_classifier,
    pad_id,
    refuse_quantizing_loaded,
)
from chipo.sequences import layouts_agree, pack_batch, single_row_attention
from chipo.train.common import check_output_dir, check_trackers, run_trainer, trainer_datasets
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


def score_head(model: nn.Module) -> nn.Module | None:
    """The score head of a *ForSequenceClassification (Llama, Mistral, Qwen, GPT-2: ``score``), also inside a peft
    wrapper (its ``modules_to_save`` copy is what ``score`` then resolves to); None if there is none. Unwrap
    DDP / accelerate first (``Accelerator.unwrap_model``)."""
    if hasattr(model, "get_base_model"):  # peft PeftModel
        model = model.get_base_model()
    head = getattr(model, "score", None)
    return head if isinstance(head, nn.Module) else None


def padded_rewards(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """r [N] (fp32) of the right-padded rows of ``batch``: the model's own pooled logit."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                 use_cache=False).logits[:, 0].float()


def pooled_columns(input_ids: Tensor, attention_mask: Tensor, pad_token_id: int | None) -> Tensor:
    """Column [N] that HF's sequence classifiers pool in right-padded rows: the rightmost token that is not
    ``pad_token_id`` (so with pad == EOS the token before EOS; column 0 if every token is pad), or, without a pad
    id, the last real token."""
    if pad_token_id is None:
        return attention_mask.sum(-1) - 1
    columns = torch.arange(input_ids.shape[-1], device=input_ids.device)
    return (columns * (input_ids != pad_token_id)).argmax(-1)


def packed_rewards(model: nn.Module, batch: dict[str, Tensor], head: nn.Module, pad_token_id: int | None,
                   single_row: bool = False) -> Tensor:
    """r [N] (fp32) of the rows of ``batch`` from one forward over their packed layout.

    The (possibly wrapped) model runs on ``pack_batch``'s rows with ``attention_mask=None`` and no cache, so
    transformers builds the block-diagonal causal mask from the restarting position_ids; ``head`` (``score_head``)
    is applied to the final hidden state at each sequence's pooled token, the position whose ``position_ids``
    equals that sequence's ``pooled_columns`` entry. Equals ``padded_rewards`` for a model whose attention follows
    position_ids (``reward_packing_matches`` checks).
    """
    packed = pack_batch(batch, single_row=single_row)
    out = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], attention_mask=None,
                use_cache=False, output_hidden_states=True)
    pooled = pooled_columns(batch["input_ids"], batch["attention_mask"], pad_token_id)
    sequence = packed["sequence"]
    at = (sequence >= 0) & (packed["position_ids"] == pooled[sequence.clamp(min=0)])
    rows, cols = at.nonzero(as_tuple=True)  # exactly one position per sequence
    order = sequence[rows, cols].argsort()
    return head(out.hidden_states[-1][rows[order], cols[order]])[:, 0].float()


def _pad_token_id(model: nn.Module) -> int | None:
    return getattr(getattr(model, "config", None), "pad_token_id", None)


def reward_packing_matches(model: nn.Module, batch: dict[str, Tensor], rows: int = 4) -> bool:
    """Whether ``packed_rewards`` reproduces ``padded_rewards`` on the first ``rows`` rows of ``batch`` (unwrapped
    ``model``; ``chipo.sequences.layouts_agree``). Warns once and returns False if not, or if no score head. The
    rows are packed into one row, as in ``chipo.sequences.packing_matches``: alone in its row, a sequence could not
    show attention leaking across sequences."""
    head = score_head(model)
    if head is None:
        warnings.warn(f"packed rows unavailable for {type(model).__name__} (no 'score' head found); using padded "
                      "rows", stacklevel=2)
        return False
    small = {k: batch[k][:rows] for k in ("input_ids", "attention_mask", "response_mask")}
    return layouts_agree(model, lambda: padded_rewards(model, small),
                         lambda: packed_rewards(model, small, head, _pad_token_id(model), single_row=True),
                         "different rewards", errors=(TypeError, ValueError, RuntimeError, AttributeError))


class RewardTrainer(PairwiseTrainer):
    """``transformers.Trainer`` whose loss is the Bradley-Terry loss above (one forward over chosen + rejected),
    taking TRL's ``RewardTrainer`` arguments with their meaning (switching is two imports).

    ``model``: a loaded one-output ``AutoModelForSequenceClassification``, or a name / local directory (None:
    ``args.model``) loaded as one with a fresh score head (under ``args.seed``, as in TRL and ``chipo reward``),
    ``args.model_init_kwargs``, ``args.trust_remote_code`` and ``quantization_config`` (refused with a loaded
    model: quantization happens at loading). ``args``: a ``RewardConfig``; a plain ``TrainingArguments`` becomes
    one, None the defaults. ``processing_class``: default the model's own tokenizer; its pad id is set on the model
    config (HF pools the score at the rightmost non-pad token). ``peft_config``: adapters by
    ``peft.get_peft_model`` (TRL's ``--lora_task_type SEQ_CLS`` also trains the score head). ``train_dataset`` /
    ``eval_dataset``: raw rows in any TRL preference format (a ``datasets.Dataset`` or a list of dicts), validated
    and tokenized here (``prepare_reward_rows``: drop_ties, margin_column); prepared rows as they are; None:
    ``args.dataset`` / ``args.eval_split`` when set. ``data_collator``: default ``RewardCollator``. ``chipo reward``
    builds its trainer through the same path (``run_reward_training``).

    Beyond TRL's: ``center_rewards_coefficient`` and ``packing`` (padding-free rows, checked once on the first batch
    against the padded rows); None: the config's. A ``margin`` key in the batch enables the margin term.
    """

    mean_metrics = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected", "rewards/mean")

    def __init__(self, model: nn.Module | str | None = None, args: TrainingArguments | None = None,
                 data_collator=None, train_dataset=None, eval_dataset=None, processing_class=None, peft_config=None,
                 quantization_config=None, *, center_rewards_coefficient: float | None = None,
                 packing: bool | None = None, **kwargs: Any):
        refuse_quantizing_loaded(model, quantization_config)
        args = RewardConfig.from_args(args, model, "Reward")
        if processing_class is None:
            processing_class = default_tokenizer(model, tokenizer=args.tokenizer, fallback=args.model,
                                                 trust_remote_code=args.trust_remote_code)
        if is_loaded(model):
            check_one_output(model, "model")
            model.config.pad_token_id = pad_id(processing_class)
        else:
            model = load_reward_model(args, model, pad_id(processing_class), quantization_config)
        if peft_config is not None:
            model = add_adapters(model, peft_config, seed=args.seed)
        if args.gradient_checkpointing:
            model.config.use_cache = False
        train_dataset, eval_dataset = trainer_datasets(
            args, train_dataset, eval_dataset,
            lambda rows, source: prepare_reward_rows(args, processing_class, rows, source))
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         data_collator=data_collator or RewardCollator(pad_id(processing_class)),
                         processing_class=processing_class, **kwargs)
        self.center_rewards_coefficient = (args.center_rewards_coefficient if center_rewards_coefficient is None
                                           else center_rewards_coefficient)
        self.packing = bool(args.packing if packing is None else packing)
        self._packing_checked = False

    def _set_signature_columns_if_needed(self) -> None:
        # What remove_unused_columns keeps: the columns RewardCollator and the length-grouped sampler read.
        if self._signature_columns is None:
            self._signature_columns = ["prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "row", "margin",
                                       self.args.length_column_name]

    def rewards(self, model: nn.Module, inputs: dict[str, Tensor]) -> Tensor:
        """r [2B] (fp32) of a collated batch: packed rows when enabled and checked, else padded rows."""
        if not self.packing:
            return padded_rewards(model, inputs)
        unwrapped = self.accelerator.unwrap_model(model)
        single_row = single_row_attention(unwrapped)
        if not self._packing_checked:
            self._packing_checked = True
            self.packing = reward_packing_matches(unwrapped, inputs)
            if not self.packing:
                return padded_rewards(model, inputs)
        return packed_rewards(model, inputs, score_head(unwrapped), _pad_token_id(unwrapped), single_row)

    def pair_losses(self, model, inputs: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        chosen, rejected = self.rewards(model, inputs).chunk(2)
        return bradley_terry_loss(chosen, rejected, inputs.get("margin"), self.center_rewards_coefficient)


# ---------------------------------------------------------------------------------------------------- recipe


def load_reward_model(config: RewardConfig, name: str | None = None, pad_token_id: int | None = None,
                      quantization_config=None):
    """The model ``name`` (default ``config.model``) as a one-output sequence classifier, loaded as TRL's
    RewardTrainer loads a model given by name (``config.model_init_kwargs``, ``trust_remote_code``,
    ``quantization_config``); a causal LM checkpoint gets a fresh score head, initialised under ``config.seed`` so
    that two runs with one seed are the same run. ``pad_token_id`` is set on its config."""
    set_seed(config.seed)
    return load_sequence_classifier(name or config.model, "model", num_labels=1, pad_token_id=pad_token_id,
                                    **from_pretrained_kwargs(config.model_init_kwargs,
                                                             trust_remote_code=config.trust_remote_code,
                                                             quantization_config=quantization_config))


def prepare_reward_rows(config: RewardConfig, tokenizer, dataset, source: str):
    """Validate + tokenize raw preference rows (any TRL format); attach the margin column (by original row) when
    ``margin_column`` is set, and the length column when ``group_by_length``."""
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
    if config.group_by_length:
        prepared = prepared.add_column(config.length_column_name, lengths(prepared))
    return prepared


def run_reward_training(config: RewardConfig) -> Path:
    """Train per ``config``; returns the output directory holding the final HF reward model + tokenizer. The model,
    tokenizer and data are set up as ``RewardTrainer`` sets them up for a Python caller (the same functions), only
    earlier, so that bad input fails before the output directory exists."""
    config.require_model_and_data()
    check_trackers(config)
    tokenizer = default_tokenizer(config.model, tokenizer=config.tokenizer, trust_remote_code=config.trust_remote_code)
    train, evaluation = trainer_datasets(
        config, None, None, lambda rows, source: prepare_reward_rows(config, tokenizer, rows, source))
    out = check_output_dir(config)
    model = load_reward_model(config, pad_token_id=pad_id(tokenizer))

    # Everything above validated the run without touching the disk.
    return run_trainer(config, out, lambda: RewardTrainer(
        model=model, args=config, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer,
        callbacks=[MetricsLog(out / "metrics.jsonl")]),
        tokenizer, objective_keys=RewardConfig.objective_keys,
        after_train=(lambda trainer: trainer.evaluate()) if evaluation is not None else None)
