"""The ``chipo train`` recipe: wire config -> data -> model -> reference -> PreferenceTrainer -> HF checkpoint.

Everything that can fail on bad input (config, tokenizer, data, output directory) is checked before the output
directory is created, so a rejected run leaves nothing behind. The final model is saved into a temporary
directory inside ``output_dir`` and renamed into place.
"""

from __future__ import annotations

import logging
from pathlib import Path

from accelerate import PartialState

from chipo.config import dump_yaml
from chipo.io import atomic_write_text
from chipo.models import load_causal_lm, load_tokenizer
from chipo.train.callbacks import JsonlMetricsCallback
from chipo.train.common import check_output_dir, resolve_resume, save_final_model
from chipo.train.config import PreferenceConfig
from chipo.train.preference import PreferenceTrainer
from chipo.train.preference_setup import apply_lora, prepare_split

logger = logging.getLogger("chipo")


def run_training(config: PreferenceConfig) -> Path:
    """Train per ``config``; returns the output directory holding the final HF-format model."""
    config.require_model_and_data()
    tokenizer = load_tokenizer(config.tokenizer or config.model)
    state = PartialState()  # the config (TrainingArguments) has set up the possibly distributed state
    with state.main_process_first():
        datasets = {"train": prepare_split(config, tokenizer, config.dataset, config.split, config.max_train_samples)}
        if config.eval_split:
            datasets["eval"] = prepare_split(config, tokenizer, config.eval_dataset or config.dataset,
                                             config.eval_split)
    out = check_output_dir(config)
    model = load_causal_lm(config.model)
    if config.gradient_checkpointing:
        model.config.use_cache = False
    if config.lora:
        model = apply_lora(model, config)

    # Nothing above touched the disk: from here on the run is valid and may write its directory.
    if state.is_main_process:
        atomic_write_text(out / "run_config.yaml", dump_yaml(config))
    trainer = PreferenceTrainer(model=model, args=config, train_dataset=datasets["train"],
                                eval_dataset=datasets.get("eval"), processing_class=tokenizer,
                                callbacks=[JsonlMetricsCallback(out / "metrics.jsonl")])
    trainer.train(resume_from_checkpoint=resolve_resume(config.resume_from_checkpoint, out))
    save_final_model(trainer, tokenizer, out, merge_lora=config.lora)
    return out
