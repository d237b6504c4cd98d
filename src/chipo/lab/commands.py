"""What the lab commands run, one function per command, each taking its config (``chipo.lab.configs``)."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

from chipo.lab.configs import DemoConfig, EvaluateConfig, GeneratePrefsConfig, ReportConfig
from chipo.lab.sweep import SweepConfig


def _load_lm(name: str):
    from chipo.models import load_causal_lm, load_tokenizer

    return load_causal_lm(name, eval_mode=True), load_tokenizer(name)


def run_demo_command(config: DemoConfig) -> Path:
    """Each named experiment at its protocol's sizes (``--quick``: its ``quick()`` sizes); the keys that size the
    offline sweep (seeds, betas, epochs, ablations) applied to it."""
    from chipo.lab import experiments
    from chipo.lab.demo import run_demo

    names = experiments.with_needs(config.experiment_names())
    settings = {name: experiments.get(name).settings_for(config.quick) for name in names}
    if "offline" in settings:
        settings["offline"] = dataclasses.replace(settings["offline"], **config.offline_changes())
    return run_demo(config.out, settings, progress=config.progress, world_cache=config.world_cache,
                    workers=config.workers, overwrite=config.overwrite)


def generate_prefs(config: GeneratePrefsConfig) -> Path:
    from chipo.io import write_json, write_jsonl
    from chipo.lab.generate import generate_preferences
    from chipo.lab.sweep import load_prompts
    from chipo.rewards import load_scorer

    prompts, _ = load_prompts(config.prompts, config.split, config.max_prompts)
    gold = load_scorer(config.gold, template=config.gold_template)
    model, tokenizer = _load_lm(config.policy)
    rows, stats = generate_preferences(model, tokenizer, prompts, gold, pairs_per_prompt=config.pairs_per_prompt,
                                       scale=config.scale, settings=config.sampling())
    write_jsonl(config.out, rows)
    write_json(config.out + ".meta.json", {**stats.__dict__, "policy": config.policy, "prompts": config.prompts})
    print(f"wrote {stats.pairs} pairs to {config.out} (dropped {stats.dropped_empty} with an empty response; "
          f"labels agree with the gold ranking on {100 * stats.label_agrees_with_gold:.1f}%)")
    return Path(config.out)


def evaluate(config: EvaluateConfig) -> Path | None:
    from chipo.io import write_json
    from chipo.lab.evaluate import build_baseline, evaluate_policy
    from chipo.lab.sweep import load_pairs, load_prompts
    from chipo.rewards import load_scorer

    prompts, references = load_prompts(config.prompts, config.split, config.max_prompts)
    heldout = load_pairs(config.heldout_prefs, config.split) if config.heldout_prefs else None
    gold = load_scorer(config.gold, template=config.gold_template)
    ref, tokenizer = _load_lm(config.ref)
    policy, _ = _load_lm(config.policy)
    settings = config.sampling()
    baseline = build_baseline(ref, tokenizer, prompts, gold, references=references, settings=settings,
                              num_samples=config.num_samples, heldout_pairs=heldout, exact=config.exact)
    metrics = evaluate_policy(policy, ref, tokenizer, gold, baseline, settings=settings,
                              num_samples=config.num_samples, loss=config.loss if config.beta else None,
                              beta=config.beta)
    metrics.update({"policy": config.policy, "ref": config.ref, "prompts": config.prompts, "gold": config.gold})
    if config.out:
        write_json(config.out, metrics)
        print(f"wrote {config.out}")
        return Path(config.out)
    print(json.dumps({k: v for k, v in metrics.items() if k != "examples"}, indent=2, default=float))
    return None


def sweep(config: SweepConfig) -> Path:
    from chipo.lab.report import write_report
    from chipo.lab.sweep import Sweep

    start = time.perf_counter()
    rows = Sweep(config, workers=config.workers).run()
    print(f"{len(rows)} result rows in {config.out_dir}/results.jsonl ({time.perf_counter() - start:.0f} s)")
    if config.report:
        print(f"report: {write_report(config.out_dir)}")
    return Path(config.out_dir)


def report(config: ReportConfig) -> Path:
    from chipo.lab.report import write_report

    path = write_report(config.sweep_dir, config.out)
    print(f"report: {path}")
    return path
