"""``chipo sft``: supervised fine-tuning of a causal LM on prompt/completion data, loss on completion tokens only.

This is the first stage of the TL;DR recipe (pi_ref = the SFT model); it runs on ``transformers.Trainer`` with the
model's own next-token cross-entropy, so the only SFT-specific pieces are the data preparation and the collator,
both in ``chipo.data.sft`` (layouts, tokenization and truncation rules are documented there).
"""

from __future__ import annotations

import logging
from pathlib import Path

from accelerate import PartialState
from transformers import Trainer

from chipo.config import dump_yaml
from chipo.data import load_preference_dataset
from chipo.data.sft import SFTCollator, prepare_sft_dataset
from chipo.io import atomic_write_text
from chipo.models import load_causal_lm, load_tokenizer
from chipo.train.common import check_output_dir, resolve_resume, save_final_model
from chipo.train.pairwise import NonFiniteGradientGuard
from chipo.train.rundir import MetricsLog
from chipo.train.sft_config import SFTConfig

logger = logging.getLogger("chipo")


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
    the final model is saved into a temporary directory inside it and renamed into place.
    """
    config.require_model_and_data()
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
    if state.is_main_process:
        atomic_write_text(out / "run_config.yaml", dump_yaml(config))
    if config.group_by_length:
        train = train.add_column("length", [len(p) + len(c) for p, c in
                                            zip(train["prompt_input_ids"], train["completion_input_ids"])])
    trainer = Trainer(
        model=model, args=config, train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer,
        data_collator=SFTCollator(tokenizer.pad_token_id, completion_only_loss=config.completion_only_loss),
        callbacks=[MetricsLog(out / "metrics.jsonl"), NonFiniteGradientGuard()],
    )
    trainer.train(resume_from_checkpoint=resolve_resume(config.resume_from_checkpoint, out))
    save_final_model(trainer, tokenizer, out, merge_lora=False)
    return out
