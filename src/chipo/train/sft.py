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
from torch import Tensor, nn
from transformers import Trainer, TrainingArguments

from chipo.config import ConfigError
from chipo.data.sft import IGNORE_INDEX, SFTCollator, prepare_sft_dataset
from chipo.logprobs import logprobs_from_logits
from chipo.models import add_adapters, default_tokenizer, is_loaded, pad_id, refuse_quantizing_loaded
from chipo.sequences import layouts_agree, single_row_attention
from chipo.train.common import check_output_dir, check_trackers, load_policy, run_trainer, trainer_datasets
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
    """``transformers.Trainer`` for ``SFTCollator`` batches, padded or packed (module docstring), taking TRL's
    ``SFTTrainer`` arguments with their meaning (switching is two imports, ``SFTConfig`` and ``SFTTrainer``).

    ``model``: a loaded causal LM, or a name / local directory (None: ``args.model``) loaded by ``load_policy``
    with ``args.model_init_kwargs``, ``args.trust_remote_code`` and ``quantization_config`` (refused with a loaded
    model: quantization happens at loading). ``args``: an ``SFTConfig``; a plain ``TrainingArguments`` becomes one
    (its values kept), None the defaults. ``processing_class``: default the model's own tokenizer. ``peft_config``:
    adapters added by ``peft.get_peft_model``. ``train_dataset`` / ``eval_dataset``: raw rows (a ``datasets.Dataset``
    or a list of dicts) in TRL's prompt/completion or messages formats, validated and tokenized here; rows already
    prepared by ``prepare_sft_dataset`` as they are; None: ``args.dataset`` / ``args.eval_split`` when set.
    ``data_collator``: default an ``SFTCollator`` per the config. TRL's ``formatting_func`` is refused in one line
    (rows carry prompt and completion here). ``chipo sft`` builds its trainer through the same path (``run_sft``).

    A packed batch runs with ``use_cache=False``; the first one is checked with ``sft_packing_matches``, and if
    that fails this and every later packed batch is unpacked to padded rows (``unpack_sft_batch``) and the
    collator, if it is an ``SFTCollator``, stops packing.
    """

    def __init__(self, model: nn.Module | str | None = None, args: TrainingArguments | None = None,
                 data_collator=None, train_dataset=None, eval_dataset=None, processing_class=None,
                 peft_config=None, quantization_config=None, formatting_func=None, **kwargs: Any):
        if formatting_func is not None:  # TRL's: a function that turns a row into the text to train on
            raise ConfigError("formatting_func is not supported: give rows with prompt and completion, or messages "
                              "(datasets' map can apply the function first), so the loss covers the completion only")
        refuse_quantizing_loaded(model, quantization_config)
        args = SFTConfig.from_args(args, model, "SFT")
        if not is_loaded(model):
            model = load_policy(args, model, quantization_config)
        if processing_class is None:
            processing_class = default_tokenizer(model, tokenizer=args.tokenizer, fallback=args.model,
                                                 trust_remote_code=args.trust_remote_code)
        if peft_config is not None:
            model = add_adapters(model, peft_config, seed=args.seed)
        if args.gradient_checkpointing:
            model.config.use_cache = False
        train_dataset, eval_dataset = trainer_datasets(
            args, train_dataset, eval_dataset, lambda rows, source: prepare_rows(args, processing_class, rows, source))
        if data_collator is None:
            data_collator = SFTCollator(pad_id(processing_class), completion_only_loss=args.completion_only_loss,
                                        packing=args.packing, single_row=single_row_attention(model))
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=processing_class, **kwargs)
        self.packing_ok: bool | None = None  # None: no packed batch seen yet

    def _set_signature_columns_if_needed(self) -> None:
        # What remove_unused_columns keeps: the columns SFTCollator and the length-grouped sampler read. Trainer's
        # default, model.forward's arguments, would drop every one of them (rows are tokenized prompt/completion).
        if self._signature_columns is None:
            self._signature_columns = ["prompt_input_ids", "completion_input_ids", self.args.length_column_name]

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


def prepare_rows(config: SFTConfig, tokenizer, dataset, source: str):
    """Validate and tokenize raw SFT rows (``chipo.data.sft``); add the length column when ``group_by_length``."""
    prepared, stats = prepare_sft_dataset(dataset, tokenizer, source=source, max_length=config.max_length,
                                          max_prompt_length=config.max_prompt_length, num_proc=config.num_proc)
    logger.info("%s: %s", source, stats)
    if config.group_by_length:
        prepared = prepared.add_column(config.length_column_name, [len(p) + len(c) for p, c in
                                                  zip(prepared["prompt_input_ids"], prepared["completion_input_ids"])])
    return prepared


def run_sft(config: SFTConfig) -> Path:
    """Fine-tune per ``config``; returns the output directory holding the final HF-format model.

    As in ``chipo train``: everything that can fail on bad input is checked before ``output_dir`` is written, and
    the final model is saved into a temporary directory inside it and renamed into place; the run directory follows
    ``chipo.train.common.run_trainer`` (lock, overwrite, resume, objective check, metrics cut back). The model,
    tokenizer and data are set up as ``SFTTrainer`` sets them up for a Python caller (the same functions), only
    earlier, so that bad input fails before the output directory exists.
    """
    config.require_model_and_data()
    check_trackers(config)
    tokenizer = default_tokenizer(config.model, tokenizer=config.tokenizer, trust_remote_code=config.trust_remote_code)
    train, evaluation = trainer_datasets(config, None, None,
                                         lambda rows, source: prepare_rows(config, tokenizer, rows, source))
    out = check_output_dir(config)
    model = load_policy(config)  # model_init_kwargs, trust_remote_code

    # Nothing above touched the disk: from here on the run is valid and may write its directory.
    return run_trainer(config, out, lambda: SFTTrainer(
        model=model, args=config, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer,
        callbacks=[MetricsLog(out / "metrics.jsonl"), NonFiniteGradientGuard()]),
        tokenizer, objective_keys=SFTConfig.objective_keys)
