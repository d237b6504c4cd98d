"""The method table's report: ``results.jsonl`` of ``chipo.lab.methods`` -> ``table.csv``, ``report.md`` and
``gold_vs_sqrt_kl.png``.

Numbers come from one table (``reported``: one row per method, rule, beta and seed); words come from paired t-tests
against DPO with Holm's correction over all of the table's comparisons (``comparisons``), printed only when the
test passes, otherwise "not shown".

Reported points, fixed before any result:

* offline methods at two epochs: ``last`` (the last epoch of the run) and ``held-out acc`` (the evaluated epoch
  with the best implicit-reward accuracy on held-out pairs, ties to the earlier epoch: no gold reward involved);
* every other method at the end of its run (``final``).

Comparisons (one family, Holm over all of them): the gold reward of every reported (method, rule, beta) against
offline DPO at the same beta, paired by seed (a seed is one preference-data draw: the same labels for both). An
offline method is compared with DPO at the same rule; every other method with DPO at ``held-out acc`` (the DPO
a user without the gold reward would pick). Best-of-n has no beta: it is compared with DPO at each beta.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from chipo import stats
from chipo.io import atomic_write_text
from chipo.lab.report_tables import fmt
from chipo.lab.runs import read_results
from chipo.markdown import markdown_table

LABELS = {"dpo": "DPO", "chipo": "chiPO", "dpo+sft": "DPO + SFT term (RPO)", "chipo+sft": "chiPO + SFT term",
          "online-dpo": "online DPO", "online-chipo": "online chiPO", "xpo": "XPO", "chi2-xpo": "chi-squared XPO",
          "nash-md": "Nash-MD", "rlhf-kl": "RLHF, KL", "rlhf-chi2mix": "RLHF, chi2mix", "bon": "best-of-n",
          "pessimism": "chi-squared pessimism"}
HEADLINE_RULE = "held-out acc"
METRICS = ("gold", "win_rate_vs_ref", "kl_partition", "kl_mc", "mass_out_of_language")


def select_points(row: dict) -> list[tuple[str, dict]]:
    """(rule, point) pairs a result row reports (module docstring)."""
    points = row["points"]
    if row["family"] != "offline":
        return [("final", points[-1])]
    last = max(points, key=lambda p: p["epoch"])
    # max() keeps the first maximum: with points in epoch order, ties go to the earlier epoch
    best = max(sorted(points, key=lambda p: p["epoch"]), key=lambda p: p.get("implicit_acc") or -math.inf)
    return [("last", last), (HEADLINE_RULE, best)]


def reported(rows: list[dict]) -> pd.DataFrame:
    """One row per (method, rule, beta, seed): the reported point's metrics, labels and CPU seconds."""
    out = []
    for r in rows:
        for rule, p in select_points(r):
            out.append({"method": r["method"], "family": r["family"], "rule": rule, "beta": r["beta"],
                        "seed": r["seed"], "labels": r["labels"], "epoch": p.get("epoch"),
                        **{k: p.get(k) for k in METRICS}, "implicit_acc": p.get("implicit_acc"),
                        "train_cpu_s": r["train_cpu_s"] + r.get("reward_model_cpu_s", 0.0),
                        "eval_cpu_s": r["eval_cpu_s"]})
    return pd.DataFrame(out).astype({k: float for k in METRICS})


def _seed_values(df: pd.DataFrame, method: str, rule: str, beta, metric: str = "gold") -> pd.Series:
    sel = (df.method == method) & (df.rule == rule) & (df.beta.isna() if beta is None else df.beta == beta)
    return df[sel].set_index("seed")[metric].sort_index()


def comparisons(df: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """Gold against DPO (module docstring): estimate, its s.e., p, Holm-adjusted p, verdict, detectable gap."""
    betas = sorted(df.beta.dropna().unique(), reverse=True)
    tests = []
    for (method, rule, beta), _ in df.groupby(["method", "rule", "beta"], dropna=False, sort=False):
        beta = None if pd.isna(beta) else float(beta)
        if method == "dpo":
            continue
        for b in [beta] if beta is not None else betas:
            dpo_rule = rule if rule in ("last", HEADLINE_RULE) else HEADLINE_RULE
            a, d = _seed_values(df, method, rule, beta), _seed_values(df, "dpo", dpo_rule, b)
            seeds = a.index.intersection(d.index)
            diff = (a[seeds] - d[seeds]).to_numpy()
            v = stats.gap_verdict(a[seeds].to_numpy(), d[seeds].to_numpy(), f"{method} vs dpo")
            tests.append({"method": method, "rule": rule, "beta": beta, "dpo_beta": b, "dpo_rule": dpo_rule,
                          "n": len(seeds), "verdict": v, "se": stats.mean_se(diff)[1] if len(diff) > 1 else math.nan})
    if not tests:
        return pd.DataFrame()
    adjusted = stats.apply_holm([t["verdict"] for t in tests], alpha)
    m = len(tests)
    out = []
    for t, v in zip(tests, adjusted):
        word = "not shown" if not v.passed else ("higher gold than DPO" if v.estimate > 0 else "lower gold than DPO")
        out.append({k: t[k] for k in ("method", "rule", "beta", "dpo_beta", "dpo_rule", "n")}
                   | {"gold_gap": v.estimate, "gold_gap_se": t["se"], "p": v.p, "p_holm": v.p_adjusted,
                      "verdict": word,
                      # 80% power at the level of Holm's first step (alpha / m): the strictest level a claim meets
                      "detectable_gap": stats.min_detectable_difference(t["se"], t["n"] - 1, alpha=alpha / m)
                      if t["n"] > 1 else math.nan})
    return pd.DataFrame(out)


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and standard error over seeds of every metric per (method, rule, beta), in the registry's order."""
    rows = []
    for (method, rule, beta), g in df.groupby(["method", "rule", "beta"], dropna=False, sort=False):
        entry = {"method": method, "rule": rule, "beta": None if pd.isna(beta) else float(beta), "seeds": len(g),
                 "labels": int(g.labels.max()), "train_cpu_s": float(g.train_cpu_s.mean()),
                 "epoch": ", ".join(str(int(e)) for e in sorted(g.epoch.dropna().unique())) if g.epoch.notna().any()
                 else ""}
        for k in METRICS:
            values = g[k].dropna().to_numpy(dtype=float)
            entry[k], entry[f"{k}_se"] = stats.mean_se(values) if len(values) else (math.nan, math.nan)
        rows.append(entry)
    order = {m: i for i, m in enumerate(LABELS)}
    return pd.DataFrame(rows).sort_values(by=["method", "rule"], key=lambda c: c.map(order) if c.name == "method"
                                          else c != "last", kind="stable").reset_index(drop=True)


def _pm(mean: float, se: float, scale: float = 1.0, digits: int = 3) -> str:
    return fmt(mean, se, scale, digits, missing="—")


def _method_row(e, tests: pd.DataFrame, beta: float | None) -> list:
    """One (method, rule) of ``summary`` and its test against DPO at ``beta`` (none for DPO's own row)."""
    t = tests[(tests.method == e.method) & (tests.rule == e.rule) & (tests.dpo_beta == beta)] if len(tests) else tests
    point = f"{e.rule}" + (f" (epoch{'s' if ',' in e.epoch else ''} {e.epoch})" if e.epoch else "")
    if len(t):
        t = t.iloc[0]
        gap = f"{t.gold_gap:+.3f} ± {t.gold_gap_se:.3f}"
        p, verdict = f"{t.p_holm:.3f}", f"{t.verdict} (detectable: {t.detectable_gap:.3f})"
    else:
        gap, p, verdict = "(reference)", "", ""
    return [LABELS.get(e.method, e.method), point, _pm(e.gold, e.gold_se),
            _pm(e.win_rate_vs_ref, e.win_rate_vs_ref_se, 100, 1), _pm(e.kl_partition, e.kl_partition_se, digits=2),
            _pm(e.kl_mc, e.kl_mc_se, digits=2), _pm(e.mass_out_of_language, e.mass_out_of_language_se, 100, 1),
            e.labels, f"{e.train_cpu_s:.1f}", gap, p, verdict]


def method_table(summ: pd.DataFrame, tests: pd.DataFrame, beta: float | None, ref: dict | None = None) -> str:
    """The table at one beta (best-of-n, which has none, in every beta's table); pi_ref's own row first."""
    rows = []
    if ref:
        rows.append(["pi_ref", "(no training)", f"{ref['gold']:.3f}", f"{100 * ref['win_rate_vs_ref']:.1f}", 0, 0,
                     f"{100 * ref['mass_malformed']:.1f}", 0, 0, "", "", ""])
    part = summ[(summ.beta == beta) | summ.beta.isna()]
    rows += [_method_row(e, tests, beta) for e in part.itertuples()]
    return markdown_table(["method", "reported point", "gold J", "win vs pi_ref %", "KL partition", "KL Monte Carlo",
                           "out of language %", "labels", "train CPU s", "gold - DPO", "p (Holm)", "verdict"], rows)


COLORS = {"dpo": "tab:red", "chipo": "tab:blue", "dpo+sft": "salmon", "chipo+sft": "lightskyblue",
          "online-dpo": "darkred", "online-chipo": "navy", "xpo": "tab:orange", "chi2-xpo": "tab:cyan",
          "nash-md": "tab:purple", "rlhf-kl": "tab:brown", "rlhf-chi2mix": "tab:green", "bon": "black",
          "pessimism": "tab:olive"}
MARKERS = {"last": "s", HEADLINE_RULE: "D", "final": "o"}


def plot(summ: pd.DataFrame, out: Path, ref_gold: float | None = None) -> str:
    """Gold reward vs sqrt(Monte-Carlo KL) per method (mean ± s.e. over seeds), a panel per beta; offline methods
    at both reported epochs (square: last, diamond: best held-out accuracy), the others at the end of their run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    betas = sorted(summ.beta.dropna().unique(), reverse=True)
    fig, axes = plt.subplots(1, len(betas), figsize=(5.5 * len(betas) + 2.5, 5), squeeze=False, sharey=True)
    for ax, beta in zip(axes[0], betas):
        for e in summ[(summ.beta == beta) | summ.beta.isna()].itertuples():
            x = math.sqrt(max(e.kl_mc, 0.0))
            # d sqrt(k) = dk / (2 sqrt(k)): the s.e. of sqrt(KL) to first order
            xerr = e.kl_mc_se / (2 * x) if x > 0 and not math.isnan(e.kl_mc_se) else 0.0
            ax.errorbar(x, e.gold, xerr=xerr, yerr=np.nan_to_num(e.gold_se), fmt=MARKERS.get(e.rule, "o"),
                        color=COLORS.get(e.method, "grey"), capsize=2, ms=6,
                        label=LABELS.get(e.method, e.method) + (f" ({e.rule})" if e.rule != "final" else ""))
        if ref_gold is not None:
            ax.axhline(ref_gold, color="grey", lw=1, ls=":", label="pi_ref")
        ax.set_title(f"beta = {beta:g}")
        ax.set_xlabel("sqrt(KL(pi || pi_ref)), Monte Carlo (nats^1/2)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("gold reward J(pi), exact")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.02, 1.0))
    fig.suptitle("Every method at the same preference labels per seed (mean ± s.e. over seeds)", fontsize=10)
    fig.tight_layout()
    name = "gold_vs_sqrt_kl.png"
    fig.savefig(out / name, dpi=110)
    plt.close(fig)
    return name


def write_report(out_dir) -> Path:
    """``table.csv`` (every reported point), ``comparisons.csv``, ``gold_vs_sqrt_kl.png`` and ``report.md``."""
    out = Path(out_dir)
    rows = read_results(out / "results.jsonl")
    meta = json.loads((out / "table.json").read_text()) if (out / "table.json").is_file() else {}
    df = reported(rows)
    df.to_csv(out / "table.csv", index=False)
    tests = comparisons(df)
    if len(tests):
        tests.to_csv(out / "comparisons.csv", index=False)
    summ = summary(df)
    image = plot(summ, out, (meta.get("pi_ref") or {}).get("gold"))
    meta["cpu_totals"] = {"training": sum(r["train_cpu_s"] for r in rows),
                          "evaluation (incl. best-of-n / pessimism selection)": sum(r["eval_cpu_s"] for r in rows),
                          "reward models": sum((meta.get("reward_model_cpu_s") or {}).values())}
    atomic_write_text(out / "report.md", render(summ, tests, meta, image))
    return out / "report.md"


def protocol(s: dict, labels) -> str:
    """The schedules of every family, in words, from the run's settings."""
    if not s:
        return ""
    from chipo.lab.demo import DemoSettings
    from chipo.lab.rlhf import RLHFSettings
    from chipo.lab.sweep import default_eval_epochs

    on, rl = s["online"], s["rlhf"]
    steps_offline = s["epochs"] * -(-int(labels or 0) // s["batch_size"])
    return (f"Schedules (fixed before the run). Offline: AdamW, constant learning rate {s['learning_rate']:g}, batch "
            f"{s['batch_size']}, {s['epochs']} epochs (about {steps_offline} optimizer steps), evaluated at epochs "
            f"{default_eval_epochs(s['epochs'])}; SFT term weight 1. Online: {labels} labels, {on['prompts_per_step']} "
            f"per step ({int(labels or 0) // on['prompts_per_step']} steps), learning rate {on['learning_rate']:g}, "
            f"XPO alpha {on['alpha']:g}, Nash-MD with chipo online's defaults (mixture 0.5, KL). RLHF: reward model "
            f"(pi_ref's backbone) {rl['rm_epochs']:g} epochs on the seed's {labels} pairs; RLOO with k = {rl['k']}, "
            f"{rl['prompts_per_step']} prompts per step, {rl['steps']} steps, learning rate {rl['learning_rate']:g}. "
            f"Best-of-n and chi-squared pessimism: n = {s['best_of_n']} from a pool of pi_ref samples scored by the "
            "same reward model; pessimism's beta is the table's beta, in the reward model's units (Bradley-Terry, "
            "like DPO's implicit reward). Responses up to "
            f"{s['max_new_tokens']} tokens; evaluation: {s['num_samples']} samples per held-out prompt plus exact "
            "metrics over the world's response partition. For scale: `chipo demo` trains "
            f"{DemoSettings.epochs} epochs and its RLHF part (`--full`) {RLHFSettings.steps} RL steps; the online "
            "runs' steps are set by the label budget.")


def render(summ: pd.DataFrame, tests: pd.DataFrame, meta: dict, image: str) -> str:
    settings = meta.get("settings") or {}
    seeds = int(summ.seeds.max()) if len(summ) else 0
    text = ["# Which method? Every chipo method on one world, one label budget", "",
            "Each method learns from the same preference labels of the embedded world's gold reward: per seed, "
            f"{meta.get('labels', '?')} Bradley-Terry labels (scale {settings.get('scale', '?')}) on pairs of pi_ref "
            "samples, the data process of Huang et al. 2024 (arXiv 2407.13399, section 2). Offline methods train "
            "on those pairs; online methods ask the same judge for as many labels on their own samples; RLHF, "
            "best-of-n and chi-squared pessimism use a reward model trained on exactly the offline pairs. "
            f"{seeds} seeds, each its own data draw. Every trained policy is evaluated on the same held-out prompts.",
            "", "Columns: gold J = exact mean gold reward (0 outside the language); win vs pi_ref = probability of "
            "beating a pi_ref response under the gold reward (ties 1/2); KL partition = exact KL over the world's "
            "response partition (a lower bound); KL Monte Carlo = mean log(pi/pi_ref) over the policy's own "
            f"{settings.get('num_samples', '?')} samples per prompt (best-of-n / pessimism: KL of the selection's "
            "law against the pool of pi_ref samples it selects from); out of language = probability of text "
            "outside the language; train CPU s = CPU seconds of the training run (for reward-model methods, plus the "
            "reward model's); gold - DPO = mean paired difference over seeds ± its s.e.; verdict: a paired t-test "
            "against DPO at the same beta, Holm-corrected over all "
            f"{len(tests)} comparisons of this report, words only when it passes; 'detectable' = the gap the test "
            "would detect with 80% power at Holm's first-step level.", "",
            "Reported points (fixed in advance): offline methods at their last epoch and at the epoch of best "
            "implicit-reward accuracy on held-out pairs (no gold involved); every other method at the end of its "
            "run. Offline rows are compared with DPO at the same rule, all others with DPO at 'held-out acc'.", ""]
    text += [protocol(settings, meta.get("labels")), ""]
    for beta in sorted(summ.beta.dropna().unique(), reverse=True):
        text += [f"## beta = {beta:g}", "", method_table(summ, tests, beta, meta.get("pi_ref")), ""]
    text += ["## What the tests show", ""] + findings(tests)
    text += ["", f"![gold vs sqrt KL]({image})", "", "## Settings", "", "```json",
             json.dumps(settings, indent=1, default=str), "```", ""] + cost_lines(meta)
    return "\n".join(text) + "\n"


def findings(tests: pd.DataFrame) -> list[str]:
    """One line per comparison with DPO that passes after Holm, or one line saying none does."""
    passed = tests[tests.verdict != "not shown"] if len(tests) else tests
    if not len(passed):
        return ["No comparison with DPO passes after Holm's correction."]
    return [f"- {LABELS.get(t.method, t.method)} ({t.rule}{'' if pd.isna(t.beta) else f', beta {t.beta:g}'})"
            f": {t.verdict} at beta {t.dpo_beta:g} (gap {t.gold_gap:+.3f} ± {t.gold_gap_se:.3f}, Holm "
            f"p {t.p_holm:.3g})." for t in passed.itertuples()]


def cost_lines(meta: dict) -> list[str]:
    """The CPU seconds summed over the runs, and each invocation's wall time and machine load."""
    totals = meta.get("cpu_totals") or {}
    out = ["CPU time summed over the runs (each measured in the process that ran it): "
           + ", ".join(f"{k} {v:.0f} s" for k, v in totals.items()) + "."] if totals else []
    return out + [f"Run: {t['runs']} runs in {t['wall_s']:.0f} s wall with {t['workers']} process(es); load "
                  f"average {', '.join(f'{x:.1f}' for x in t['load_at_start'])} at the start, "
                  f"{', '.join(f'{x:.1f}' for x in t['load_at_end'])} at the end." for t in meta.get("timing", [])]
