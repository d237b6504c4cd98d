"""The ``chipo train`` recipe: wire config -> data -> model -> reference -> PreferenceTrainer -> HF checkpoint.

Everything that can fail on bad input (config, tokenizer, data, output directory) is checked before the output
directory is written, so a rejected run leaves nothing behind. The run directory is then owned by this run
(``chipo.train.common.run_trainer`` on ``chipo.train.rundir``: a lock, a killed run's leftovers cleaned, a complete
checkpoint picked for resume, the metrics log cut back to it), as in ``chipo sft`` and ``chipo reward``. The final
model is saved into a temporary directory inside ``output_dir`` and renamed into place.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from chipo.models import load_tokenizer
from chipo.train import rundir
from chipo.train.common import check_output_dir, check_trackers, load_policy, run_trainer, trainer_datasets
from chipo.train.config import PreferenceConfig
from chipo.train.preference import PreferenceTrainer
from chipo.train.preference_setup import apply_lora, prepare_rows

logger = logging.getLogger("chipo")


def run_training(config: PreferenceConfig, callbacks: Sequence = ()) -> Path:
    """Train per ``config``; returns the output directory holding the final HF-format model. ``callbacks``:
    extra ``transformers.TrainerCallback``s (after chipo's metrics log)."""
    config.require_model_and_data()
    check_trackers(config)
    tokenizer = load_tokenizer(config.tokenizer or config.model, trust_remote_code=config.trust_remote_code)
    train, evaluation = trainer_datasets(config, None, None,
                                         lambda rows, source: prepare_rows(config, tokenizer, rows, source))
    out = check_output_dir(config)
    model = load_policy(config)  # model_init_kwargs, trust_remote_code
    if config.lora:
        model = apply_lora(model, config)

    # Nothing above touched the disk: from here on the run is valid and may write its directory.
    return run_trainer(config, out, lambda: PreferenceTrainer(
        model=model, args=config, train_dataset=train, eval_dataset=evaluation,
        processing_class=tokenizer, callbacks=[rundir.MetricsLog(out / "metrics.jsonl"), *callbacks]),
        tokenizer, merge_lora=config.lora)
