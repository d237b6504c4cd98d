"""``chipo lab methods``: every method chipo ships, on one world and one label budget -- the table to choose from.

One experiment, the same for every method (fixed here, before any result; the report states it):

* the world, its gold reward and the preference process of the offline demo (``chipo.lab.offline``): per seed, fresh
  pairs of pi_ref samples on the training prompts with Bradley-Terry labels sigmoid(s (r*(y1) - r*(y2))), the
  demo's seeds, pairs per prompt (8 x 48 prompts = 384 labels) and scale (Huang et al. 2024, arXiv 2407.13399,
  section 2). A seed is its own preference-data draw, so seeds are the unit of every test;
* offline (``chipo.lab.sweep.CellRunner``): DPO and chiPO, each also with RPO's SFT term (``sft_weight`` 1; Liu et
  al. 2024, arXiv 2405.16436), the demo's optimizer and epochs, evaluated at the demo's epochs; two epochs are
  reported, both fixed in advance: the last, and the one with the best implicit-reward accuracy on held-out pairs
  (a choice a user can make without the gold reward; ties go to the earlier epoch). Never the best on gold;
* online (``chipo.lab.online``): online DPO / chiPO, XPO, chi-squared XPO and Nash-MD, each asking the same judge
  (the gold reward with the same Bradley-Terry noise) for the same number of labels;
* RLHF (``chipo.lab.rlhf``): a Bradley-Terry reward model trained on exactly the seed's offline pairs (the same
  labels DPO saw, no more), then RL (RLOO) with the ``kl`` and the ``chi2mix`` regularizer; best-of-n and
  chi-squared pessimism (Huang et al. 2025, arXiv 2503.21878) with that reward model, at one n fixed here;
* every trained policy is evaluated by one function (``chipo.lab.evaluate.evaluate_policy``) on the same held-out
  prompts and pi_ref baseline: exact gold reward, win rate against pi_ref, KL over the world's response partition
  (a lower bound) beside the Monte-Carlo KL of the policy's own samples, and the mass outside the language.
  Best-of-n and pessimism have no weights: their output law over a scored pool of pi_ref samples is evaluated
  (``chipo.lab.rlhf.inference_curves``; KL of that law against the pool, no partition KL).

Training compute is the CPU time (user + system, ``resource.getrusage``) of each run's training call, measured in
the process that ran it; methods built on a reward model also carry that model's training CPU time.

Results: ``results.jsonl`` (one row per method, beta and seed with every evaluated point), rendered by
``chipo.lab.methods_report`` into ``report.md``, ``table.csv`` and ``gold_vs_sqrt_kl.png``. Resumable: a rerun
skips finished cells (and an offline cell cut short resumes from its checkpoints). As an experiment
(``chipo.lab.experiments``, name ``methods``) its report becomes a section of a composed one.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from chipo.config import ConfigError, _field
from chipo.lab.experiments import Context, Experiment, as_section
from chipo.lab.methods_protocol import (
    FAMILIES,
    METHODS,
    MethodTableSettings,
)


def _current_rows(path: Path, settings: MethodTableSettings, redo: tuple[str, ...]) -> list[dict]:
    """The rows still valid: made with the current settings of their family and not named in ``redo``. Others are
    moved to ``results.superseded.jsonl`` (kept for the record, never reported)."""
    from chipo.io import write_jsonl
    from chipo.lab.runs import append_row, read_results

    rows = read_results(path)
    keep = [r for r in rows if r["method"] not in redo
            and r.get("settings") == json.loads(json.dumps(settings.family_settings(r["family"])))]
    if len(keep) < len(rows):
        for r in rows:
            if r not in keep:
                append_row(path.with_name("results.superseded.jsonl"), r)
        write_jsonl(path, keep)
    # An offline cell resumes from the sweep's own rows: a method run again must lose those too (kept aside).
    offline = [m for m in redo if FAMILIES[m] == "offline"]
    sweep_rows = read_results(path.parent / "offline" / "results.jsonl")
    stale = [r for r in sweep_rows if r.get("method") in offline]
    if stale:
        for r in stale:
            append_row(path.parent / "offline" / "results.superseded.jsonl", r)
        write_jsonl(path.parent / "offline" / "results.jsonl", [r for r in sweep_rows if r not in stale])
        for m in offline:
            for run_dir in (path.parent / "offline" / "runs").glob(f"{m}_beta*"):
                shutil.rmtree(run_dir, ignore_errors=True)
    return keep


def cell_key(row: dict) -> tuple:
    return row["method"], row.get("beta"), row["seed"]


# ------------------------------------------------------------------------------------------------------ the run


def run_method_table(world, out_dir, settings: MethodTableSettings | None = None, *, workers: int = 2,
                     progress: bool = True, echo=print, redo=(), overwrite: bool = False) -> Path:
    """Run every unfinished cell, then render the report; returns the path of ``report.md``.

    A cell is finished when ``results.jsonl`` has its row, made with the current settings of its family; ``redo``
    names methods to run again anyway (e.g. after a change to a trainer's code): their old rows move to
    ``results.superseded.jsonl``."""
    run_cells(world, Path(out_dir), settings or MethodTableSettings(), workers=workers, progress=progress, echo=echo,
              redo=tuple(redo), overwrite=overwrite)
    from chipo.lab.methods_report import write_report

    return write_report(out_dir)


def run_cells(world, out: Path, settings: MethodTableSettings, *, workers: int = 2, progress: bool = True,
              echo=print, redo: tuple[str, ...] = (), overwrite: bool = False) -> None:
    """Every unfinished cell into ``out/results.jsonl`` (``run_method_table``, without the report), under the
    directory protocol (``chipo.train.experiment_dir``): one table per directory at a time; the data, evaluation
    and offline settings and the world must match the directory's (a family's other settings rerun its rows:
    ``_current_rows``); ``overwrite`` clears it."""
    import torch

    from chipo.lab.runs import quiet_libraries
    from chipo.train.experiment_dir import key_recorded_in, open_experiment

    key = {"settings": settings.shared(), "world": str(world.root)}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: parallelism is across processes
    try:
        with quiet_libraries(), open_experiment(out, key, overwrite=overwrite, what="method table",
                                                legacy_key=key_recorded_in("table.json")) as exp:
            _run(world, out, settings, max(1, workers), progress, echo, redo)
            exp.finish({"cells": len(settings.cells())})
    finally:
        torch.set_num_threads(threads)


def _run(world, out: Path, settings: MethodTableSettings, workers: int, progress: bool, echo,
         redo: tuple[str, ...] = ()) -> None:
    from tqdm.auto import tqdm

    from chipo.io import write_json
    from chipo.lab.methods_cells import _preference_data, _reward_model, cpu_seconds, reference_point
    from chipo.lab.runs import append_row

    start, cpu_start, load_start = time.perf_counter(), cpu_seconds(), os.getloadavg()
    key = {"settings": settings.shared(), "world": str(world.root)}  # checked by run_cells' directory protocol
    meta_path = out / "table.json"
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    write_json(meta_path, {**meta, "key": key})
    echo("[1/3] preference data (the demo's process and seeds) and one reward model per seed")
    labels = _preference_data(world, out, settings)
    needs_rm = any(FAMILIES[m] in ("rlhf", "inference") for m in settings.methods)
    rm_cpu = {seed: _reward_model(world, out, settings, seed) for seed in range(settings.seeds)} if needs_rm else {}
    rows = _current_rows(out / "results.jsonl", settings, redo)
    done = {cell_key(r) for r in rows}
    todo = [c for c in settings.cells() if c not in done]
    echo(f"[2/3] {len(settings.cells())} runs ({len(settings.methods)} methods x beta {list(settings.betas)} x "
         f"{settings.seeds} seeds; {len(settings.cells()) - len(todo)} already done), {workers} process(es)")
    bar = tqdm(total=len(settings.cells()), initial=len(settings.cells()) - len(todo), desc="method table (runs)",
               unit="run", disable=not progress)
    args = (world, str(out), settings, labels, rm_cpu)
    for row in _execute(todo, args, workers):
        append_row(out / "results.jsonl", row)
        bar.update()
        last = row["points"][-1]
        (bar.write if progress else echo)(
            f"      {row['method']} beta {row['beta']} seed {row['seed']}: gold {last['gold']:.3f}, "
            f"KL (MC) {last['kl_mc']:.2f}, out of language {100 * last['mass_out_of_language']:.0f}% "
            f"(train {row['train_cpu_s']:.0f} CPU s)")
    bar.close()
    timing = meta.get("timing", [])
    if todo:  # a rerun that did nothing keeps the record of the run that did the work
        timing.append({"runs": len(todo), "workers": workers, "wall_s": time.perf_counter() - start,
                       "cpu_s_main": cpu_seconds() - cpu_start, "load_at_start": list(load_start),
                       "load_at_end": list(os.getloadavg())})
    echo("[3/3] report")
    write_json(meta_path, {"key": key, "labels": labels, "reward_model_cpu_s": rm_cpu, "timing": timing,
                           "settings": dataclasses.asdict(settings),
                           "pi_ref": meta.get("pi_ref") or reference_point(world, settings)})


def _execute(todo, args, workers: int):
    """Rows of the ``todo`` cells as they finish: in this process, or in ``workers`` spawned processes."""
    if workers == 1 or len(todo) <= 1:
        from chipo.lab.methods_cells import Cells

        runner = Cells(*args)
        for cell in todo:
            yield runner.run(*cell)
        return
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed

    saved = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # read by tqdm in the spawned workers only
    try:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_init,
                                 initargs=args) as pool:
            for future in as_completed([pool.submit(_worker_run, *cell) for cell in todo]):
                yield future.result()
    finally:
        if saved is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = saved


_WORKER = None


def _worker_init(*args) -> None:
    global _WORKER
    import torch

    from chipo.lab.runs import _quiet_libraries

    torch.set_num_threads(1)
    _quiet_libraries()
    from chipo.lab.methods_cells import Cells

    _WORKER = Cells(*args)


def _worker_run(method: str, beta: float | None, seed: int) -> dict:
    assert _WORKER is not None
    return _WORKER.run(method, beta, seed)


# ------------------------------------------------------------------------------------------------------ the command


@dataclass
class MethodTableConfig:
    """Every method chipo ships on the embedded world at one label budget: offline DPO / chiPO (+ RPO's SFT term),
    online DPO / chiPO, XPO, chi-squared XPO, Nash-MD, KL- and chi2mix-RLHF, best-of-n and chi-squared pessimism;
    paired tests against DPO over seeds with Holm's correction; report.md, table.csv and a gold-vs-KL plot."""

    out: str = _field("chipo-methods", "Output directory (rerunning resumes: finished runs are skipped).")
    seeds: int = _field(8, "Seeds (each its own preference-data draw; the unit of the paired tests).")
    betas: list[float] | None = _field(None, "beta values (default 0.05, 0.005: the paper's Table 1).")
    methods: list[str] | None = _field(None, f"Methods (default all): {', '.join(METHODS)}.")
    quick: bool = _field(False, "Smoke-test size: one beta, a few steps per method.")
    workers: int = _field(2, "Parallel processes.")
    redo: list[str] | None = _field(None, "Methods to run again although finished (after a change to their code).")
    overwrite: bool = _field(False, "Clear the directory's previous table and start again.")
    world_cache: str | None = _field(None, "World cache directory (default $CHIPO_CACHE/world).")
    progress: bool = _field(True, "Show progress.")

    def __post_init__(self) -> None:
        if self.workers < 1:
            raise ConfigError(f"workers must be at least 1, got {self.workers}")
        unknown = [m for m in self.redo or () if m not in FAMILIES]
        if unknown:
            raise ConfigError(f"redo: unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
        self.settings()  # one-line errors for bad seeds / betas / methods before anything runs

    def settings(self) -> MethodTableSettings:
        base = MethodTableSettings.quick(self.seeds) if self.quick else MethodTableSettings(seeds=self.seeds)
        changes = {}
        if self.betas:
            changes["betas"] = tuple(self.betas)
        if self.methods:
            changes["methods"] = tuple(self.methods)
        return dataclasses.replace(base, **changes) if changes else base


def run_methods_command(config: MethodTableConfig) -> Path:
    from chipo.lab.world import load_or_build_world

    world = load_or_build_world(cache_dir=config.world_cache, quiet=True)
    report = run_method_table(world, config.out, config.settings(), workers=config.workers,
                              progress=config.progress, redo=tuple(config.redo or ()), overwrite=config.overwrite)
    print(f"report: {report}")
    return report


# ------------------------------------------------------------------------------------------------ the experiment


def run_experiment(context: Context, settings: MethodTableSettings, out_dir: Path) -> None:
    run_cells(context.world(), out_dir, settings, workers=context.workers, progress=context.progress,
              echo=context.echo, overwrite=context.overwrite)


def render(out_dir: Path, context: Context) -> str:
    """The method table's own report (``report.md``, ``table.csv``, the plot in ``out_dir``) as a section."""
    from chipo.lab.methods_report import write_report

    return as_section(write_report(out_dir), context.report_dir)


EXPERIMENT = Experiment(
    name="methods", title="every method at one label budget, each tested against offline DPO over seeds",
    settings=MethodTableSettings, run=run_experiment, render=render,
    owns_directory=True)  # run_cells applies the directory protocol: chipo lab methods runs it without chipo demo
