"""``chipo demo``: the whole overoptimization experiment on the embedded world, on a laptop.

Pipeline: world (built and cached on first use: SFT of pi_ref) -> preference data by the process of Huang et al.
2024 (arXiv 2407.13399, section 2: fresh draws from pi_ref for every seed, Bradley-Terry labels from the gold
reward) -> sweep DPO and chiPO (``ablations``: each also with RPO's SFT term and with a reward bound) over two
betas, epochs and seeds -> evaluation of every epoch checkpoint on held-out prompts -> report.md with plots, the
paper's Table 1 layout and its claims tested (``chipo.lab.report_paper``).

The protocol is fixed before looking at any result (its sizes in ``chipo.lab.protocol.DemoSettings``), and the
report states it; the claims it tests are written to ``plan.json`` before training:

* betas 0.05 and 0.005, the two values of the paper's Table 1 (arXiv 2407.13399);
* Bradley-Terry scale 5 on a gold reward in [0, 1], so the BT reward
  s * r* lies in [0, 5] and chiPO's reward bound is r_max = 5 * (1 - 0) = 5: the paper's R_max is the range of the
  reward that generates the labels. It equals chipo's default, so the clip is the paper's, not tuned;
* AdamW, constant learning rate 1e-3 (a standard rate for a model this small), batch 32, 16 epochs over ~380
  pairs, evaluated at epochs 1, 2, 4 (the paper's Table 1), 8 and 16 (the paper trains 1-4 epochs of 92k pairs;
  what matters is steps per distinct pair). 16 epochs, not 32: the falls the demo tests are there by epoch 16
  (DPO's win rate at beta 0.005 was 8.6% at epoch 16 and 13.1% at 32 on one seed), and the half-price runs buy
  8 seeds, the unit of every test (``chipo.lab.protocol``);
* evaluation on 16 held-out prompts, 64 samples each, ancestral sampling, plus exact metrics over the enumerable
  response space;
* ablations: the remedies of ``chipo.losses.preference_loss`` at values fixed here, not tuned: ``sft_weight`` 1
  (RPO, Liu et al. 2024, arXiv 2405.16436, weight 1 as in TRL's examples) and ``reward_bound`` r_max / 2 (the BT
  reward s r* spans an interval of width r_max, so relative to its middle it lies within +- r_max / 2).
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from dataclasses import asdict
from pathlib import Path

from chipo.data.prompts import load_prompts
from chipo.io import write_json
from chipo.lab.generate import seed_datasets
from chipo.lab.protocol import DemoSettings  # noqa: F401 -- also this module's public name


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


def load_average() -> str:
    """The machine's load average: wall times on a shared machine mean little without it."""
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def run_demo(out_dir: str | os.PathLike, settings: DemoSettings | None = None, progress: bool = True,
             world_cache: str | None = None, echo=print, full: bool = False, rlhf_settings=None,
             online_settings=None) -> Path:
    """Run the demo into ``out_dir``; returns the report path. Resumable: a rerun reuses finished cells.

    ``full`` (``chipo demo --full``) adds standard RLHF (reward model + RL with kl and chi2mix), best-of-n and
    inference-time pessimism on the same world and preference process (``chipo.lab.rlhf``; ``rlhf_settings``
    default ``RLHFSettings()``) and a report section with their gold-vs-sqrt(KL) curves."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: threads cost more than they give; parallelism is across processes
    from chipo.lab.sweep import quiet_libraries

    try:
        with quiet_libraries():
            return _run_demo(out_dir, settings or DemoSettings(), progress, world_cache, echo, full, rlhf_settings,
                             online_settings)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out_dir, settings: DemoSettings, progress: bool, world_cache: str | None, echo, full: bool = False,
              rlhf_settings=None, online_settings=None) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chipo.lab.report import write_report
    from chipo.lab.report_paper import PAPER
    from chipo.lab.sweep import Sweep, SweepConfig, read_results
    from chipo.lab.world import load_or_build_world

    start = time.perf_counter()
    cpu_start = cpu_seconds()
    load_at_start = load_average()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    echo("[1/4] world: synthetic language, pi_ref (SFT, cached after the first run), gold reward")
    t0 = time.perf_counter()
    world = load_or_build_world(cache_dir=world_cache, quiet=True)
    world_seconds = time.perf_counter() - t0
    info = world.info()
    built_now = world_seconds > 5.0
    echo(f"      {world.root} ({'built in' if built_now else 'loaded in'} {world_seconds:.1f} s)")

    echo("[2/4] preference data: two samples of pi_ref per pair, Bradley-Terry labels from the gold reward")
    t0 = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(world.pi_ref)
    ref = AutoModelForCausalLM.from_pretrained(world.pi_ref).eval()
    gold = world.scorer()
    train_prompts = load_prompts(world.train_prompts_path, text_only=True).prompts
    eval_prompts = load_prompts(world.eval_prompts_path, text_only=True).prompts
    data_stats = seed_datasets(ref, tokenizer, gold, out / "data", train_prompts=train_prompts,
                               eval_prompts=eval_prompts, seeds=settings.seeds,
                               pairs_per_prompt=settings.pairs_per_prompt,
                               heldout_pairs_per_prompt=settings.heldout_pairs_per_prompt, scale=settings.scale,
                               max_new_tokens=settings.max_new_tokens, reuse=False)
    write_json(out / "data" / "stats.json", data_stats)
    first = data_stats["train_seed0"]
    echo(f"      {first['pairs']} pairs per seed on {len(train_prompts)} prompts; labels agree with the gold "
         f"ranking on {100 * first['label_agrees_with_gold']:.0f}% of pairs; {data_stats['heldout']['pairs']} "
         "held-out pairs")
    data_seconds = time.perf_counter() - t0

    reward_low, reward_high = gold.reward_range
    r_max = settings.scale * (reward_high - reward_low)
    variants = ablation_variants(settings.losses, r_max) if settings.ablations else None
    config = SweepConfig(
        ref_model=world.pi_ref, train_prefs=str(out / "data" / "train_seed{seed}.jsonl"),
        eval_prompts=world.eval_prompts_path, heldout_prefs=str(out / "data" / "heldout.jsonl"),
        out_dir=str(out / "sweep"), gold=world.gold_spec, losses=list(settings.losses), variants=variants,
        betas=list(settings.betas),
        seeds=list(range(settings.seeds)), epochs=settings.epochs,
        eval_epochs=list(settings.eval_epochs) if settings.eval_epochs else None, learning_rate=settings.learning_rate,
        batch_size=settings.batch_size, r_max=r_max, max_length=32, num_samples=settings.num_samples,
        max_new_tokens=settings.max_new_tokens, max_eval_prompts=settings.max_eval_prompts,
    )
    n_runs = len(config.methods) * len(settings.betas) * settings.seeds
    from chipo.lab.report import power_summary

    plan = claim_plan_for(config)
    write_json(out / "plan.json", {"claims": plan, "seeds": settings.seeds, "eval_epochs": config.eval_epochs})
    echo(f"      {len(plan)} claims fixed before training (listed in the report); "
         f"{power_summary(settings.seeds, len(plan))}")
    echo(f"[3/4] sweep: {n_runs} training runs ({', '.join(m.name for m in config.methods)} x beta "
         f"{list(settings.betas)} x "
         f"{settings.seeds} seed(s)), {settings.epochs} epochs each, evaluated at epochs {config.eval_epochs}")
    t0 = time.perf_counter()
    workers = max(1, min(settings.workers, os.cpu_count() or 1))
    Sweep(config, progress=progress, workers=workers).run()
    sweep_seconds = time.perf_counter() - t0

    echo("[4/4] report")
    results = read_results(out / "sweep" / "results.jsonl")
    wall = time.perf_counter() - start
    meta = {
        "title": "chipo demo: DPO vs chiPO on the embedded world" + (" with remedies" if settings.ablations else "")
                 + (" (quick)" if settings.epochs < 8 else ""),
        "summary": SUMMARY,
        "setup": {
            "world": f"{info['spec']['n_topics']} topics x {info['spec']['n_styles']} styles = "
                     f"{info['spec']['n_topics'] * info['spec']['n_styles']} prompts ({len(train_prompts)} for "
                     f"preference data, {len(eval_prompts)} held out); responses of "
                     f"{info['spec']['response_length']} letters out of {info['spec']['n_letters']}, "
                     f"{info['spec']['branching']} allowed successors per letter "
                     f"({info['spec']['branching'] ** info['spec']['response_length']} well-formed responses per "
                     f"prompt out of {info['spec']['n_letters'] ** info['spec']['response_length']} letter strings)",
            "pi_ref": f"Llama, hidden {info['spec']['hidden_size']}, {info['spec']['num_layers']} layers, trained by "
                      f"SFT (transformers.Trainer) on {info['spec']['sft_samples_per_prompt']} writer samples per "
                      f"prompt, {info['spec']['sft_epochs']} epochs (final SFT loss {info['sft_loss']:.3f} nats/token"
                      f"; writers' entropy {info['writers_entropy_nats']:.2f} nats/response)",
            "gold reward": "r*(x, y) = sigmoid(random non-linear score of content) in (0, 1) for well-formed "
                           "responses, 0 for any text outside the language (defined once in chipo.lab.world, "
                           "independent of any algorithm)",
            "preference data": f"{settings.pairs_per_prompt} pairs per training prompt, fresh draws from pi_ref for "
                               f"every seed, Bradley-Terry labels with scale {settings.scale:g}: "
                               f"P[y1 > y2] = sigmoid({settings.scale:g} (r*(y1) - r*(y2)))",
            "r_max": f"{r_max:g} = BT scale x gold range (the paper's R_max bounds the reward that generates the "
                     "labels); DPO has no clip",
        },
        "machine": machine_info(),
        "timing": {
            "wall time (this run)": f"{wall:.0f} s ({wall / 60:.1f} min), CPU time of all its processes "
                                    f"{cpu_seconds() - cpu_start:.0f} s (user + system, workers included, from the "
                                    "start of the demo's work: the command's start-up, a few seconds, is not "
                                    "counted); "
                                    "load average at the start "
                                    f"{load_at_start}",
            "world": f"{'built' if built_now else 'loaded from cache'} in {world_seconds:.1f} s"
                     + (f" (first build took {info['build_seconds']:.0f} s)" if not built_now else ""),
            "preference data": f"{data_seconds:.1f} s",
            "sweep (training + evaluation)": f"{sweep_seconds:.0f} s with {workers} worker process(es)",
            "sweep, by part (CPU seconds summed over runs and workers)": sweep_split(results),
        },
        "sweep_config": asdict(config),
        "data": data_stats,
    }
    meta["plan"] = json.loads((out / "plan.json").read_text())["claims"]
    write_json(out / "sweep" / "meta.json", meta)
    report = write_report(out / "sweep", out / "report", meta=meta, analysis=analysis(results), extra=PAPER)
    if full:
        from chipo.lab.report_rlhf import write_rlhf_section
        from chipo.lab.rlhf import RLHFSettings, run_rlhf

        echo("[+] --full: reward model, RL with kl and chi2mix, best-of-n and pessimism on the same world and data")
        t0 = time.perf_counter()
        path = run_rlhf(world, out / "rlhf", rlhf_settings or RLHFSettings(), echo=echo,
                        demo_pairs=str(out / "data" / "train_seed0.jsonl"),
                        heldout_pairs=str(out / "data" / "heldout.jsonl"))
        rlhf = json.loads(path.read_text())
        timing = rlhf.setdefault("timing", {})
        if time.perf_counter() - t0 > 30 or "whole chipo demo --full_s" not in timing:
            # Record the wall time of the run that did the work; a resumed run that skipped it keeps that number.
            timing["RLHF part_s"] = time.perf_counter() - t0
            timing["whole chipo demo --full_s"] = time.perf_counter() - start
            write_json(path, rlhf)
        write_rlhf_section(report.parent, rlhf, results)
        _online_section(world, out, report, results, online_settings, progress, echo)
    wall = time.perf_counter() - start
    echo_summary(results, report, wall, echo, cpu_seconds() - cpu_start)
    return report


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children (the sweep's worker processes): on
    a shared machine the demo's cost, where wall time depends on the load."""
    import resource

    return sum(u.ru_utime + u.ru_stime for u in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def claim_plan_for(config) -> list[str]:
    """The report's claims for a sweep config, from its design alone (written before training)."""
    import pandas as pd

    from chipo.lab.report import claim_plan
    from chipo.lab.report_paper import PAPER

    design = pd.DataFrame([{"method": m.name, "loss": m.loss, "beta": beta, "seed": 0, "epoch": epoch,
                            "options": ", ".join(f"{k}={v}" for k, v in sorted(m.option_dict.items()))}
                           for m in config.methods for beta in config.betas for epoch in config.eval_epochs])
    return claim_plan(design, PAPER)


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


def _online_section(world, out: Path, report: Path, results: list[dict], online_settings, progress: bool, echo) -> None:
    """``--full``: online DPO / chiPO, XPO and chi-squared XPO at the offline demo's label budget
    (``chipo.lab.online``), appended to the report with the offline runs beside them."""
    from chipo.io import atomic_write_text
    from chipo.lab.online import OnlineLabSettings, run_online_lab

    echo("[+] --full: online DPO / chiPO, XPO and chi-squared XPO at the offline demo's label budget")
    run_online_lab(world, out / "online", online_settings or OnlineLabSettings(), offline_results=results,
                   progress=progress, echo=echo)
    table = (out / "online" / "online_lab.md").read_text()
    body = table.split("\n", 1)[1] if table.startswith("#") else table  # its title becomes the section's
    section = ["", "## Online preference optimization (`chipo demo --full`)", "",
               "The same world, judge noise and label budget as the offline runs above, with the labels asked for "
               "pairs the policy samples as it trains (`chipo online`; details and plots in `../online/`).", "",
               body.replace("](online_", "](../online/online_"), ""]
    atomic_write_text(report, report.read_text().rstrip() + "\n" + "\n".join(section))


SUMMARY = ("pi_ref is a tiny language model that speaks a synthetic language; a gold judge scores its answers and "
           "gives the lowest score to anything outside the language. DPO and chiPO are trained on preference pairs "
           "sampled from pi_ref and labelled by the judge (the data process of Huang et al. 2024, arXiv "
           "2407.13399), then their own samples are judged. "
           "Overoptimization shows as a falling win rate against pi_ref while the policy drifts away from it.")


def ablation_variants(losses, r_max: float) -> list[str]:
    """Each loss plain, with RPO's SFT term (weight 1) and with a reward bound of r_max / 2 (module docstring)."""
    out = [f"{loss}:{loss}" for loss in losses]
    out += [f"{loss}+sft:{loss}:sft_weight=1" for loss in losses]
    out += [f"{loss}+bound:{loss}:reward_bound={r_max / 2:g}" for loss in losses]
    return out


def analysis(rows: list[dict]) -> str:
    """Why the losses can differ (the paper's argument, as an explanation, not a finding) and the world's limits.

    Findings are the report's verdicts; this text makes no comparative claim of its own."""
    if not rows:
        return ""
    return (
        "Why chiPO and DPO can differ (Huang et al. 2024, section 3; an explanation to check against the "
        "verdicts and the mass table above, not a finding). Both losses see the same pairs and fit the same "
        "labels; they differ in how far from pi_ref they must move to express a reward margin. DPO's implicit "
        "reward is beta log(pi/pi_ref): at small beta a margin of a few nats needs log-ratio gaps of hundreds, so "
        "the logistic loss keeps pushing long after the data are fitted. chiPO's link z + log z grows linearly in "
        "the ratio z, so a ratio of about margin/beta already expresses the margin (the optimum of its regulariser "
        "has pi/pi_ref <= 1 + R_max/beta), and its margin clip at 2 r_max stops the gradient of fitted pairs. The "
        "push-down side is log z for both, unbounded below: mass taken from rejected responses can go anywhere, "
        "including text outside the language, which the judge scores 0. The remedies act there: RPO's SFT term "
        "pulls mass back to the chosen responses; a reward bound stops the push-down once a rejected response's "
        "implicit reward reaches -bound (the clip % column shows how often that happened in this run)."
        "\n\nLimits of this world: a constant learning rate of 1e-3 on a 0.1M-parameter model moves far in one "
        "epoch, so 'epochs' here compress the paper's time scale; evaluation uses 16 held-out prompts and seeds "
        "differ in their preference data, so a few seeds detect only large differences (see the 'detectable' "
        "column); the chi-squared columns are lower bounds (partition) or heavy-tailed estimates (Monte Carlo), so "
        "compare them in order of magnitude only.")


def echo_summary(rows: list[dict], report: Path, wall: float, echo=print, cpu: float | None = None) -> None:
    from chipo.lab import tables
    from chipo.lab.report_paper import table1

    df = tables.results_table(rows)
    keys = tables.headline(df)
    echo("")
    if {"dpo", "chipo"} <= set(tables.methods(df)):
        echo("Gold win rate against pi_ref, % (chiPO vs DPO), mean over seeds:")
        echo(table1(df, keys))
    cpu_text = f", {cpu:.0f} CPU-s in all processes, load average now {load_average()}" if cpu is not None else ""
    echo(f"\nDone in {wall:.0f} s{cpu_text}. Report: {report}  (verdicts, plots and results.json beside it)")
