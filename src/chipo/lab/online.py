"""Online preference optimization on the embedded world, at the offline demo's label budget.

``run_online_lab`` trains online DPO, online chiPO, XPO and chi-squared XPO (``chipo.train.online.run_online``,
the code behind ``chipo online``) from pi_ref on the world's training prompts. The judge is the world's gold reward
with the demo's Bradley-Terry noise: a pair (y_a, y_b) is labelled a > b with probability
sigmoid(s (r*(x, y_a) - r*(x, y_b))), s = the demo's scale (5) -- the process of Huang et al. 2024 (arXiv
2407.13399, section 2) that made the offline data, except that the pair now comes from the current policy (online
DPO / chiPO) or from (pi, pi_ref) (XPO: Xie et al. 2024, arXiv 2405.21046, Alg. 1). Each run spends at most the
offline demo's label budget (pairs per prompt x training prompts: the number of pairs DPO and chiPO see per seed)
and its checkpoints at several label counts are evaluated exactly on the held-out prompts: gold reward J(pi),
win rate against pi_ref, KL and chi-squared over the world's partition of all responses
(``chipo.lab.evaluate.exact_metrics``).

``chipo online``'s scorer judge labels with sigmoid(r_a - r_b) and has no scale key, so the lab registers the
scorer ``world-scaled:SCALE:DIR`` (s times the gold reward of the world in DIR) and passes it as the judge.

Results: ``results.jsonl`` (one flat row per run and label count; pi_ref is the ``labels = 0`` row), plots
``online_gold_vs_sqrt_kl.png`` and ``online_gold_vs_labels.png`` (with offline DPO / chiPO when the demo's
results are given) and ``online_lab.md`` (settings and the table: ``chipo.lab.online_report``). A rerun skips
finished runs and resumes a run cut short from its last checkpoint. As an experiment (``chipo.lab.experiments``,
name ``online``) it needs the offline one, whose rows its report draws beside the online runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import time
import warnings
from pathlib import Path

import numpy as np

from chipo.config import ConfigError
from chipo.io import write_json
from chipo.lab.experiments import Context, Experiment
from chipo.lab.online_protocol import (  # noqa: F401 -- also this module's public names
    COLORS,
    LABELS,
    METHODS,
    METRICS,
    SPECS,
    VARIANT_BASES,
    VARIANTS,
    OnlineLabSettings,
    method_keys,
)
from chipo.lab.online_report import offline_rows, summarize, write_outputs  # noqa: F401
from chipo.lab.sweep import append_row, load_prompts, quiet_libraries, read_results
from chipo.lab.world import World, WorldScorer, world_scorer
from chipo.rewards import register_scorer

# ------------------------------------------------------------------------------------------------- the judge


class ScaledWorldScorer(WorldScorer):
    """s x the world's gold reward: as chipo online's judge, P(a > b) = sigmoid(s (r*(a) - r*(b)))."""

    def __init__(self, base: WorldScorer, scale: float):
        super().__init__(base.language)
        self.scale, self.name = float(scale), f"world-scaled:{scale:g}"
        self.reward_range = (0.0, self.scale)

    def score(self, prompts, responses) -> np.ndarray:
        return self.scale * super().score(prompts, responses)


def scaled_world_scorer(arg: str | None) -> ScaledWorldScorer:
    """``world-scaled:SCALE`` (the default world) or ``world-scaled:SCALE:DIR`` (the world saved in DIR)."""
    scale, _, directory = (arg or "").partition(":")
    try:
        value = float(scale)
    except ValueError:
        raise ConfigError(f"scorer 'world-scaled:{arg}': expected world-scaled:SCALE[:DIR], SCALE a number") from None
    return ScaledWorldScorer(world_scorer(directory or None), value)


register_scorer("world-scaled", scaled_world_scorer, "SCALE x the embedded world's gold reward (world-scaled:SCALE "
                                                     "or world-scaled:SCALE:DIR): Bradley-Terry labels at scale SCALE")


# ------------------------------------------------------------------------------------------------- the runs


def run_name(method: str, beta: float, seed: int) -> str:
    return f"{method}_beta{beta:g}_seed{seed}"


def labels_done(rows: list[dict], method: str, beta: float, seed: int) -> set[int]:
    return {r["labels"] for r in rows if (r.get("method"), r.get("beta"), r.get("seed")) == (method, beta, seed)}


def run_online_lab(world: World, out_dir, settings: OnlineLabSettings | None = None, *,
                   offline_results: list[dict] | None = None, progress: bool = True, echo=print,
                   overwrite: bool = False) -> list[dict]:
    """Train and evaluate every unfinished run, write plots and ``online_lab.md``; returns all result rows.

    ``offline_results``: rows of the offline demo's ``sweep/results.jsonl`` (loss dpo / chiPO, beta, seed, epoch,
    an ``exact`` block), drawn beside the online runs. Rows are flat: method, loss, exploration, beta, seed,
    labels, step, the exact metrics (gold, win_rate_vs_ref, kl, sqrt_kl, chi2, mass_malformed, total_mass) and the
    trainer's own log at that step (train_loss, train_acc, train_kl: Monte-Carlo KL of the step's samples).
    ``out_dir`` is opened under the experiment-directory protocol (``run_in_directory``).
    """
    settings = settings or OnlineLabSettings()
    out = Path(out_dir)
    rows = run_in_directory(world, out, settings, progress=progress, echo=echo, overwrite=overwrite)
    write_outputs(rows, out, settings, offline_results)
    return rows


def run_in_directory(world: World, out: Path, settings: OnlineLabSettings, *, progress: bool, echo,
                     overwrite: bool) -> list[dict]:
    """Every run into ``out`` under ``chipo.train.experiment_dir.open_experiment`` (one online lab per directory
    at a time; the settings, world and evaluated label counts checked against ``experiment.json``, or the
    ``online_lab.json`` of a directory made before it; ``overwrite`` starts again), with or without
    ``chipo demo``."""
    import torch

    from chipo.train.experiment_dir import key_recorded_in, open_experiment

    train_prompts, _ = load_prompts(world.train_prompts_path)
    key = {"settings": dataclasses.asdict(settings), "world": str(world.root),
           "eval_labels": settings.eval_labels(len(train_prompts))}
    record = {"key": key, "train_prompts": len(train_prompts), "label_budget": key["eval_labels"][-1]}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 0.1M-parameter model: threads cost more than they give
    try:
        with quiet_libraries(), open_experiment(out, key, overwrite=overwrite, what="online lab",
                                                legacy_key=key_recorded_in("online_lab.json"), label="out") as exp:
            write_json(out / "online_lab.json", record)  # the report reads the settings back from here
            rows = _run(world, out, settings, key["eval_labels"], progress, echo)
            exp.finish({"rows": len(rows)})
    finally:
        torch.set_num_threads(threads)
    return rows


def _run(world: World, out: Path, settings: OnlineLabSettings, budget_labels: list[int], progress: bool,
         echo) -> list[dict]:
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chipo.lab.evaluate import Baseline, ExactSpace, exact_metrics

    tokenizer = AutoTokenizer.from_pretrained(world.pi_ref)
    ref = AutoModelForCausalLM.from_pretrained(world.pi_ref).eval()
    gold = world.scorer()
    prompts, references = load_prompts(world.eval_prompts_path, limit=settings.max_eval_prompts)
    ref_rewards = np.array([gold.score([p], [r])[0] if r else np.nan for p, r in zip(prompts, references)])
    baseline = Baseline(prompts, references, ref_rewards, None, None,
                        exact=ExactSpace(*gold.exact_partition(ref, tokenizer, prompts)))
    results = out / "results.jsonl"
    rows = read_results(results)
    if not any(r.get("method") == "pi_ref" for r in rows):
        row = {"method": "pi_ref", "loss": None, "exploration": None, "beta": None, "seed": None, "labels": 0,
               "step": 0, **exact_metrics(baseline.exact.ref_logps, baseline)}
        append_row(results, row)
        rows.append(row)

    cells = [(m, b, s) for b in settings.betas for s in range(settings.seeds) for m in settings.methods]
    todo = [c for c in cells if not set(budget_labels) <= labels_done(rows, *c)]
    bar = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="online lab (runs)", unit="run",
               disable=not progress)
    for method, beta, seed in todo:
        bar.set_postfix_str(run_name(method, beta, seed))
        start = time.perf_counter()
        run_dir = out / "runs" / run_name(method, beta, seed)
        missing = sorted(set(budget_labels) - labels_done(rows, method, beta, seed))
        _train(world, run_dir, method, beta, seed, settings, budget_labels)
        train_seconds = time.perf_counter() - start
        for row in _evaluate(world, run_dir, (method, beta, seed), missing, settings, (tokenizer, gold, baseline)):
            append_row(results, {**row, "train_seconds": train_seconds})
            rows.append({**row, "train_seconds": train_seconds})
        last = max((r for r in rows if (r["method"], r["beta"], r["seed"]) == (method, beta, seed)),
                   key=lambda r: r["labels"])
        for ckpt in run_dir.glob("checkpoint-*"):
            shutil.rmtree(ckpt, ignore_errors=True)
        bar.update()
        (bar.write if progress else echo)(
            f"      {LABELS[method]} beta {beta:g} seed {seed}: {last['labels']} labels, gold {last['gold']:.3f}, "
            f"KL {last['kl']:.2f}, malformed {100 * last['mass_malformed']:.1f}% "
            f"({time.perf_counter() - start:.0f} s)")
    bar.close()
    return rows


def _evaluate(world: World, run_dir: Path, cell: tuple, labels: list[int], settings: OnlineLabSettings, judge):
    """Rows of one run at each of ``labels``: exact metrics of its checkpoint there (``judge``: tokenizer, gold
    scorer, pi_ref's baseline) beside the trainer's own log at that step."""
    from chipo.lab.evaluate import exact_metrics

    tokenizer, gold, baseline = judge
    method, beta, seed = cell
    log = {r["step"]: r for r in read_results(run_dir / "metrics.jsonl")}
    for n in labels:
        t0 = time.perf_counter()
        step = n // settings.prompts_per_step
        policy = _load_checkpoint(world, run_dir / f"checkpoint-{step}")
        metrics = exact_metrics(gold.exact_partition(policy, tokenizer, baseline.prompts)[0], baseline)
        trained = log.get(step, {})
        yield {"method": method, **method_keys(method), "beta": beta, "seed": seed, "labels": n, "step": step,
               **metrics, "train_loss": trained.get("loss"), "train_acc": trained.get("rewards/accuracies"),
               "train_kl": trained.get("kl"), "eval_seconds": time.perf_counter() - t0}


def _train(world: World, run_dir: Path, method: str, beta: float, seed: int, settings: OnlineLabSettings,
           eval_labels: list[int]) -> None:
    """``run_online`` with a checkpoint at every evaluated label count (resuming from the last one if present)."""
    from chipo.train.online import OnlineConfig, run_online
    from chipo.train.rundir import loop_checkpoints

    steps = [n // settings.prompts_per_step for n in eval_labels]
    resume = run_dir.is_dir() and bool(loop_checkpoints(run_dir))
    if not resume and run_dir.exists():  # a run that never reached a checkpoint: start afresh, no stale log lines
        shutil.rmtree(run_dir)
    spec = method_keys(method)
    learning_rate = settings.learning_rate * spec.pop("learning_rate_factor", 1.0)
    extra = {k: v for k, v in spec.items() if k not in ("loss", "exploration")}
    gold_high = settings.scale * (WorldScorer.reward_range[1] - WorldScorer.reward_range[0])
    config = OnlineConfig(
        policy=world.pi_ref, prompts=world.train_prompts_path, judge=f"world-scaled:{settings.scale:g}:{world.root}",
        output_dir=str(run_dir), overwrite_output_dir=True, loss=spec["loss"], exploration=spec["exploration"],
        xpo_alpha=settings.alpha, beta=beta,
        # chiPO's clip at 2 R_max with R_max the range of the reward behind the labels, as the offline demo sets it
        r_max=gold_high if spec["loss"] == "chipo" else None, label="bt",
        max_labels=eval_labels[-1], max_steps=steps[-1], prompts_per_step=settings.prompts_per_step,
        learning_rate=learning_rate, max_new_tokens=settings.max_new_tokens, seed=seed,
        save_steps=math.gcd(*steps), save_total_limit=None, logging_steps=1, disable_tqdm=True,
        resume_from_checkpoint="latest" if resume else None, **extra)
    run_dir.mkdir(parents=True, exist_ok=True)
    with (run_dir / "train.log").open("a") as log, contextlib.redirect_stdout(log), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_online(config)


def _load_checkpoint(world: World, checkpoint: Path):
    """pi_ref's architecture with a ``chipo online`` checkpoint's weights (accelerate state: model.safetensors)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    if not (checkpoint / "model.safetensors").is_file():
        raise RuntimeError(f"{checkpoint}: no model.safetensors (the run did not reach this label count)")
    policy = AutoModelForCausalLM.from_pretrained(world.pi_ref)
    policy.load_state_dict(load_file(str(checkpoint / "model.safetensors")))
    return policy.eval()


# ------------------------------------------------------------------------------------------------ the experiment


def run_experiment(context: Context, settings: OnlineLabSettings, out_dir: Path) -> None:
    """Every run of the online lab into ``out_dir`` (its report is rendered from the rows on disk)."""
    run_in_directory(context.world(), out_dir, settings, progress=context.progress, echo=context.echo,
                     overwrite=context.overwrite)


def render(out_dir: Path, context: Context) -> str:
    """``online_lab.md`` and its plots rewritten from ``results.jsonl`` with the offline experiment's rows beside
    the online runs; returns them as a section of the composed report."""
    import os

    from chipo.lab.online_report import section

    saved = json.loads((out_dir / "online_lab.json").read_text())["key"]["settings"]
    settings = OnlineLabSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    write_outputs(read_results(out_dir / "results.jsonl"), out_dir, settings,
                  read_results(context.dir("offline") / "results.jsonl"))
    return section(out_dir, os.path.relpath(out_dir, context.report_dir))


EXPERIMENT = Experiment(
    name="online", title="online DPO / chiPO, XPO and chi-squared XPO at the offline demo's label budget",
    settings=OnlineLabSettings, run=run_experiment, render=render, needs=("offline",),
    owns_directory=True)  # run_in_directory applies the directory protocol: run_online_lab gets it without the runner
