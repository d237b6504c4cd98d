"""Validating the overoptimization monitor against gold, on the demo's runs (the embedded world).

The monitor (``chipo.monitor``) sees only what a user sees: the policy, pi_ref, a few held-out prompts and
held-out preference pairs. The lab also knows the gold reward, exactly (``Language.exact_partition``), so it can ask
which gold-free signal announces the fall of gold, how early, and what a stop rule chosen on some runs costs on
others. This module produces the table: every run of the demo's design (DPO and chiPO, beta 0.05 and 0.005, fresh
preference data per seed, the demo's learning rate, batch and r_max) is trained once, and at a fixed schedule of
optimizer steps -- dense early, where the demo's gold peaks (within the first epochs at lr 1e-3), sparse later --
the monitor's signals and the exact gold of the current policy are recorded side by side, one JSON line per
evaluation, in ``monitor_validation.jsonl`` (resumable per run). ``chipo.lab.monitor_analysis`` turns it into
correlations, lead times, the stop rule and its regret (``when_to_stop.md``). As an experiment
(``chipo.lab.experiments``, name ``monitor-validation``) that page becomes a section of a composed report.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from chipo.io import write_json, write_jsonl
from chipo.lab.experiments import Context, Experiment, as_section
from chipo.lab.protocol import DemoSettings, OfflineRuns
from chipo.monitor import HeldoutPairs, MonitorSettings, OveroptimizationMonitor


def default_schedule(steps_per_epoch: int, epochs: int) -> list[int]:
    """Evaluation steps: every ``steps_per_epoch // 6`` steps (from step 0) for two epochs, every half epoch to epoch
    8, every epoch after (the gold peak of the demo's runs lies in the first epochs; what follows only needs to show
    the fall)."""
    fine, half = max(1, steps_per_epoch // 6), max(1, steps_per_epoch // 2)
    steps = set(range(0, 2 * steps_per_epoch + 1, fine))
    steps |= set(range(2 * steps_per_epoch, 8 * steps_per_epoch + 1, half))
    steps |= set(range(8 * steps_per_epoch, epochs * steps_per_epoch + 1, steps_per_epoch))
    return sorted(s for s in steps if s <= epochs * steps_per_epoch)


@dataclass(frozen=True)
class ValidationSettings(OfflineRuns):
    """The demo's design (``OfflineRuns`` and the demo's losses and held-out pairs) and the monitor's sampling."""

    losses: tuple[str, ...] = DemoSettings.losses
    heldout_pairs_per_prompt: int = DemoSettings.heldout_pairs_per_prompt
    monitor: MonitorSettings = field(default_factory=lambda: MonitorSettings(num_samples=8, max_new_tokens=8))
    workers: int = DemoSettings.workers
    tune_seeds: int = 4  # seeds 0..tune_seeds-1 at tune_beta choose the stop rule; the others test it
    tune_beta: float = 0.05

    @staticmethod
    def quick() -> ValidationSettings:
        """Smoke-test size: 2 seeds of 2 epochs, the rule tuned on seed 0."""
        return ValidationSettings(seeds=2, epochs=2, tune_seeds=1,
                                  monitor=MonitorSettings(num_samples=4, max_new_tokens=8))


def prepare(out: Path, settings: ValidationSettings, world) -> dict:
    """Per-seed preference data on the world (the demo's data process and sampling seeds) and held-out pairs;
    what the runs need to know of the world."""
    from chipo.lab.generate import seed_datasets

    seed_datasets(world, out / "data", seeds=settings.seeds, pairs_per_prompt=settings.pairs_per_prompt,
                  heldout_pairs_per_prompt=settings.heldout_pairs_per_prompt, scale=settings.scale,
                  max_new_tokens=settings.max_new_tokens)
    gold = world.scorer()
    return {"world": str(world.root), "pi_ref": world.pi_ref, "eval_prompts": world.eval_prompts_path,
            "gold": world.gold_spec, "r_max": settings.scale * (gold.reward_range[1] - gold.reward_range[0])}


def token_pairs(rows: list[dict]) -> HeldoutPairs:
    """Preference rows with sampled token ids (``generate_preferences``) as the monitor's pairs, ties left out."""
    rows = [r for r in rows if r["chosen"] != r["rejected"]]
    return HeldoutPairs([r["prompt_token_ids"] for r in rows], [r["chosen_token_ids"] for r in rows],
                        [r["rejected_token_ids"] for r in rows])


class Probe:
    """At each scheduled step: the monitor's signals (held-out prompts and pairs), the training pairs' implicit
    accuracy (what the trainer logs), and the exact gold J and win rate against pi_ref (lab only)."""

    def __init__(self, ctx: dict, loss: str, beta: float, seed: int, loss_options: dict, schedule: list[int],
                 settings: ValidationSettings, sink: Path):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from chipo.lab.evaluate import build_baseline
        from chipo.lab.runs import read_results
        from chipo.lab.sweep import load_prompts
        from chipo.rewards import load_scorer

        self.tokenizer = AutoTokenizer.from_pretrained(ctx["pi_ref"])
        ref = AutoModelForCausalLM.from_pretrained(ctx["pi_ref"]).eval()
        self.gold = load_scorer(ctx["gold"])
        prompts, _ = load_prompts(ctx["eval_prompts"])
        self.prompts = prompts
        common = dict(loss=loss, beta=beta, loss_options=loss_options)
        heldout = token_pairs(read_results(Path(ctx["data"]) / "heldout.jsonl"))
        self.monitor = OveroptimizationMonitor(self.tokenizer, _prompt_ids(self.tokenizer, prompts), ref_model=ref,
                                               pairs=heldout, settings=settings.monitor, **common)
        self.train_pairs = token_pairs(read_results(Path(ctx["data"]) / f"train_seed{seed}.jsonl"))
        # Only the exact partition of the baseline is used (gold J and win rates); one pi_ref sample per prompt.
        from chipo.generation import SamplingSettings

        self.baseline = build_baseline(ref, self.tokenizer, prompts, self.gold, references=None,
                                       settings=SamplingSettings(max_new_tokens=settings.max_new_tokens),
                                       num_samples=1, exact=True, progress=False)
        self.key = {"loss": loss, "beta": beta, "seed": seed}
        self.schedule, self.sink = set(schedule), sink
        self.rows: list[dict] = []

    def __call__(self, model, step: int, epoch: float) -> None:
        from chipo.lab.evaluate import exact_metrics
        from chipo.lab.runs import append_row

        if step not in self.schedule or any(r["step"] == step for r in self.rows):
            return
        t0 = time.perf_counter()
        signals = self.monitor.measure(model)
        seconds = time.perf_counter() - t0
        train = self.monitor.pair_measure(model, self.train_pairs)
        was_training = model.training
        model.eval()
        exact = exact_metrics(self.gold.exact_partition(model, self.tokenizer, self.prompts)[0], self.baseline)
        model.train(was_training)
        row = {**self.key, "step": step, "epoch": epoch, **signals, "train_acc": train["implicit_acc"],
               "train_clip_rate": train["clip_rate"], "gold": exact["gold"], "win_rate": exact["win_rate_vs_ref"],
               "mass_malformed": exact["mass_malformed"], "kl_partition": exact["kl"], "monitor_seconds": seconds}
        self.rows.append(row)
        append_row(self.sink, row)


def _prompt_ids(tokenizer, prompts):
    from chipo.generation import encode_prompts

    return encode_prompts(tokenizer, prompts)[0]


def probe_callback(probe: Probe):
    from transformers import TrainerCallback

    class ProbeCallback(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kwargs):
            probe(model, 0, 0.0)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            probe(model, state.global_step, float(state.epoch or 0.0))

    return ProbeCallback()


def run_cell(ctx: dict, loss: str, beta: float, seed: int, settings: ValidationSettings) -> list[dict]:
    """Train one run of the demo's design with the probe; returns its rows (also appended to the sink)."""
    import contextlib
    import warnings

    import torch

    from chipo.lab.runs import _steps_per_epoch
    from chipo.lab.sweep import CellRunner, SweepConfig
    from chipo.train.run import run_training

    torch.set_num_threads(1)
    out = Path(ctx["out"])
    config = SweepConfig(ref_model=ctx["pi_ref"], train_prefs=str(Path(ctx["data"]) / "train_seed{seed}.jsonl"),
                         eval_prompts=ctx["eval_prompts"], out_dir=str(out / "sweep"), gold=ctx["gold"],
                         losses=[loss], betas=[beta], seeds=[seed], epochs=settings.epochs,
                         learning_rate=settings.learning_rate, batch_size=settings.batch_size, r_max=ctx["r_max"],
                         max_length=32, max_new_tokens=settings.max_new_tokens, exact=False)
    runner = CellRunner.__new__(CellRunner)  # only its train_config (no baseline sampling)
    runner.config, runner.out = config, out / "sweep"
    run_dir = out / "runs" / f"{loss}_beta{beta:g}_seed{seed}"
    train = runner.train_config(loss, beta, seed, run_dir, resume=False)
    train.save_strategy, train.logging_steps = "no", 1
    steps = _steps_per_epoch(config.train_prefs.replace("{seed}", str(seed)), settings.batch_size)
    probe = Probe(ctx, loss, beta, seed, train.loss_options(), default_schedule(steps, settings.epochs), settings,
                  out / "monitor_validation.jsonl")
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "train.log").open("a") as log, contextlib.redirect_stdout(log), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_training(train, callbacks=[probe_callback(probe)])
    return probe.rows


def _worker(args):
    from chipo.lab.runs import _quiet_libraries

    _quiet_libraries()
    return run_cell(*args)


NOT_IN_KEY = ("seeds", "betas", "losses", "workers", "tune_seeds", "tune_beta")
"""Settings that may change between reruns in one directory: the grid may grow; the workers and the tuning split
(an analysis choice, applied when the report is written) do not change any run's rows."""


def run_key(settings: ValidationSettings | dict) -> dict:
    """What every run's rows depend on: a directory holds runs of one such key (``NOT_IN_KEY`` aside)."""
    d = settings if isinstance(settings, dict) else dataclasses.asdict(settings)
    return {k: v for k, v in d.items() if k not in NOT_IN_KEY}


def run_validation(out_dir: str | os.PathLike, settings: ValidationSettings | None = None, echo=print,
                   world=None, overwrite: bool = False) -> Path:
    """Every run of the design not yet complete in ``monitor_validation.jsonl``; returns that file's path.

    ``out_dir`` is opened under the experiment-directory protocol (``chipo.train.experiment_dir.open_experiment``:
    one validation at a time, ``run_key`` checked against ``experiment.json`` -- or the ``settings.json`` of a
    directory made before it -- and refused when it differs unless ``overwrite``)."""
    from chipo.lab.world import load_or_build_world
    from chipo.train.experiment_dir import open_experiment

    settings = settings or ValidationSettings()
    out = Path(out_dir)
    world = world or load_or_build_world(quiet=True)
    key = {"settings": run_key(settings), "world": str(world.root)}
    with open_experiment(out, key, overwrite=overwrite, what="monitor validation",
                         legacy_key=lambda d: _recorded_key(d, world)) as exp:
        sink = _run(out, settings, echo, world)
        exp.finish({"rows": sink.name})
    return sink


def _recorded_key(out: Path, world) -> dict | None:
    """The key of a directory made before the protocol marker, from its ``settings.json``."""
    path = out / "settings.json"
    if not path.is_file():
        return None
    saved = json.loads(path.read_text())
    return {"settings": run_key(saved["settings"]), "world": saved.get("context", {}).get("world", str(world.root))}


def _run(out: Path, settings: ValidationSettings, echo, world) -> Path:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    from chipo.lab.runs import read_results

    ctx = {**prepare(out, settings, world), "out": str(out), "data": str(out / "data")}
    write_json(out / "settings.json", {"settings": dataclasses.asdict(settings), "context": ctx})
    sink = out / "monitor_validation.jsonl"
    rows = read_results(sink)
    done = {(r["loss"], r["beta"], r["seed"]) for r in rows if r["epoch"] >= settings.epochs - 1e-6}
    cells = [(loss, beta, seed) for seed in range(settings.seeds) for beta in settings.betas
             for loss in settings.losses if (loss, beta, seed) not in done]
    # A run cut short is redone from the start: drop its rows.
    if cells:
        keep = [r for r in rows if (r["loss"], r["beta"], r["seed"]) not in set(cells)]
        write_jsonl(sink, keep)
    echo(f"monitor validation: {len(cells)} runs to do in {out}")
    start = time.perf_counter()
    ctxs = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max(1, settings.workers), mp_context=ctxs) as pool:
        futures = {pool.submit(_worker, (ctx, *cell, settings)): cell for cell in cells}
        for future in as_completed(futures):
            rows = future.result()
            echo(f"  {futures[future]}: {len(rows)} evaluations, {time.perf_counter() - start:.0f} s so far")
    return sink


def write_analysis(out: Path, tune_seeds: int, tune_beta: float) -> Path:
    """``when_to_stop.md`` (``chipo.lab.monitor_analysis.when_to_stop_section``) and ``per_run.csv`` from the rows in
    ``out/monitor_validation.jsonl``; returns the markdown's path."""
    import pandas as pd

    from chipo.io import atomic_write_text
    from chipo.lab.monitor_analysis import analyse, when_to_stop_section
    from chipo.lab.runs import read_results

    table = pd.DataFrame(read_results(out / "monitor_validation.jsonl"))
    seeds = tuple(range(tune_seeds))
    atomic_write_text(out / "when_to_stop.md", when_to_stop_section(table, seeds, tune_beta))
    analyse(table, seeds, tune_beta)["per_run"].to_csv(out / "per_run.csv", index=False)
    return out / "when_to_stop.md"


def main(argv: list[str] | None = None) -> None:
    """``python -m chipo.lab.monitor_validation OUT_DIR [SEEDS]``: run (or finish) the validation, then write
    ``when_to_stop.md`` and ``per_run.csv`` beside it (``write_analysis``)."""
    import argparse
    import resource

    from chipo.lab.runs import _quiet_libraries

    parser = argparse.ArgumentParser(prog="python -m chipo.lab.monitor_validation")
    parser.add_argument("out_dir")
    parser.add_argument("--seeds", type=int, default=ValidationSettings.seeds)
    parser.add_argument("--epochs", type=int, default=ValidationSettings.epochs)
    parser.add_argument("--tune-seeds", type=int, default=ValidationSettings.tune_seeds,
                        help="seeds 0..N-1 at --tune-beta tune the rule")
    parser.add_argument("--tune-beta", type=float, default=ValidationSettings.tune_beta)
    a = parser.parse_args(argv)
    _quiet_libraries()
    start = time.perf_counter()
    run_validation(a.out_dir, ValidationSettings(seeds=a.seeds, epochs=a.epochs, tune_seeds=a.tune_seeds,
                                                 tune_beta=a.tune_beta))
    path = write_analysis(Path(a.out_dir), a.tune_seeds, a.tune_beta)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(f"done in {time.perf_counter() - start:.0f} s wall, {usage.ru_utime + usage.ru_stime:.0f} s CPU in "
          f"workers, load average {os.getloadavg()[0]:.1f}; {path}")


# ------------------------------------------------------------------------------------------------ the experiment


def run_experiment(context: Context, settings: ValidationSettings, out_dir: Path) -> None:
    run_validation(out_dir, settings, echo=context.echo, world=context.world(), overwrite=context.overwrite)


def render(out_dir: Path, context: Context) -> str:
    """The "When to stop" section from the recorded rows, with the tuning split the run was made with."""
    settings = json.loads((out_dir / "settings.json").read_text())["settings"]
    return as_section(write_analysis(out_dir, settings["tune_seeds"], settings["tune_beta"]), context.report_dir)


EXPERIMENT = Experiment(
    name="monitor-validation", title="the overoptimization monitor's signals against the exact gold reward",
    settings=ValidationSettings, run=run_experiment, render=render,
    owns_directory=True)  # run_validation applies the directory protocol: python -m ... gets it too


if __name__ == "__main__":
    main()
