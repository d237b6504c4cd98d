"""The offline experiment of ``chipo demo``: DPO and chiPO on preference data from pi_ref, over betas, epochs, seeds.

Pipeline: world (built and cached on first use: SFT of pi_ref) -> preference data by the process of Huang et al.
2024 (arXiv 2407.13399, section 2: fresh draws from pi_ref for every seed, Bradley-Terry labels from the gold
reward) -> sweep DPO and chiPO (``ablations``: each also with RPO's SFT term and with a reward bound) over two
betas, epochs and seeds -> evaluation of every epoch checkpoint on held-out prompts -> report.md with plots, the
paper's Table 1 layout and its claims tested (``chipo.lab.report_paper``).

The protocol is fixed before looking at any result (its sizes and why in ``chipo.lab.protocol.DemoSettings``) and
the report states it; the claims it tests are written to ``plan.json`` before training. Ablations: the remedies of
``chipo.losses.preference_loss`` at values fixed here, not tuned: ``sft_weight`` 1 (RPO, Liu et al. 2024, arXiv
2405.16436, weight 1 as in TRL's examples) and ``reward_bound`` r_max / 2 (the BT reward s r* spans an interval of
width r_max, so relative to its middle it lies within +- r_max / 2).

As an experiment (``chipo.lab.experiments``): ``run`` writes ``data/`` and ``plan.json`` beside its directory (the
preference data are shared: the RLHF experiment trains its reward model on them) and the sweep's
``results.jsonl`` and ``meta.json`` in it; ``render`` writes the report directory from those files. Its static
prose (the summary, why the losses can differ and the world's limits) is in ``templates/offline_*.md``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

from chipo.io import write_json
from chipo.lab.experiments import Context, Experiment, load_average, record, template, timing_text
from chipo.lab.protocol import DemoSettings


def data_dir(context: Context) -> Path:
    """The demo's per-seed preference data (``train_seed{s}.jsonl``, ``heldout.jsonl``), beside the sweep."""
    return Path(context.out) / "data"


def machine_info() -> dict:
    import datasets
    import numpy
    import torch
    import transformers

    import chipo

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"machine": f"{platform.system()} {platform.release()}, {cpu}, {os.cpu_count()} CPU cores",
            "python": sys.version.split()[0],
            "versions": f"chipo {getattr(chipo, '__version__', '?')}, torch {torch.__version__}, transformers "
                        f"{transformers.__version__}, datasets {datasets.__version__}, numpy {numpy.__version__}",
            "torch threads per process": torch.get_num_threads(),
            "load average (1, 5, 15 min) when the report was written": load_average()}


# ------------------------------------------------------------------------------------------------------ the run


def run(context: Context, settings: DemoSettings, out_dir: Path) -> None:
    """World, preference data, claims fixed before training, the sweep; ``meta.json`` for the report."""
    echo = context.echo
    echo("[1/4] world: synthetic language, pi_ref (SFT, cached after the first run), gold reward")
    t0 = time.perf_counter()
    world = context.world()
    world_seconds = time.perf_counter() - t0
    built_now = world_seconds > 5.0
    echo(f"      {world.root} ({'built in' if built_now else 'loaded in'} {world_seconds:.1f} s)")

    echo("[2/4] preference data: two samples of pi_ref per pair, Bradley-Terry labels from the gold reward")
    t0 = time.perf_counter()
    data_stats, prompts = preference_data(context, settings)
    data_seconds = time.perf_counter() - t0

    config = sweep_config(context, settings, out_dir)
    plan = write_plan(context, config, settings)
    echo(f"[3/4] sweep: {len(config.methods) * len(config.betas) * settings.seeds} training runs "
         f"({', '.join(m.name for m in config.methods)} x beta {list(settings.betas)} x "
         f"{settings.seeds} seed(s)), {settings.epochs} epochs each, evaluated at epochs {config.eval_epochs}")
    from chipo.lab.sweep import Sweep, read_results

    t0 = time.perf_counter()
    workers = max(1, min(context.workers, os.cpu_count() or 1))
    Sweep(config, progress=context.progress, workers=workers).run()
    sweep_seconds = time.perf_counter() - t0

    timing = {"world": f"{'built' if built_now else 'loaded from cache'} in {world_seconds:.1f} s"
                       + (f" (first build took {world.info()['build_seconds']:.0f} s)" if not built_now else ""),
              "preference data": f"{data_seconds:.1f} s",
              "sweep (training + evaluation)": f"{sweep_seconds:.0f} s with {workers} worker process(es)",
              "sweep, by part (CPU seconds summed over runs and workers)":
                  sweep_split(read_results(out_dir / "results.jsonl"))}
    write_json(out_dir / "meta.json", {
        "title": "chipo demo: DPO vs chiPO on the embedded world" + (" with remedies" if settings.ablations else "")
                 + (" (quick)" if settings.epochs < 8 else ""),
        "summary": template("offline_summary"), "setup": setup(world, settings, prompts, config.r_max),
        "timing": timing, "sweep_config": asdict(config), "data": data_stats, "plan": plan})


def preference_data(context: Context, settings: DemoSettings) -> tuple[dict, tuple[list[str], list[str]]]:
    """Per-seed training pairs and the held-out pairs (``chipo.lab.generate.seed_datasets``); their statistics
    (also in ``data/stats.json``) and the (training, held-out) prompts."""
    from chipo.lab.generate import seed_datasets

    stats, train_prompts, eval_prompts = seed_datasets(
        context.world(), data_dir(context), seeds=settings.seeds, pairs_per_prompt=settings.pairs_per_prompt,
        heldout_pairs_per_prompt=settings.heldout_pairs_per_prompt, scale=settings.scale,
        max_new_tokens=settings.max_new_tokens, reuse=False)
    write_json(data_dir(context) / "stats.json", stats)
    first = stats["train_seed0"]
    context.echo(f"      {first['pairs']} pairs per seed on {len(train_prompts)} prompts; labels agree with the gold "
                 f"ranking on {100 * first['label_agrees_with_gold']:.0f}% of pairs; {stats['heldout']['pairs']} "
                 "held-out pairs")
    return stats, (train_prompts, eval_prompts)


def sweep_config(context: Context, settings: DemoSettings, out_dir: Path):
    """The sweep of the demo's design; r_max = BT scale x the gold reward's range (the paper's R_max)."""
    from chipo.lab.sweep import SweepConfig

    world = context.world()
    low, high = world.scorer().reward_range
    r_max = settings.scale * (high - low)
    data = data_dir(context)
    return SweepConfig(
        ref_model=world.pi_ref, train_prefs=str(data / "train_seed{seed}.jsonl"),
        eval_prompts=world.eval_prompts_path, heldout_prefs=str(data / "heldout.jsonl"), out_dir=str(out_dir),
        gold=world.gold_spec, losses=list(settings.losses),
        variants=ablation_variants(settings.losses, r_max) if settings.ablations else None,
        betas=list(settings.betas), seeds=list(range(settings.seeds)), epochs=settings.epochs,
        eval_epochs=list(settings.eval_epochs) if settings.eval_epochs else None, learning_rate=settings.learning_rate,
        batch_size=settings.batch_size, r_max=r_max, max_length=32, num_samples=settings.num_samples,
        max_new_tokens=settings.max_new_tokens, max_eval_prompts=settings.max_eval_prompts,
        overwrite=context.overwrite)  # clears sweep/ (chipo.lab.sweep.Sweep applies the directory protocol)


def write_plan(context: Context, config, settings: DemoSettings) -> list[str]:
    """The claims, from the design alone, to ``plan.json`` before training."""
    from chipo.lab.report import power_summary

    plan = claim_plan_for(config)
    write_json(Path(context.out) / "plan.json", {"claims": plan, "seeds": settings.seeds,
                                                 "eval_epochs": config.eval_epochs})
    context.echo(f"      {len(plan)} claims fixed before training (listed in the report); "
                 f"{power_summary(settings.seeds, len(plan))}")
    return plan


def claim_plan_for(config) -> list[str]:
    """The report's claims for a sweep config, from its design alone (written before training)."""
    import pandas as pd

    from chipo.lab.report import claim_plan
    from chipo.lab.report_paper import PAPER

    design = pd.DataFrame([{"method": m.name, "loss": m.loss, "beta": beta, "seed": 0, "epoch": epoch,
                            "options": ", ".join(f"{k}={v}" for k, v in sorted(m.option_dict.items()))}
                           for m in config.methods for beta in config.betas for epoch in config.eval_epochs])
    return claim_plan(design, PAPER)


def ablation_variants(losses, r_max: float) -> list[str]:
    """Each loss plain, with RPO's SFT term (weight 1) and with a reward bound of r_max / 2 (module docstring)."""
    out = [f"{loss}:{loss}" for loss in losses]
    out += [f"{loss}+sft:{loss}:sft_weight=1" for loss in losses]
    out += [f"{loss}+bound:{loss}:reward_bound={r_max / 2:g}" for loss in losses]
    return out


def sweep_split(rows: list[dict]) -> str:
    """Where the sweep's CPU time went: training, and the evaluation's parts (sampling, gold scoring, log-probs,
    exact metrics: ``chipo.lab.evaluate.evaluate_policy``; loading checkpoints, mass and clip on the training
    pairs: ``chipo.lab.sweep.CellRunner``), summed over the result rows. Rows written before CPU times were
    recorded count their wall seconds.

    Every evaluated epoch of a run is a row carrying that training call's time: each training call counts once
    (per run and value), the evaluation parts once per row."""
    def train_time(r):
        return r.get("train_cpu_seconds") or r.get("train_seconds")

    calls = {(r.get("method", r.get("loss")), r.get("beta"), r.get("seed"), train_time(r)) for r in rows
             if train_time(r)}
    parts = {"training": sum(call[-1] for call in calls)}
    for r in rows:
        for name, value in (r.get("seconds") or {}).items():
            parts[name] = parts.get(name, 0.0) + value
    return ", ".join(f"{name} {value:.0f} s" for name, value in parts.items())


# ------------------------------------------------------------------------------------------------------ the report


def setup(world, settings: DemoSettings, prompts: tuple[list[str], list[str]], r_max: float) -> dict:
    """The report's setup lines: the world, pi_ref, the gold reward, the data process, r_max."""
    info = world.info()
    spec = info["spec"]
    train_prompts, eval_prompts = prompts
    letters, length, branching = spec["n_letters"], spec["response_length"], spec["branching"]
    return {
        "world": f"{spec['n_topics']} topics x {spec['n_styles']} styles = {spec['n_topics'] * spec['n_styles']} "
                 f"prompts ({len(train_prompts)} for preference data, {len(eval_prompts)} held out); responses of "
                 f"{length} letters out of {letters}, {branching} allowed successors per letter "
                 f"({branching ** length} well-formed responses per prompt out of {letters ** length} letter strings)",
        "pi_ref": f"Llama, hidden {spec['hidden_size']}, {spec['num_layers']} layers, trained by SFT "
                  f"(transformers.Trainer) on {spec['sft_samples_per_prompt']} writer samples per prompt, "
                  f"{spec['sft_epochs']} epochs (final SFT loss {info['sft_loss']:.3f} nats/token; writers' entropy "
                  f"{info['writers_entropy_nats']:.2f} nats/response)",
        "gold reward": "r*(x, y) = sigmoid(random non-linear score of content) in (0, 1) for well-formed "
                       "responses, 0 for any text outside the language (defined once in chipo.lab.world, "
                       "independent of any algorithm)",
        "preference data": f"{settings.pairs_per_prompt} pairs per training prompt, fresh draws from pi_ref for every "
                           f"seed, Bradley-Terry labels with scale {settings.scale:g}: "
                           f"P[y1 > y2] = sigmoid({settings.scale:g} (r*(y1) - r*(y2)))",
        "r_max": f"{r_max:g} = BT scale x gold range (the paper's R_max bounds the reward that generates the "
                 "labels); DPO has no clip",
    }


def render(out_dir: Path, context: Context) -> str:
    """The report page (``report.md``, plots, ``results.json``/``csv`` in ``context.report_dir``) from the sweep's
    ``results.jsonl`` and ``meta.json``, with the time this experiment's run recorded; returns report.md's text."""
    from chipo.lab.report import write_report
    from chipo.lab.report_paper import PAPER

    meta = json.loads((out_dir / "meta.json").read_text())
    timing = timing_text(record(out_dir).get("timing", {}))
    meta["machine"] = machine_info()
    meta["timing"] = {**({"wall time (this run)": timing} if timing else {}), **meta.get("timing", {})}
    return write_report(out_dir, context.report_dir, meta=meta, analysis=template("offline_analysis"),
                        extra=PAPER).read_text()


def headline(out_dir: Path) -> str:
    """The paper's Table 1 layout for the terminal: gold win rate against pi_ref, chiPO vs DPO."""
    from chipo.lab import tables
    from chipo.lab.report_paper import table1
    from chipo.lab.sweep import read_results

    df = tables.results_table(read_results(out_dir / "results.jsonl"))
    if not {"dpo", "chipo"} <= set(tables.methods(df)):
        return ""
    return "Gold win rate against pi_ref, % (chiPO vs DPO), mean over seeds:\n" + table1(df, tables.headline(df))


EXPERIMENT = Experiment(
    name="offline", title="DPO and chiPO on preference data from pi_ref (Huang et al. 2024, arXiv 2407.13399)",
    settings=DemoSettings, run=run, render=render, directory="sweep", headline=headline,
    owns_directory=True)  # chipo.lab.sweep.Sweep applies the directory protocol to sweep/ itself
