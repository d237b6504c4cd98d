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
results are given) and ``online_lab.md`` (settings and the table). A rerun skips finished runs and resumes a run
cut short from its last checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import time
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chipo.config import ConfigError
from chipo.io import atomic_write_text, write_json
from chipo.lab.protocol import DemoSettings
from chipo.lab.sweep import append_row, load_prompts, quiet_libraries, read_results
from chipo.lab.world import World, WorldScorer, world_scorer
from chipo.rewards import register_scorer

# method name -> chipo online keys. chi-squared XPO = chiPO's pairwise loss + XPO's (KL-form) exploration bonus;
# see chipo.losses.online for why the bonus stays KL-form. Both chi-squared methods take chipo online's defaults for
# loss=chipo, which include the bounded penalty on the policy's own samples (docs/online-lab/variants.md).
METHODS = {
    "online-dpo": {"loss": "dpo", "exploration": "none"},
    "online-chipo": {"loss": "chipo", "exploration": "none"},
    "xpo": {"loss": "dpo", "exploration": "xpo"},
    "chi2-xpo": {"loss": "chipo", "exploration": "xpo"},
}
# Every online method ``_train`` can run: the lab's four, and Nash-MD (Munos et al. 2023, arXiv 2312.00886: self-play
# against pi^(1-m) pi_ref^m, chipo online's defaults), which the method table (chipo.lab.methods) also runs.
SPECS = {**METHODS, "nash-md": {"loss": "nash-md", "exploration": "none"}}
# Variants of the chi-squared methods, for the experiment in docs/online-lab (not run by default), named
# "<method>.<variant>" (``method_keys``). Each fixes the keys it tests explicitly, so its results do not move when
# chipo online's defaults do. learning_rate_factor scales the settings' learning rate.
_PAPER_CLIP = {"margin_clip": "both", "policy_penalty": 0.0, "policy_penalty_bound": False}
VARIANTS = {
    "paper-clip": _PAPER_CLIP,  # the paper's two-sided clip at 2 r_max, nothing else (the default before)
    "no-clip": {**_PAPER_CLIP, "clip_margin": False},
    "upper-clip": {**_PAPER_CLIP, "margin_clip": "upper"},
    "penalty": {**_PAPER_CLIP, "policy_penalty": 1.0},  # + beta (f'(z) - f'(1)) log pi on the policy's samples
    "upper-clip+penalty": {**_PAPER_CLIP, "margin_clip": "upper", "policy_penalty": 1.0},
    "upper-clip+penalty-0.3": {**_PAPER_CLIP, "margin_clip": "upper", "policy_penalty": 0.3},
    "lr-0.3": {**_PAPER_CLIP, "learning_rate_factor": 0.3},
    "log-clip": {**_PAPER_CLIP, "margin_clip": "log"},  # the paper's value, the log link's gradient past it
    "bounded-penalty": {**_PAPER_CLIP, "policy_penalty": 1.0, "policy_penalty_bound": True},
    "upper-clip+bounded-penalty": {"margin_clip": "upper", "policy_penalty": 1.0, "policy_penalty_bound": True},
}
VARIANT_BASES = ("online-chipo", "chi2-xpo")


def method_keys(method: str) -> dict:
    """chipo online keys of a method: ``SPECS[method]``, or for "<base>.<variant>" the base's plus the variant's."""
    base, _, variant = method.partition(".")
    if base not in SPECS or (variant and (base not in VARIANT_BASES or variant not in VARIANTS)):
        valid = list(SPECS) + [f"{b}.{v}" for b in VARIANT_BASES for v in VARIANTS]
        raise ConfigError(f"unknown online lab method {method!r}; valid: {', '.join(valid)}")
    return {**SPECS[base], **VARIANTS.get(variant, {})}


LABELS = {"online-dpo": "online DPO", "online-chipo": "online chiPO", "xpo": "XPO", "chi2-xpo": "chi2-XPO",
          "nash-md": "Nash-MD",
          "offline-dpo": "offline DPO", "offline-chipo": "offline chiPO", "pi_ref": "pi_ref"}
LABELS.update({f"{b}.{v}": f"{LABELS[b]} ({v})" for b in VARIANT_BASES for v in VARIANTS})
COLORS = {"online-dpo": "tab:red", "online-chipo": "tab:blue", "xpo": "tab:orange", "chi2-xpo": "tab:cyan",
          "nash-md": "tab:purple",
          "offline-dpo": "darkred", "offline-chipo": "navy"}
METRICS = ("gold", "win_rate_vs_ref", "kl", "sqrt_kl", "chi2", "mass_malformed")


@dataclass(frozen=True)
class OnlineLabSettings:
    """Sizes of the online lab. Budget, scale, betas, learning rate and response length default to the offline
    demo's (``DemoSettings``), so the two are compared at equal labels, noise, regularization and optimizer."""

    seeds: int = 3
    betas: tuple[float, ...] = DemoSettings.betas
    methods: tuple[str, ...] = tuple(METHODS)
    pairs_per_prompt: int = DemoSettings.pairs_per_prompt  # label budget = this x training prompts
    eval_fractions: tuple[float, ...] = (0.125, 0.25, 0.5, 1.0)  # of the budget, rounded to whole steps
    scale: float = DemoSettings.scale
    prompts_per_step: int = 8
    learning_rate: float = DemoSettings.learning_rate
    alpha: float = 1e-5  # XPO's coefficient: chipo online's (and TRL's) default
    max_new_tokens: int = DemoSettings.max_new_tokens
    max_eval_prompts: int | None = None

    @staticmethod
    def quick(seeds: int = 1) -> OnlineLabSettings:
        return OnlineLabSettings(seeds=seeds, betas=(0.05,), pairs_per_prompt=2, eval_fractions=(0.5, 1.0),
                                 prompts_per_step=4, max_eval_prompts=4)

    def __post_init__(self) -> None:
        for m in self.methods:
            method_keys(m)
        if self.seeds < 1 or not self.betas or any(not b > 0 for b in self.betas):
            raise ConfigError("seeds must be >= 1 and betas positive and non-empty")
        if not self.eval_fractions or any(not 0 < f <= 1 for f in self.eval_fractions):
            raise ConfigError(f"eval_fractions must lie in (0, 1], got {self.eval_fractions}")

    def eval_labels(self, n_train_prompts: int) -> list[int]:
        """Label counts evaluated: fractions of the budget, in whole steps (at least one step)."""
        steps = self.pairs_per_prompt * n_train_prompts // self.prompts_per_step
        if steps < 1:
            raise ConfigError(f"label budget {self.pairs_per_prompt * n_train_prompts} is below one step of "
                              f"{self.prompts_per_step} prompts")
        return sorted({max(1, round(f * steps)) * self.prompts_per_step for f in self.eval_fractions})


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
                   offline_results: list[dict] | None = None, progress: bool = True, echo=print) -> list[dict]:
    """Train and evaluate every unfinished run, write plots and ``online_lab.md``; returns all result rows.

    ``offline_results``: rows of the offline demo's ``sweep/results.jsonl`` (loss dpo / chipo, beta, seed, epoch,
    an ``exact`` block), drawn beside the online runs. Rows are flat: method, loss, exploration, beta, seed,
    labels, step, the exact metrics (gold, win_rate_vs_ref, kl, sqrt_kl, chi2, mass_malformed, total_mass) and the
    trainer's own log at that step (train_loss, train_acc, train_kl: Monte-Carlo KL of the step's samples).
    """
    import torch

    settings = settings or OnlineLabSettings()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 0.1M-parameter model: threads cost more than they give
    try:
        with quiet_libraries():
            rows = _run(world, out, settings, progress, echo)
    finally:
        torch.set_num_threads(threads)
    write_outputs(rows, out, settings, offline_results)
    return rows


def _run(world: World, out: Path, settings: OnlineLabSettings, progress: bool, echo) -> list[dict]:
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chipo.lab.evaluate import Baseline, ExactSpace, exact_metrics

    train_prompts, _ = load_prompts(world.train_prompts_path)
    budget_labels = settings.eval_labels(len(train_prompts))
    key = {"settings": dataclasses.asdict(settings), "world": str(world.root), "eval_labels": budget_labels}
    meta = out / "online_lab.json"
    if meta.is_file() and json.loads(meta.read_text()).get("key") != json.loads(json.dumps(key)):
        raise ConfigError(f"{out} holds an online lab run with other settings or another world; use another "
                          "directory or delete it")
    write_json(meta, {"key": key, "train_prompts": len(train_prompts), "label_budget": budget_labels[-1]})

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
        log = {r["step"]: r for r in read_results(run_dir / "metrics.jsonl")}
        for labels in missing:
            t0 = time.perf_counter()
            step = labels // settings.prompts_per_step
            policy = _load_checkpoint(world, run_dir / f"checkpoint-{step}")
            metrics = exact_metrics(gold.exact_partition(policy, tokenizer, prompts)[0], baseline)
            trained = log.get(step, {})
            row = {"method": method, **method_keys(method), "beta": beta, "seed": seed, "labels": labels, "step": step,
                   **metrics, "train_loss": trained.get("loss"), "train_acc": trained.get("rewards/accuracies"),
                   "train_kl": trained.get("kl"), "train_seconds": train_seconds,
                   "eval_seconds": time.perf_counter() - t0}
            append_row(results, row)
            rows.append(row)
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


# ------------------------------------------------------------------------------------------------- tables, plots


def offline_rows(demo_rows: list[dict], budget: int) -> list[dict]:
    """The demo's sweep rows (exact block) as flat rows: method offline-<loss>, labels = the demo's pairs."""
    out = []
    for r in demo_rows:
        if r.get("loss") in ("dpo", "chipo") and r.get("exact"):
            out.append({"method": f"offline-{r['loss']}", "beta": r["beta"], "seed": r["seed"], "labels": budget,
                        "epoch": r["epoch"], **{k: r["exact"][k] for k in METRICS}})
    return out


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and standard error over seeds per (method, beta, labels[, epoch]); pi_ref once."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        groups[(r["method"], r.get("beta"), r["labels"], r.get("epoch"))].append(r)
    table = []
    for (method, beta, labels, epoch), group in groups.items():
        entry = {"method": method, "beta": beta, "labels": labels, "epoch": epoch, "n": len(group)}
        for k in METRICS:
            values = np.array([g[k] for g in group], dtype=float)
            entry[k] = float(values.mean())
            entry[f"{k}_se"] = float(values.std(ddof=1) / math.sqrt(len(values))) if len(values) > 1 else math.nan
        table.append(entry)
    order = list(LABELS)
    return sorted(table, key=lambda e: (e["beta"] is not None, -(e["beta"] or 0), order.index(e["method"]),
                                        e["labels"], e["epoch"] or 0))


def markdown_table(summary: list[dict]) -> str:
    def pm(e, k, scale=1.0, digits=3):
        se = "" if math.isnan(e[f"{k}_se"]) else f" ± {scale * e[f'{k}_se']:.{digits}f}"
        return f"{scale * e[k]:.{digits}f}{se}"

    lines = ["| method | beta | labels | epoch | gold J (exact) | win rate vs pi_ref, % | KL (partition) | "
             "malformed mass, % | seeds |", "|---|---|---|---|---|---|---|---|---|"]
    for e in summary:
        beta = "" if e["beta"] is None else f"{e['beta']:g}"
        lines.append(f"| {LABELS[e['method']]} | {beta} | {e['labels']} | {e['epoch'] or ''} | {pm(e, 'gold')} | "
                     f"{pm(e, 'win_rate_vs_ref', 100, 1)} | {pm(e, 'kl', digits=2)} | "
                     f"{pm(e, 'mass_malformed', 100, 1)} | {e['n']} |")
    return "\n".join(lines)


def write_outputs(rows: list[dict], out: Path, settings: OnlineLabSettings,
                  offline_results: list[dict] | None = None) -> list[str]:
    """``online_lab.md`` and the two plots from ``rows`` (and the offline demo's rows, if given)."""
    budget = max(r["labels"] for r in rows)
    offline = offline_rows(offline_results or [], budget)
    summary = summarize(rows + offline)
    files = plot(summary, out)
    text = [f"# Online DPO / chiPO, XPO and chi-squared XPO on the embedded world ({budget} labels)", "",
            f"Judge: Bradley-Terry labels sigmoid({settings.scale:g} (r*(y_a) - r*(y_b))) from the gold reward, as "
            f"the offline demo's data (Huang et al. 2024, arXiv 2407.13399). {settings.prompts_per_step} prompts "
            f"(pairs, labels) per step, AdamW lr {settings.learning_rate:g}, responses up to "
            f"{settings.max_new_tokens} tokens, XPO alpha {settings.alpha:g}, {settings.seeds} seed(s). Metrics "
            "are exact over the world's response partition on the held-out prompts (KL: a lower bound). Offline "
            f"rows: the demo's DPO / chiPO, trained for several epochs on {budget} pairs from pi_ref.", "",
            markdown_table(summary), ""] + [f"![{f}]({f})" for f in files]
    atomic_write_text(out / "online_lab.md", "\n".join(text) + "\n")
    return files


def plot(summary: list[dict], out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ref = next(e for e in summary if e["method"] == "pi_ref")
    betas = sorted({e["beta"] for e in summary if e["beta"] is not None}, reverse=True)
    methods = [m for m in LABELS if m != "pi_ref" and any(e["method"] == m for e in summary)]
    files = []
    for name, xkey, xlabel in (("online_gold_vs_sqrt_kl.png", "sqrt_kl", "sqrt(KL(pi || pi_ref)), exact over the "
                                                                         "partition (nats^1/2)"),
                               ("online_gold_vs_labels.png", "labels", "preference labels used")):
        fig, axes = plt.subplots(1, len(betas), figsize=(5.5 * len(betas), 4.2), squeeze=False, sharey=True)
        for ax, beta in zip(axes[0], betas):
            for m in methods:
                points = [ref] + [e for e in summary if e["method"] == m and e["beta"] == beta]
                offline = m.startswith("offline")
                if offline:
                    points = sorted(points, key=lambda e: e["epoch"] or 0)
                x = [math.sqrt(max(e["kl"], 0.0)) if xkey == "sqrt_kl" else e["labels"] for e in points]
                ax.errorbar(x, [e["gold"] for e in points], yerr=np.nan_to_num([e["gold_se"] for e in points]),
                            # offline runs all use the whole budget: a line to them would suggest a curve
                            marker="s" if offline else "o", ls=("--" if xkey == "sqrt_kl" else "none") if offline
                            else "-", capsize=2,
                            color=COLORS.get(m), label=LABELS[m], alpha=0.8)
                if offline:
                    for xi, e in zip(x[1:], points[1:]):
                        ax.annotate(f"ep {e['epoch']}", (xi, e["gold"]), fontsize=6, xytext=(2, 2),
                                    textcoords="offset points")
            ax.axhline(ref["gold"], color="grey", lw=1, ls=":", label="pi_ref")
            ax.set_title(f"beta = {beta:g}")
            ax.set_xlabel(xlabel)
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel("gold reward J(pi) (exact)")
        axes[0][0].legend(fontsize=7)
        fig.suptitle("Online vs offline preference optimization at the demo's label budget (mean ± s.e. over "
                     "seeds)" + ("; offline: epochs along the dashed line" if xkey == "sqrt_kl" else ""), fontsize=9)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
    return files
