"""``chipo demo``: the whole overoptimization experiment on the embedded world, on a laptop.

Pipeline: world (built and cached on first use: SFT of pi_ref) -> preference data by the seed's process (fresh
draws from pi_ref for every seed, Bradley-Terry labels from the gold reward) -> sweep DPO and chiPO over two betas,
epochs and seeds -> evaluation of every epoch checkpoint on held-out prompts -> report.md with plots and tables.

The protocol is fixed here, before looking at any result, and the report states it:

* betas 0.05 and 0.005, the two values of the paper's Table 1 (arXiv 2407.13399);
* Bradley-Terry scale 5 on a gold reward in [0, 1] (as in the field notes' exploration), so the BT reward
  s * r* lies in [0, 5] and chiPO's reward bound is r_max = 5 * (1 - 0) = 5: the paper's R_max is the range of the
  reward that generates the labels. It equals chipo's default, so the clip is the paper's, not tuned;
* AdamW, constant learning rate 1e-3 (a standard rate for a model this small), batch 32, up to 32 epochs over
  ~380 pairs (the paper trains 1-4 epochs of 92k pairs; what matters is steps per distinct pair);
* evaluation on 16 held-out prompts, 64 samples each, ancestral sampling, plus exact metrics over the enumerable
  response space.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from chipo.data.prompts import load_prompts
from chipo.generation import SamplingSettings
from chipo.io import write_json, write_jsonl
from chipo.lab.generate import generate_preferences


@dataclass(frozen=True)
class DemoSettings:
    """Sizes of the demo; ``quick()`` is the CI smoke-test version."""

    seeds: int = 3
    betas: tuple[float, ...] = (0.05, 0.005)
    losses: tuple[str, ...] = ("dpo", "chipo")
    epochs: int = 32
    pairs_per_prompt: int = 8
    heldout_pairs_per_prompt: int = 8
    scale: float = 5.0
    learning_rate: float = 1e-3
    batch_size: int = 32
    num_samples: int = 64
    max_eval_prompts: int | None = None
    max_new_tokens: int = 8
    workers: int = 2

    @staticmethod
    def quick(seeds: int = 1) -> DemoSettings:
        return DemoSettings(seeds=seeds, epochs=4, num_samples=16, max_eval_prompts=8)


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
            "torch threads per process": torch.get_num_threads()}


def run_demo(out_dir: str | os.PathLike, settings: DemoSettings | None = None, progress: bool = True,
             world_cache: str | None = None, echo=print, full: bool = False, rlhf_settings=None) -> Path:
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
            return _run_demo(out_dir, settings or DemoSettings(), progress, world_cache, echo, full, rlhf_settings)
    finally:
        torch.set_num_threads(threads)


def _run_demo(out_dir, settings: DemoSettings, progress: bool, world_cache: str | None, echo, full: bool = False,
              rlhf_settings=None) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chipo.lab.report import write_report
    from chipo.lab.sweep import Sweep, SweepConfig, read_results
    from chipo.lab.world import load_or_build_world

    start = time.perf_counter()
    cpu_start = time.process_time()
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
    data_stats = {}
    for seed in range(settings.seeds):
        path = out / "data" / f"train_seed{seed}.jsonl"
        rows, stats = generate_preferences(ref, tokenizer, train_prompts, gold,
                                           pairs_per_prompt=settings.pairs_per_prompt, scale=settings.scale,
                                           settings=SamplingSettings(max_new_tokens=settings.max_new_tokens,
                                                                     seed=1000 + seed), progress=False)
        write_jsonl(path, rows)
        data_stats[f"train_seed{seed}"] = asdict(stats)
    rows, stats = generate_preferences(ref, tokenizer, eval_prompts, gold,
                                       pairs_per_prompt=settings.heldout_pairs_per_prompt, scale=settings.scale,
                                       settings=SamplingSettings(max_new_tokens=settings.max_new_tokens, seed=999),
                                       progress=False)
    write_jsonl(out / "data" / "heldout.jsonl", rows)
    data_stats["heldout"] = asdict(stats)
    write_json(out / "data" / "stats.json", data_stats)
    first = data_stats["train_seed0"]
    echo(f"      {first['pairs']} pairs per seed on {len(train_prompts)} prompts; labels agree with the gold "
         f"ranking on {100 * first['label_agrees_with_gold']:.0f}% of pairs; {stats.pairs} held-out pairs")
    data_seconds = time.perf_counter() - t0

    reward_low, reward_high = gold.reward_range
    r_max = settings.scale * (reward_high - reward_low)
    config = SweepConfig(
        ref_model=world.pi_ref, train_prefs=str(out / "data" / "train_seed{seed}.jsonl"),
        eval_prompts=world.eval_prompts_path, heldout_prefs=str(out / "data" / "heldout.jsonl"),
        out_dir=str(out / "sweep"), gold=world.gold_spec, losses=list(settings.losses), betas=list(settings.betas),
        seeds=list(range(settings.seeds)), epochs=settings.epochs, learning_rate=settings.learning_rate,
        batch_size=settings.batch_size, r_max=r_max, max_length=32, num_samples=settings.num_samples,
        max_new_tokens=settings.max_new_tokens, max_eval_prompts=settings.max_eval_prompts,
    )
    n_runs = len(settings.losses) * len(settings.betas) * settings.seeds
    echo(f"[3/4] sweep: {n_runs} training runs ({', '.join(settings.losses)} x beta {list(settings.betas)} x "
         f"{settings.seeds} seed(s)), {settings.epochs} epochs each, evaluated at epochs {config.eval_epochs}")
    t0 = time.perf_counter()
    workers = max(1, min(settings.workers, os.cpu_count() or 1))
    Sweep(config, progress=progress, workers=workers).run()
    sweep_seconds = time.perf_counter() - t0

    echo("[4/4] report")
    results = read_results(out / "sweep" / "results.jsonl")
    wall = time.perf_counter() - start
    meta = {
        "title": "chipo demo: DPO vs chiPO on the embedded world" + (" (quick)" if settings.epochs < 8 else ""),
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
            "wall time (this run)": f"{wall:.0f} s ({wall / 60:.1f} min), CPU time of the main process "
                                    f"{time.process_time() - cpu_start:.0f} s",
            "world": f"{'built' if built_now else 'loaded from cache'} in {world_seconds:.1f} s"
                     + (f" (first build took {info['build_seconds']:.0f} s)" if not built_now else ""),
            "preference data": f"{data_seconds:.1f} s",
            "sweep (training + evaluation)": f"{sweep_seconds:.0f} s with {workers} worker process(es)",
        },
        "sweep_config": asdict(config),
        "data": data_stats,
    }
    write_json(out / "sweep" / "meta.json", meta)
    report = write_report(out / "sweep", out / "report", meta=meta, analysis=analysis(results))
    if full:
        from chipo.lab.report import write_rlhf_section
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
    wall = time.perf_counter() - start
    echo_summary(results, report, wall, echo)
    return report


SUMMARY = ("pi_ref is a tiny language model that speaks a synthetic language; a gold judge scores its answers and "
           "gives the lowest score to anything outside the language. DPO and chiPO are trained on preference pairs "
           "sampled from pi_ref and labelled by the judge (the seed's process), then their own samples are judged. "
           "Overoptimization shows as a falling win rate against pi_ref while the policy drifts away from it.")


def _mean(rows, loss, beta, epoch, key) -> float:
    values = []
    for r in rows:
        if r["loss"] == loss and r["beta"] == beta and r["epoch"] == epoch:
            block = r.get("exact") or {}
            v = block.get(key[6:]) if key.startswith("exact.") else r.get(key)
            if v is not None:
                values.append(float(v))
    return sum(values) / len(values) if values else math.nan


def analysis(rows: list[dict]) -> str:
    """A reading of the run's numbers: where the mass goes, the proxy vs the gold view, why the losses differ.

    Every number is taken from ``rows``; sentences that make a claim are chosen by the numbers, not assumed.
    """
    betas = sorted({r["beta"] for r in rows if r.get("beta") is not None})
    epochs = sorted({r["epoch"] for r in rows if r["epoch"] > 0})
    ref = next((r for r in rows if r["loss"] == "pi_ref"), None)
    losses = {r["loss"] for r in rows}
    if not betas or not epochs or ref is None or not ref.get("exact") or not {"dpo", "chipo"} <= losses:
        return ""
    small, first, last = betas[0], epochs[0], epochs[-1]
    name = {"dpo": "DPO", "chipo": "chiPO"}
    bad_ref = ref["exact"]["mass_malformed"]
    parts = []
    for loss in ("dpo", "chipo"):
        m = {key: _mean(rows, loss, small, last, key) for key in
             ("exact.mass_malformed", "length_mean", "exact.win_rate_vs_ref", "implicit_acc", "train_acc")}
        parts.append(f"{name[loss]} at beta {small:g}, epoch {last}: {100 * m['exact.mass_malformed']:.1f}% of its "
                     f"mass on malformed text (pi_ref: {100 * bad_ref:.1f}%), mean length {m['length_mean']:.1f} "
                     f"tokens, exact win rate {100 * m['exact.win_rate_vs_ref']:.1f}%.")
    text = " ".join(parts)

    # Proxy view vs gold view, over all epochs at the small beta.
    for loss in ("dpo", "chipo"):
        held = [_mean(rows, loss, small, e, "implicit_acc") for e in epochs]
        train = [_mean(rows, loss, small, e, "train_acc") for e in epochs]
        win = [_mean(rows, loss, small, e, "exact.win_rate_vs_ref") for e in epochs]
        text += (f" {name[loss]}'s implicit-reward accuracy on its training pairs goes from {100 * train[0]:.0f}% "
                 f"(epoch {first}) to {100 * train[-1]:.0f}% (epoch {last}), on held-out pairs it stays within "
                 f"{100 * min(held):.0f}-{100 * max(held):.0f}%, while its gold win rate spans "
                 f"{100 * min(win):.0f}-{100 * max(win):.0f}%.")
    text += (" The proxy the optimiser sees keeps improving on the training pairs and says little about the gold "
             "outcome on new prompts: the finite preference data cannot tell these policies apart.")

    dpo_bad = _mean(rows, "dpo", small, last, "exact.mass_malformed")
    chipo_bad = _mean(rows, "chipo", small, last, "exact.mass_malformed")
    text += "\n\nWhy they differ (the seed's argument, checked against where the mass went). "
    text += ("Both losses see the same pairs and fit the same labels; they differ in how far from pi_ref they must "
             "move to express a reward margin. DPO's implicit reward is beta log(pi/pi_ref): at small beta a margin "
             "of a few nats needs log-ratio gaps of hundreds, so the logistic loss keeps pushing long after the data "
             "are fitted. chiPO's link z + log z grows linearly in the ratio z, so a ratio of about margin/beta "
             "already expresses the margin and the loss saturates with a bounded shift (the optimum of its "
             "regulariser has pi/pi_ref <= 1 + R_max/beta). The push-down side is the same log z for both losses. ")
    if dpo_bad > 2 * bad_ref:
        text += (f"In this run the mass DPO takes from the responses in the data goes to text pi_ref does not write "
                 f"({100 * dpo_bad:.0f}% malformed at epoch {last}), which the judge scores 0")
        text += (f"; chiPO moves less of it there ({100 * chipo_bad:.0f}%)." if chipo_bad < dpo_bad
                 else f"; chiPO moves as much or more ({100 * chipo_bad:.0f}%).")
    else:
        text += "In this run DPO did not move much mass to malformed text; its losses come from within the language."
    chipo_wins = [_mean(rows, "chipo", small, e, "exact.win_rate_vs_ref") for e in epochs]
    if chipo_wins[-1] < max(chipo_wins) - 0.05:
        text += (f" chiPO is not immune: its win rate at beta {small:g} falls from {100 * max(chipo_wins):.0f}% to "
                 f"{100 * chipo_wins[-1]:.0f}% by epoch {last} as its malformed mass grows -- later and less than "
                 "DPO's, consistent with a stronger but not absolute regulariser (its push-down side is "
                 "unregularised, and the margin clip at 2 r_max only binds at log-ratio gaps of 2 r_max / beta).")
    text += ("\n\nLimits of this world: a constant learning rate of 1e-3 on a 0.1M-parameter model moves far in one "
             "epoch (see the KL at epoch 1), so 'epochs' here compress the paper's time scale; evaluation uses 16 "
             "held-out prompts and seeds differ in their preference data, so early epochs have large standard "
             "errors; the chi-squared columns are lower bounds (partition) or heavy-tailed estimates (Monte Carlo), "
             "so compare them in order of magnitude only.")
    return text


def echo_summary(rows: list[dict], report: Path, wall: float, echo=print) -> None:
    from chipo.lab.report import aggregate, primary, table1

    keys = primary(rows)
    agg = aggregate(rows, [keys["win"], "kl_k3", keys["chi2"]])
    echo("")
    echo("Gold win rate against pi_ref, % (chiPO vs DPO), mean over seeds:")
    echo(table1(agg, keys))
    betas = sorted({k[1] for k in agg})
    last = max(k[2] for k in agg)
    for beta in betas:
        echo(f"beta {beta:g}, epoch {last}: KL chiPO {agg[('chipo', beta, last)]['kl_k3'][0]:.3g} vs DPO "
             f"{agg[('dpo', beta, last)]['kl_k3'][0]:.3g}; chi2 chiPO {agg[('chipo', beta, last)][keys['chi2']][0]:.3g}"
             f" vs DPO {agg[('dpo', beta, last)][keys['chi2']][0]:.3g}")
    echo(f"\nDone in {wall:.0f} s. Report: {report}  (plots and results.json beside it)")
