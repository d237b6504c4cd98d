"""Sweeps: losses x beta x seeds, each trained once and evaluated at several epochs; resumable.

One training run per cell (loss, beta, seed) through ``chipo.train.run.run_training`` with a *constant* learning
rate and a checkpoint at every epoch, and every requested epoch is evaluated from its checkpoint. With a constant
learning rate (and the trainer's per-epoch data order fixed by the seed) the epoch-e checkpoint of a long run is
the policy an e-epoch run would produce, so no run is repeated per epoch count. Reference log-probs are computed
once and shared through the trainer's disk cache (``reference="precompute"``, ``ref_cache_dir`` in the sweep).

Every evaluated (cell, epoch) is appended as one JSON line to ``results.jsonl`` as soon as it is known; a rerun
skips the cells whose epochs are all there (no training, no evaluation) and finishes a cell that was cut short
(training resumes from its last checkpoint, evaluation skips the epochs already recorded). pi_ref itself is the
``epoch 0`` row (``loss = "pi_ref"``) shared by all cells.

``out_dir`` follows the experiment-directory protocol (``chipo.train.experiment_dir``): one sweep at a time per
directory (a lock), ``results_key`` recorded in ``experiment.json`` and checked on every rerun (losses, betas and
seeds are not part of it: a sweep can be extended), ``overwrite=true`` to start the directory again, and a sweep
that fails before its first result row leaves no directory behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from chipo.config import ConfigError, _field
from chipo.io import write_json
from chipo.lab.configs import GoldFields, SamplingFields, Variant, parse_variants
from chipo.lab.runs import (  # noqa: F401 -- also this module's public names
    _quiet_libraries,
    _steps_per_epoch,
    _train_metrics_by_epoch,
    append_row,
    checkpoints_by_epoch,
    load_pairs,
    load_prompts,
    quiet_libraries,
    read_results,
    save_at_epochs,
)

logger = logging.getLogger("chipo.lab")


def validate_grid(losses, betas, seeds, epochs: int) -> None:
    """One-line ``ConfigError`` unless the sweep grid is usable: known, non-empty losses; positive betas; seeds;
    at least one epoch."""
    from chipo.losses import loss_names

    for loss in losses:
        if loss not in loss_names():
            raise ConfigError(f"unknown loss {loss!r}; valid: {', '.join(loss_names())}")
    if not losses or not betas or not seeds:
        raise ConfigError("losses, betas and seeds must be non-empty")
    if any(not b > 0 for b in betas):
        raise ConfigError(f"betas must be positive, got {betas}")
    if epochs < 1:
        raise ConfigError(f"epochs must be at least 1, got {epochs}")


@dataclass
class SweepConfig(GoldFields, SamplingFields):
    """A sweep over losses x betas x seeds, each run evaluated at ``eval_epochs``."""

    ref_model: str = _field(None, "pi_ref: HF causal LM directory or hub name (also the initial policy).")
    train_prefs: str = _field(None, "Training preference data (path or hub name). May contain '{seed}' to use one "
                                    "dataset per seed (fresh draws from pi_ref: the data's randomness counts).")
    eval_prompts: str = _field(None, "Held-out prompts (jsonl/parquet/dir/hub): a 'prompt' column and optionally "
                                     "'reference' (or 'completion' / 'chosen') reference responses.")
    out_dir: str = _field(None, "Sweep directory: results.jsonl, sweep.json, runs/, ref_cache/.")
    heldout_prefs: str | None = _field(None, "Held-out preference pairs for the implicit-reward accuracy.")
    split: str = _field("train", "Split of the data sources.")
    losses: list[str] = field(default_factory=lambda: ["dpo", "chipo"], metadata={"help": "Loss presets (each a "
                                                                                      "method with its defaults)."})
    variants: dict | list[str] | None = _field(None, "Methods as loss + options, replacing `losses`: a YAML mapping "
                                                     "name -> {loss: L, sft_weight: 1, ...} or strings "
                                                     "'name:loss:key=value,key=value' (options: r_max, clip_margin, "
                                                     "link, label_smoothing, alpha, length_normalize, sft_weight, "
                                                     "reward_bound).")
    betas: list[float] = field(default_factory=lambda: [0.05, 0.005], metadata={"help": "beta values."})
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2], metadata={"help": "Seeds."})
    epochs: int = _field(16, "Epochs of each run.")
    eval_epochs: list[int] | None = _field(None, "Epochs to evaluate (default: 1, 2, 4, ... and the last).")
    learning_rate: float = _field(1e-3, "Constant learning rate (AdamW).")
    batch_size: int = _field(32, "Preference pairs per optimizer step.")
    r_max: float | None = _field(None, "Margin clip bound of the losses that clip (chiPO): a number, or null "
                                       "(the loss's own, 5 for chiPO). DPO never clips.")
    max_length: int = _field(512, "Max prompt + response tokens in training.")
    max_prompt_length: int | None = _field(None, "Max prompt tokens in training.")
    num_samples: int = _field(64, "Samples per held-out prompt for evaluation.")
    max_eval_prompts: int | None = _field(None, "Evaluate on the first N held-out prompts only.")
    exact: bool = _field(True, "Exact metrics when the gold scorer has an enumerable response space.")
    keep_checkpoints: bool = _field(False, "Keep the per-epoch checkpoints after evaluation.")
    workers: int = _field(1, "Parallel training processes.")
    report: bool = _field(False, "Write the report when the sweep is done.")
    overwrite: bool = _field(False, "Clear out_dir's previous sweep (results, runs, reference cache) and start "
                                    "again; without it a rerun resumes, and other settings are refused.")

    def __post_init__(self) -> None:
        for name in ("ref_model", "train_prefs", "eval_prompts", "out_dir"):
            if not getattr(self, name):
                raise ConfigError(f"{name} is required")
        self.check_sampling()
        self.methods: list[Variant] = (parse_variants(self.variants) if self.variants
                                       else [Variant(loss, loss) for loss in self.losses])
        validate_grid([m.loss for m in self.methods], self.betas, self.seeds, self.epochs)
        if self.eval_epochs is None:
            self.eval_epochs = default_eval_epochs(self.epochs)
        self.eval_epochs = sorted(set(self.eval_epochs))
        if not all(1 <= e <= self.epochs for e in self.eval_epochs):
            raise ConfigError(f"eval_epochs must lie in [1, {self.epochs}], got {self.eval_epochs}")

    def results_key(self) -> dict:
        """Fields that change results: a rerun must match them to reuse results.jsonl."""
        d = dataclasses.asdict(self)
        for name in ("out_dir", "keep_checkpoints", "losses", "variants", "betas", "seeds", "workers", "report",
                     "sampling_batch_size", "overwrite"):
            d.pop(name)
        return d


def default_eval_epochs(epochs: int) -> list[int]:
    """1, 2, 4, ... up to ``epochs``, and ``epochs`` itself."""
    out = [2 ** i for i in range(int(math.log2(epochs)) + 1)]
    return sorted(set(out + [epochs]))


def cell_name(method: str, beta: float, seed: int) -> str:
    return f"{method}_beta{beta:g}_seed{seed}"


def row_method(row: dict) -> str:
    """The method (variant name) of a result row; rows written before variants existed name it by the loss."""
    return row.get("method") or row["loss"]


class Sweep:
    """Runs a ``SweepConfig``; ``train_fn`` (default ``run_training``) is injectable for tests (``workers=1``)."""

    def __init__(self, config: SweepConfig, train_fn: Callable | None = None, progress: bool = True,
                 workers: int = 1):
        self.config = config
        self.out = Path(config.out_dir)
        self.results_path = self.out / "results.jsonl"
        self.train_fn = train_fn
        self.progress = progress
        self.workers = max(1, workers)
        self.train_calls = 0

    def cells(self) -> list[tuple[str, float, int]]:
        c = self.config
        return [(m.name, beta, seed) for beta in c.betas for seed in c.seeds for m in c.methods]

    def _check_variants(self, rows: list[dict]) -> None:
        """A method name already in results.jsonl must mean the same loss and options (else its rows would mix)."""
        for m in self.config.methods:
            for r in rows:
                if row_method(r) == m.name and (r["loss"], r.get("options") or {}) != (m.loss, m.option_dict):
                    raise ConfigError(f"{self.results_path}: method {m.name!r} was run as {r['loss']} with options "
                                      f"{r.get('options') or {}}, now {m.describe()}; rename the variant")

    def run(self) -> list[dict]:
        """Train and evaluate every unfinished cell; returns all result rows."""
        # imports transformers: not at module import
        from chipo.train.experiment_dir import key_recorded_in, open_experiment

        key = self.config.results_key()
        legacy = key_recorded_in("sweep.json", "results_key")
        with quiet_libraries(), open_experiment(self.out, key, overwrite=self.config.overwrite, what="sweep",
                                                legacy_key=legacy, owned=SWEEP_FILES) as exp:
            rows = self._run()
            exp.finish({"cells": len(self.cells()), "rows": len(rows)})
            return rows

    def _run(self) -> list[dict]:
        from chipo.lab.evaluate import baseline_metrics

        c = self.config
        rows = read_results(self.results_path)
        self._check_variants(rows)
        todo = [cell for cell in self.cells() if not set(c.eval_epochs) <= epochs_done(rows, *cell)]
        need_ref_row = not any(r.get("loss") == "pi_ref" for r in rows)
        if not todo and not need_ref_row:
            return rows

        start = time.perf_counter()
        # pi_ref's baseline first: a setting it rejects (exact metrics with truncated sampling) stops the sweep
        # before anything is written (and the protocol removes the directory it created).
        runner = CellRunner(c, train_fn=self.train_fn, progress=self.progress)
        if need_ref_row:
            metrics = baseline_metrics(runner.ref, runner.tokenizer, runner.gold, runner.baseline,
                                       settings=c.sampling(), num_samples=c.num_samples, progress=self.progress)
            row = {"loss": "pi_ref", "beta": None, "seed": None, "epoch": 0, "step": 0, **metrics,
                   "eval_seconds": time.perf_counter() - start}
            append_row(self.results_path, row)
            rows.append(row)
        # The full config, for reading (the settings key that is checked lives in experiment.json).
        write_json(self.out / "sweep.json", {"config": dataclasses.asdict(c), "results_key": c.results_key()})

        bar = tqdm(total=len(self.cells()), initial=len(self.cells()) - len(todo), desc="sweep (runs)", unit="run",
                   disable=not self.progress)
        if self.workers == 1 or len(todo) == 1:
            for loss, beta, seed in todo:
                bar.set_postfix_str(cell_name(loss, beta, seed))
                rows.extend(runner.run(loss, beta, seed, epochs_done(rows, loss, beta, seed)))
                bar.update()
            self.train_calls = runner.train_calls
        else:
            rows.extend(self._run_parallel(todo, rows, runner.baseline, bar))
        bar.close()
        return rows

    def _run_parallel(self, todo, rows, baseline, bar) -> list[dict]:
        """Cells in ``workers`` processes, one torch thread each (tiny models do not scale across threads)."""
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        out = []
        ctx = multiprocessing.get_context("spawn")
        # Workers' own bars (the trainer's reference log-probs) would interleave with ours: tqdm reads TQDM_DISABLE
        # when a fresh (spawned) process imports it; this process's tqdm is already imported and unaffected.
        saved = os.environ.get("TQDM_DISABLE")
        os.environ["TQDM_DISABLE"] = "1"
        try:
            with ProcessPoolExecutor(self.workers, mp_context=ctx, initializer=_worker_init,
                                     initargs=(dataclasses.asdict(self.config), baseline)) as pool:
                futures = {pool.submit(_worker_run, loss, beta, seed, epochs_done(rows, loss, beta, seed)):
                           (loss, beta, seed) for loss, beta, seed in todo}
                for future in as_completed(futures):
                    out.extend(future.result())
                    bar.set_postfix_str(cell_name(*futures[future]))
                    bar.update()
        finally:
            if saved is None:
                os.environ.pop("TQDM_DISABLE", None)
            else:
                os.environ["TQDM_DISABLE"] = saved
        self.train_calls = len(todo)
        return out


SWEEP_FILES = ("results.jsonl", "sweep.json", "runs", "ref_cache")
"""What a sweep writes into out_dir."""


def epochs_done(rows: list[dict], method: str, beta: float, seed: int) -> set[int]:
    """Epochs of cell (method, beta, seed) already in the results."""
    return {r["epoch"] for r in rows
            if r.get("loss") != "pi_ref" and row_method(r) == method and r.get("beta") == beta
            and r.get("seed") == seed}


class CellRunner:
    """Holds pi_ref, the tokenizer, the gold scorer and pi_ref's baseline; trains and evaluates one cell."""

    def __init__(self, config: SweepConfig, train_fn: Callable | None = None, progress: bool = True,
                 baseline=None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from chipo.lab.evaluate import build_baseline
        from chipo.rewards import load_scorer

        c = self.config = config
        self.out = Path(c.out_dir)
        self.train_fn = train_fn
        self.train_calls = 0
        self.tokenizer = AutoTokenizer.from_pretrained(c.ref_model)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.ref = AutoModelForCausalLM.from_pretrained(c.ref_model).eval()
        self.gold = load_scorer(c.gold, template=c.gold_template)
        if baseline is None:
            prompts, references = load_prompts(c.eval_prompts, c.split, c.max_eval_prompts)
            heldout = load_pairs(c.heldout_prefs, c.split) if c.heldout_prefs else None
            baseline = build_baseline(self.ref, self.tokenizer, prompts, self.gold, references=references,
                                      settings=c.sampling(), num_samples=c.num_samples, heldout_pairs=heldout,
                                      exact=c.exact, progress=progress)
        self.baseline = baseline
        self._train_pairs: dict[int, list[dict] | None] = {}
        self._ref_mass: dict[int, dict] = {}
        self._language: dict[str, list[str]] = {}  # prompt -> its in-language responses (enumerable worlds)

    def method(self, name: str) -> Variant:
        return next(m for m in self.config.methods if m.name == name)

    def train_config(self, method: str, beta: float, seed: int, run_dir: Path, resume: bool):
        from chipo.config import build_config
        from chipo.train.config import PreferenceConfig

        c = self.config
        variant = self.method(method)
        dataset = c.train_prefs.replace("{seed}", str(seed))
        values = dict(
            model=c.ref_model, dataset=dataset, split=c.split, output_dir=str(run_dir), overwrite_output_dir=True,
            loss=variant.loss, beta=beta, r_max=r_max_for(variant.loss, c.r_max), reference="precompute",
            ref_cache_dir=str(self.out / "ref_cache"),
            max_length=c.max_length, max_prompt_length=c.max_prompt_length, num_train_epochs=c.epochs,
            per_device_train_batch_size=c.batch_size, learning_rate=c.learning_rate, lr_scheduler_type="constant",
            save_strategy="epoch", logging_steps=_steps_per_epoch(dataset, c.batch_size), disable_tqdm=True,
            seed=seed, resume_from_checkpoint="latest" if resume else None,
            # Sampled pairs can repeat a response (y1 == y2): no preference, no gradient; drop them, counted.
            drop_ties=True,
            # The lab evaluates every kept epoch against gold itself (chipo.lab.evaluate); no monitor in the loop.
            monitor="off",
        )
        values.update(variant.option_dict)  # the variant's options win over the sweep-wide r_max
        return build_config(PreferenceConfig, values)

    def train_pairs(self, seed: int) -> list[dict] | None:
        """The seed's training pairs with pi_ref's log-probs (ties left out), for the proxy's view on them; None
        when the data are not a local file the lab can read."""
        from chipo.lab.evaluate import data_mass, language_responses, with_ref_logps

        if seed not in self._train_pairs:
            source = self.config.train_prefs.replace("{seed}", str(seed))
            pairs = None
            if Path(source).is_file():
                pairs = with_ref_logps(self.ref, self.tokenizer, load_pairs(source, self.config.split))
            self._train_pairs[seed] = pairs
            if pairs:
                self._language.update(language_responses(self.gold, [r["prompt"] for r in pairs
                                                                     if r["prompt"] not in self._language]) or {})
            if pairs and all(r["prompt"] in self._language for r in pairs):
                self._ref_mass[seed] = data_mass(self.ref, self.tokenizer, pairs, self._language)
        return self._train_pairs[seed]

    def mechanism(self, policy, loss: str, beta: float, seed: int, loss_options: dict) -> dict:
        """Implicit-reward accuracy and clip fraction on the training pairs; where the mass goes (exact worlds)."""
        from chipo.lab.evaluate import data_mass, pair_metrics

        pairs = self.train_pairs(seed)
        if not pairs:
            return {}
        train = pair_metrics(policy, self.tokenizer, pairs, loss, beta, loss_options)
        out = {"train_acc_exact": train["acc"], "clip_frac": train["clip_frac"]}
        if seed in self._ref_mass:
            out["mass"] = data_mass(policy, self.tokenizer, pairs, self._language)
            out["mass_ref"] = self._ref_mass[seed]
        return out

    def run(self, method: str, beta: float, seed: int, done: set[int]) -> list[dict]:
        """Train (or resume) the cell if a needed checkpoint is missing, evaluate its missing epochs."""
        from transformers import AutoModelForCausalLM

        from chipo.lab.evaluate import evaluate_policy

        c = self.config
        variant = self.method(method)
        run_dir = self.out / "runs" / cell_name(method, beta, seed)
        missing = [e for e in c.eval_epochs if e not in done]
        ckpts = checkpoints_by_epoch(run_dir) if run_dir.is_dir() else {}
        train_seconds = train_cpu_seconds = None
        config = self.train_config(method, beta, seed, run_dir, resume=bool(ckpts))
        loss_options = config.loss_options()  # exactly the options training used
        if not all(e in ckpts for e in missing):
            start, cpu_start = time.perf_counter(), time.process_time()
            self.train_calls += 1
            train_fn = self.train_fn
            if train_fn is None:
                from chipo.train.run import run_training

                train_fn = functools.partial(run_training, callbacks=[save_at_epochs(c.eval_epochs)])
            run_dir.mkdir(parents=True, exist_ok=True)
            # transformers prints every log dict to stdout when tqdm is off; keep it in the run's log instead.
            with (run_dir / "train.log").open("a") as log, contextlib.redirect_stdout(log), \
                    warnings.catch_warnings():
                warnings.simplefilter("ignore")
                train_fn(config)
            train_seconds, train_cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
            ckpts = checkpoints_by_epoch(run_dir)
        train_log = _train_metrics_by_epoch(run_dir / "metrics.jsonl")
        out = []
        for epoch in missing:
            if epoch not in ckpts:
                raise RuntimeError(f"{run_dir}: no checkpoint for epoch {epoch} after training "
                                   f"(found epochs {sorted(ckpts)})")
            start, cpu_start = time.perf_counter(), time.process_time()
            policy = AutoModelForCausalLM.from_pretrained(ckpts[epoch]).eval()
            loaded = time.process_time()
            metrics = evaluate_policy(policy, self.ref, self.tokenizer, self.gold, self.baseline,
                                      settings=c.sampling(seed), num_samples=c.num_samples, loss=variant.loss,
                                      beta=beta, loss_options=loss_options, progress=False)
            evaluated = time.process_time()
            metrics.update(self.mechanism(policy, variant.loss, beta, seed, loss_options))
            # CPU seconds by part, beside evaluate_policy's own: loading the checkpoint, where the mass goes.
            metrics["seconds"] = {**metrics.get("seconds", {}), "loading checkpoints": loaded - cpu_start,
                                  "mass and clip on training pairs": time.process_time() - evaluated}
            step = json.loads((ckpts[epoch] / "trainer_state.json").read_text()).get("global_step")
            row = {"loss": variant.loss, "method": method, "options": variant.option_dict, "beta": beta,
                   "seed": seed, "epoch": epoch, "step": step, **metrics, **train_log.get(epoch, {}),
                   "train_seconds": train_seconds, "train_cpu_seconds": train_cpu_seconds,
                   "eval_seconds": time.perf_counter() - start}
            append_row(self.out / "results.jsonl", row)
            out.append(row)
        if not c.keep_checkpoints:
            for ckpt in run_dir.glob("checkpoint-*"):
                shutil.rmtree(ckpt, ignore_errors=True)
        return out


_WORKER: CellRunner | None = None


def _worker_init(config: dict, baseline) -> None:
    global _WORKER
    import torch

    torch.set_num_threads(1)
    _quiet_libraries()
    _WORKER = CellRunner(SweepConfig(**config), progress=False, baseline=baseline)


def _worker_run(loss: str, beta: float, seed: int, done: set[int]) -> list[dict]:
    assert _WORKER is not None
    return _WORKER.run(loss, beta, seed, done)


def r_max_for(loss: str, r_max):
    """The sweep's r_max applies to the losses whose preset clips the margin (chiPO); the others keep theirs."""
    from chipo.losses import LOSSES

    return r_max if "r_max" in LOSSES[loss].defaults else None
