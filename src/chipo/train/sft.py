"""``chipo sft``: supervised fine-tuning of a causal LM on prompt/completion data, loss on completion tokens only.

This is the first stage of the TL;DR recipe (pi_ref = the SFT model); it runs on ``transformers.Trainer`` with the
model's own next-token cross-entropy, so the only SFT-specific pieces are the data preparation and the collator,
both in ``chipo.data.sft`` (layouts, tokenization and truncation rules are documented there).

Packing (``packing=true``, the default): ``SFTCollator`` lays the sequences padding-free side by side in rows, with
position_ids restarting per sequence and label -100 at each sequence's first token, so the model's mean token
cross-entropy covers exactly the padded batch's (position, target) pairs: same loss and gradients up to float
round-off, less compute on padding. ``SFTTrainer`` runs such batches without a KV cache (a cache switches off
transformers' packed-sequence masking) and checks once, on the first packed batch, that the model's per-sequence
log-likelihoods of the labelled tokens equal those of the same sequences padded (``sft_packing_matches``); a
model whose attention ignores position_ids fails, and the run goes on with padded rows after one warning.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from accelerate import PartialState
from torch import Tensor, nn
from transformers import Trainer

from chipo.data import load_preference_dataset
from chipo.data.sft import IGNORE_INDEX, SFTCollator, prepare_sft_dataset
from chipo.logprobs import logprobs_from_logits
from chipo.models import load_causal_lm, load_tokenizer
from chipo.sequences import layouts_agree, single_row_attention
from chipo.train.common import check_output_dir, check_trackers, run_trainer
from chipo.train.pairwise import NonFiniteGradientGuard
from chipo.train.rundir import MetricsLog
from chipo.train.sft_config import SFTConfig

logger = logging.getLogger("chipo")


# ------------------------------------------------------------------------------------------------ packing


def is_packed(batch: dict[str, Tensor]) -> bool:
    """Whether ``batch`` is ``SFTCollator``'s packed layout (position_ids, no attention mask)."""
    return "position_ids" in batch and batch.get("attention_mask") is None


def unpack_sft_batch(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The right-padded batch (``input_ids``, ``attention_mask``, ``labels``) of a packed ``SFTCollator`` batch.

    Every packed row starts a sequence at position 0 and positions count up by one within a sequence, so a new
    sequence starts exactly where ``position_ids == 0`` (row-major), and a token's column in its padded row is
    its position id. A row's trailing padding becomes a row of its own whose labels are all -100: it adds
    nothing to the loss, so the loss (and its token count) is that of the padded batch.
    """
    positions = batch["position_ids"].reshape(-1)
    sequence = (positions == 0).cumsum(0) - 1
    shape = (int(sequence[-1]) + 1, int(positions.max()) + 1)
    index = (sequence, positions)
    ids = batch["input_ids"]
    input_ids = torch.zeros(shape, dtype=ids.dtype, device=ids.device).index_put(index, ids.reshape(-1))
    attention_mask = torch.zeros(shape, dtype=torch.long, device=ids.device).index_put(
        index, torch.ones_like(positions))
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long, device=ids.device).index_put(
        index, batch["labels"].reshape(-1))
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _labelled_logps(model: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """Per-row-token log-probs [R, L] of the labelled tokens (0 elsewhere) under ``model`` on ``batch``."""
    kwargs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**kwargs, use_cache=False).logits
    labels = batch["labels"]
    return logprobs_from_logits(logits, labels.clamp(min=0), labels != IGNORE_INDEX)


def sft_packing_matches(model: nn.Module, batch: dict[str, Tensor], rows: int = 4) -> bool:
    """Whether a packed ``SFTCollator`` batch gives the model the same log-likelihood of each sequence's labelled
    tokens (the terms of the SFT loss) as the same sequences padded, on the first ``rows`` packed rows.

    Runs once, under no_grad, in eval mode (dropout off), on the unwrapped model. A model whose attention ignores
    position_ids (it would attend across packed sequences) or that does not take them fails: one warning, False.
    """
    packed = {k: batch[k][:rows] for k in ("input_ids", "position_ids", "labels")}
    padded = unpack_sft_batch(packed)
    positions = packed["position_ids"].reshape(-1)
    sequence = (positions == 0).cumsum(0) - 1

    def per_sequence_packed() -> Tensor:  # each packed token's log-prob added to its sequence's sum
        per_token = _labelled_logps(model, packed).reshape(-1)
        return per_token.new_zeros(len(padded["input_ids"])).index_add(0, sequence, per_token)

    return layouts_agree(model, lambda: _labelled_logps(model, padded).sum(-1), per_sequence_packed,
                         "a different loss")


class SFTTrainer(Trainer):
    """``transformers.Trainer`` for ``SFTCollator`` batches, padded or packed (module docstring).

    A packed batch runs with ``use_cache=False``; the first one is checked with ``sft_packing_matches``, and if
    that fails this and every later packed batch is unpacked to padded rows (``unpack_sft_batch``) and the
    collator, if it is an ``SFTCollator``, stops packing.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.packing_ok: bool | None = None  # None: no packed batch seen yet

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if is_packed(inputs):
            if self.packing_ok is None:
                self.packing_ok = sft_packing_matches(self.accelerator.unwrap_model(model), inputs)
                if not self.packing_ok and isinstance(self.data_collator, SFTCollator):
                    self.data_collator.packing = False  # dataloader workers may hold copies: unpacked below
            inputs = dict(inputs, use_cache=False) if self.packing_ok else unpack_sft_batch(inputs)
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


# ------------------------------------------------------------------------------------------------ recipe


def prepare_split(config: SFTConfig, tokenizer, source: str, split: str, limit: int | None = None):
    # a generic loader: local files, saved datasets, the hub
    dataset = load_preference_dataset(source, split, max_rows=limit)
    prepared, stats = prepare_sft_dataset(dataset, tokenizer, source=source, max_length=config.max_length,
                                          max_prompt_length=config.max_prompt_length, num_proc=config.num_proc)
    logger.info("%s[%s]: %s", source, split, stats)
    return prepared


def run_sft(config: SFTConfig) -> Path:
    """Fine-tune per ``config``; returns the output directory holding the final HF-format model.

    As in ``chipo train``: everything that can fail on bad input is checked before ``output_dir`` is written, and
    the final model is saved into a temporary directory inside it and renamed into place; the run directory follows
    ``chipo.train.common.run_trainer`` (lock, overwrite, resume, objective check, metrics cut back).
    """
    config.require_model_and_data()
    check_trackers(config)
    tokenizer = load_tokenizer(config.tokenizer or config.model)
    state = PartialState()  # the config (TrainingArguments) has set up the possibly distributed state
    with state.main_process_first():
        train = prepare_split(config, tokenizer, config.dataset, config.split, config.max_train_samples)
        evaluation = (prepare_split(config, tokenizer, config.eval_dataset or config.dataset, config.eval_split)
                      if config.eval_split else None)
    out = check_output_dir(config)
    model = load_causal_lm(config.model)
    if config.gradient_checkpointing:
        model.config.use_cache = False

    # Nothing above touched the disk: from here on the run is valid and may write its directory.
    if config.group_by_length:
        train = train.add_column("length", [len(p) + len(c) for p, c in
                                            zip(train["prompt_input_ids"], train["completion_input_ids"])])
    collator = SFTCollator(tokenizer.pad_token_id, completion_only_loss=config.completion_only_loss,
                           packing=config.packing, single_row=single_row_attention(model))
    return run_trainer(config, out, lambda: SFTTrainer(
        model=model, args=config, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer,
        data_collator=collator, callbacks=[MetricsLog(out / "metrics.jsonl"), NonFiniteGradientGuard()]),
        tokenizer, objective_keys=SFTConfig.objective_keys)
