"""The sweep stage: one ``chipo train`` run per (loss, beta, seed), resumable, reference log-probs shared.

Each run is ``chipo.train.run.run_training`` with ``save_strategy="epoch"`` and a learning rate that is constant
after a warm-up of ``warmup_epochs`` epochs: the epoch-e checkpoint of the ``epochs``-long run is then the policy
an e-epoch run would give (same steps, same learning rates, same data order for the seed), so one run per cell
serves the paper's 1-, 2- and 4-epoch columns (the lab sweep's argument, ``chipo.lab.sweep``). The reference
log-probs (``reference="precompute"``) go to one cache directory for the whole sweep: the first run computes them,
every other run with the same pi_ref, data and truncation reads them.

Resuming: a run with ``done.json`` is skipped; a run with checkpoints but no ``done.json`` resumes from its last
checkpoint; anything else starts fresh. When a run finishes, checkpoints of epochs outside ``eval_epochs`` (and of
the last epoch, whose weights are the final model's) are deleted, and so are the optimizer states of the kept ones
unless ``keep_optimizer_states`` (only resuming an unfinished run needs them).

The recipe directory is a shared experiment directory (``chipo.train.experiment_dir``): several sweep processes may
fill it at once (one GPU each, or the ranks of ``accelerate launch``), a process with other settings is refused,
``overwrite=true`` (with no other process in it) starts it again, and a sweep that fails before anything is saved
leaves no directory behind.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import time
from pathlib import Path

from chipo.config import ConfigError, build_config, parse_overrides
from chipo.io import write_json
from chipo.lab.sweep import checkpoints_by_epoch, r_max_for
from chipo.recipes.tldr.config import SweepStageConfig
from chipo.recipes.tldr.layout import RECIPE_FILES, Layout

logger = logging.getLogger("chipo.recipes.tldr")

# What only resuming needs: deleted from kept checkpoints once the run is finished.
_RESUME_ONLY = ("optimizer.pt", "scheduler.pt", "rng_state*.pth", "training_args.bin")


def record_settings(config: SweepStageConfig, layout: Layout) -> None:
    """Write the sweep's config (``sweep.json``) for the later stages (its settings key is checked by
    ``open_experiment`` from experiment.json)."""
    write_json(layout.sweep_json, {"settings_key": config.settings_key(), "config": dataclasses.asdict(config)})


def train_config(config: SweepStageConfig, layout: Layout, loss: str, beta: float, seed: int, resume: bool):
    """The ``PreferenceConfig`` of one run (validated like ``chipo train``'s own)."""
    from chipo.train.config import PreferenceConfig

    values = dict(
        model=config.sft_model, dataset=config.dataset, split=config.split,
        max_train_samples=config.max_train_samples, output_dir=str(layout.run_dir(loss, beta, seed)),
        overwrite_output_dir=True, loss=loss, beta=beta, r_max=r_max_for(loss, config.r_max),
        reference="precompute", ref_cache_dir=str(layout.ref_cache), max_length=config.max_length,
        max_prompt_length=config.max_prompt_length, num_train_epochs=config.epochs,
        per_device_train_batch_size=config.per_device_train_batch_size,
        per_device_eval_batch_size=config.per_device_eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps, learning_rate=config.learning_rate,
        lr_scheduler_type="constant_with_warmup",
        # transformers reads a warm-up ratio of the whole run: this many epochs out of `epochs`.
        warmup_ratio=config.warmup_epochs / config.epochs,
        bf16=config.bf16, gradient_checkpointing=config.gradient_checkpointing, logging_steps=config.logging_steps,
        save_strategy="epoch", seed=seed, resume_from_checkpoint="latest" if resume else None,
    )
    values.update(parse_overrides(config.train_overrides))
    return build_config(PreferenceConfig, values)


def finish_run(config: SweepStageConfig, run_dir: Path, loss: str, beta: float, seed: int,
               train_seconds: float) -> dict:
    """Write ``done.json`` (the run's record for the later stages), then prune the checkpoints.

    In that order: a prune cut short leaves disk to reclaim, never a finished run that looks unfinished (which
    would resume from an earlier checkpoint and train its last epochs again).
    """
    ckpts = checkpoints_by_epoch(run_dir)
    missing = [e for e in config.eval_epochs if e not in ckpts and e != config.epochs]
    if missing:
        raise RuntimeError(f"{run_dir}: no checkpoint for epoch(s) {missing} after training (found {sorted(ckpts)})")
    # The last epoch is the final model in the run directory itself ("."): its checkpoint is a duplicate.
    kept = {e: ("." if e == config.epochs else ckpts[e].name) for e in config.eval_epochs}
    done = {"loss": loss, "beta": beta, "seed": seed, "epochs": config.epochs, "sft_model": config.sft_model,
            "checkpoints": {str(e): kept[e] for e in sorted(kept)}, "train_seconds": train_seconds}
    write_json(run_dir / "done.json", done)
    for epoch, ckpt in ckpts.items():
        if kept.get(epoch) != ckpt.name:
            shutil.rmtree(ckpt)
        elif not config.keep_optimizer_states:
            for pattern in _RESUME_ONLY:
                for path in ckpt.glob(pattern):
                    path.unlink()
    return done


def run_sweep(config: SweepStageConfig, train_fn=None) -> dict:
    """Train every unfinished run; returns counts ``{"trained", "skipped", "runs"}``.

    ``train_fn`` (default ``run_training``) is injectable for tests. Under ``accelerate launch`` every process runs
    the same loop (the trainer is data-parallel); only the main process prunes and writes ``done.json``.
    """
    from chipo.train.experiment_dir import key_recorded_in, open_experiment

    if train_fn is None:
        from chipo.train.run import run_training as train_fn
    layout = Layout(config.out_dir)
    if config.overwrite and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every rank would open the directory; none may clear it while another has started in it.
        raise ConfigError(f"overwrite=true is refused under a multi-process launch (a process would clear "
                          f"{layout.root} while another works in it): choose a new out_dir, or remove the old one "
                          "yourself first")
    with open_experiment(layout.root, config.settings_key(), overwrite=config.overwrite, what="TL;DR sweep",
                         shared=True, legacy_key=key_recorded_in("sweep.json", "settings_key"), owned=RECIPE_FILES):
        return _run_cells(config, layout, train_fn)


def _run_cells(config: SweepStageConfig, layout: Layout, train_fn) -> dict:
    cells = [(loss, beta, seed) for beta in config.betas for loss in config.losses for seed in config.seeds]
    trained = skipped = 0
    for i, (loss, beta, seed) in enumerate(cells, 1):
        run_dir = layout.run_dir(loss, beta, seed)
        if (run_dir / "done.json").is_file():
            skipped += 1
            continue
        resume = bool(run_dir.is_dir() and checkpoints_by_epoch(run_dir))
        train = train_config(config, layout, loss, beta, seed, resume)
        logger.info("run %d/%d: %s (%s)", i, len(cells), run_dir.name, "resuming" if resume else "fresh")
        start = time.perf_counter()
        train_fn(train)
        seconds = time.perf_counter() - start
        from accelerate import PartialState

        state = PartialState()  # initialised by the trainer; a no-op in a single process
        if state.is_main_process:
            record_settings(config, layout)  # before the run's done.json: generate reads sft_model from it
            finish_run(config, run_dir, loss, beta, seed, seconds)
        state.wait_for_everyone()
        trained += 1
    return {"trained": trained, "skipped": skipped, "runs": len(cells)}
