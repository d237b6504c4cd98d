"""What the monitor's signals say about gold, and what a stop rule chosen on some runs costs on others.

Input: the rows of ``monitor_validation.jsonl`` (``chipo.lab.monitor_validation``): for every run (loss, beta, seed)
and scheduled step, the gold-free signals and the exact gold J of the policy. Per run, the gold peak is the
evaluation with the highest gold (the oracle's early stop); a rule's choice is the evaluation before its first alarm
(``chipo.monitor.alarm.chosen_index``); its *regret* is gold(peak) - gold(choice), in gold units (r* in [0, 1]).

The split is fixed before looking at the test runs: rules and thresholds are tuned on the tuning seeds at the
tuning beta only (both losses), by the smallest mean regret over those runs; the test runs are the other seeds at
the tuning beta (held-out seeds) and every seed at the other beta (held-out beta; its tuning seeds share their
preference data with tuning runs, not their training). Comparisons are paired by seed
(the unit: each seed has its own preference data), one-sided paired t tests (``chipo.stats.paired_t``) with Holm's
correction over the family of claims.

Each signal has the direction the mechanism predicts (Huang et al. 2024, arXiv 2407.13399, section 3; the lab's
mass tables): off-support rate, KL, chi-squared, the largest log-ratio, the margin, the clip rate and the train /
held-out accuracy gap go up as the policy overoptimizes; the chosen and rejected log-ratios and the entropy go down.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from chipo.markdown import markdown_table
from chipo.monitor.alarm import AlarmRule, chosen_index, first_alarm
from chipo.stats import holm, mean_se, paired_t

SIGNALS: dict[str, bool] = {  # name -> goes up when overoptimizing
    "off_support": True, "kl_k3": True, "kl_k1": True, "chi2": True, "log_ratio_max": True, "margin": True,
    "clip_rate": True, "acc_gap": True, "chosen_logratio": False, "rejected_logratio": False, "entropy": False,
}
"""Candidate alarm signals, all gold-free (the held-out pairs' labels are preference labels, not gold)."""

TRANSFERABLE = ("off_support", "acc_gap", "clip_rate")
"""The signals a shipped default rule may use: fractions, comparable across models, response lengths and data (the
off-support rate is calibrated on pi_ref's own samples). KL, log-ratios, margins and entropy are in nats per
response and scale with its length, so a threshold tuned on this world's 4-letter responses would not transfer.
Fixed before the test runs were looked at; every signal's own tuned rule is reported beside it."""

KEY = ["loss", "beta", "seed"]


def runs(table: pd.DataFrame) -> dict[tuple, pd.DataFrame]:
    """One frame per run, sorted by step, with ``acc_gap`` = training minus held-out implicit accuracy."""
    df = table.copy()
    df["acc_gap"] = df["train_acc"] - df["implicit_acc"]
    return {key: g.sort_values("step").reset_index(drop=True) for key, g in df.groupby(KEY)}


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN when either side is constant."""
    rx, ry = pd.Series(x).rank().to_numpy(), pd.Series(y).rank().to_numpy()
    if rx.std() == 0 or ry.std() == 0:
        return math.nan
    return float(np.corrcoef(rx, ry)[0, 1])


def thresholds(values: np.ndarray, n: int = 40) -> np.ndarray:
    """Candidate thresholds: ``n`` quantiles of the signal's values over the tuning runs (distinct)."""
    values = values[np.isfinite(values)]
    return np.unique(np.quantile(values, np.linspace(0.0, 1.0, n))) if values.size else np.array([])


def outcome(run: pd.DataFrame, rules: Sequence[AlarmRule]) -> dict:
    """A rule set on one run: the chosen evaluation, its gold, the regret, the alarm's lead on the gold peak."""
    history = run.to_dict("records")
    choice = chosen_index(history, rules)
    alarm = first_alarm(history, rules)
    peak = int(run["gold"].to_numpy().argmax())
    gold = run["gold"].to_numpy()
    return {"choice_step": int(run["step"][choice]), "gold_choice": float(gold[choice]),
            "regret": float(gold[peak] - gold[choice]), "alarm": alarm is not None,
            "lead_epochs": float(run["epoch"][peak] - run["epoch"][alarm]) if alarm is not None else math.nan,
            "lead_evals": float(peak - alarm) if alarm is not None else math.nan}


def tune(tuning: dict[tuple, pd.DataFrame], signals: Sequence[str] = tuple(SIGNALS)) -> pd.DataFrame:
    """For every signal, the threshold with the smallest mean regret on the tuning runs, best signal first. Ties
    (a range of thresholds with the same regret, common with few runs) go to the median of the tied thresholds: the
    farthest from both an earlier and a later alarm."""
    pooled = pd.concat(tuning.values())
    out = []
    for name in signals:
        if name not in pooled or pooled[name].isna().all():
            continue
        up = SIGNALS[name]
        grid = thresholds(pooled[name].to_numpy(dtype=float))
        regrets = np.array([np.mean([outcome(r, [AlarmRule(name, float(t), up)])["regret"] for r in tuning.values()])
                            for t in grid])
        if not len(grid):
            continue
        tied = grid[regrets <= regrets.min() + 1e-12]
        out.append({"signal": name, "above": up, "threshold": float(np.quantile(tied, 0.5, method="lower")),
                    "tuning_regret": float(regrets.min())})
    return pd.DataFrame(out).sort_values("tuning_regret", kind="stable").reset_index(drop=True)


def fixed_step(tuning: dict[tuple, pd.DataFrame]) -> int:
    """The no-monitor baseline: the step whose mean gold over the tuning runs is highest (stop there always)."""
    pooled = pd.concat(tuning.values())
    means = pooled.groupby("step")["gold"].mean()
    return int(means.idxmax())


def at_step(run: pd.DataFrame, step: int) -> float:
    """Gold at the last evaluation at or before ``step``."""
    return float(run[run["step"] <= step]["gold"].iloc[-1])


def analyse(table: pd.DataFrame, tune_seeds: Sequence[int], tune_beta: float,
            candidates: Sequence[str] = TRANSFERABLE) -> dict:
    """Everything the section reports (module docstring), as tables; the tested rule is the best of
    ``candidates`` on the tuning runs."""
    by_run = runs(table)
    tuning = {k: r for k, r in by_run.items() if k[1] == tune_beta and k[2] in set(tune_seeds)}
    tuned = tune(tuning)
    best = tuned[tuned["signal"].isin(list(candidates))].iloc[0]
    rule = AlarmRule(best["signal"], float(best["threshold"]), bool(best["above"]))
    stop_step = fixed_step(tuning)
    per_run = []
    for key, run in by_run.items():
        split = "tuning" if key in tuning else "held-out seeds" if key[1] == tune_beta else "held-out beta"
        gold = run["gold"].to_numpy()
        peak = int(gold.argmax())
        row = {"loss": key[0], "beta": key[1], "seed": key[2], "split": split, "peak_step": int(run["step"][peak]),
               "peak_epoch": float(run["epoch"][peak]), "gold_peak": float(gold[peak]), "gold_last": float(gold[-1]),
               "gold_start": float(gold[0]), "regret_last": float(gold[peak] - gold[-1]),
               "regret_fixed": float(gold[peak] - at_step(run, stop_step))}
        row.update({f"monitor_{k}": v for k, v in outcome(run, [rule]).items()})
        for name in tuned["signal"]:
            sig = tuned[tuned["signal"] == name].iloc[0]
            res = outcome(run, [AlarmRule(name, float(sig["threshold"]), bool(sig["above"]))])
            row[f"{name}:regret"], row[f"{name}:lead"] = res["regret"], res["lead_epochs"]
            row[f"{name}:rho"] = spearman(run[name].to_numpy(dtype=float), gold)
        per_run.append(row)
    per_run = pd.DataFrame(per_run)
    return {"rule": rule, "fixed_step": stop_step, "tuned": tuned, "per_run": per_run,
            "tests": tests(per_run), "signals": signal_table(per_run, tuned)}


def signal_table(per_run: pd.DataFrame, tuned: pd.DataFrame) -> pd.DataFrame:
    """Per signal: rank correlation with gold (mean over all runs), and on the test runs its own rule's regret and
    lead (epochs from the alarm to the gold peak; positive = before the peak), and how often it fired."""
    test = per_run[per_run["split"] != "tuning"]
    out = []
    for _, sig in tuned.iterrows():
        name = sig["signal"]
        rho = mean_se(per_run[f"{name}:rho"].dropna())
        lead = test[f"{name}:lead"]
        out.append({"signal": name, "rule": f"{name} {'>' if sig['above'] else '<'} {sig['threshold']:.3g}",
                    "rho_mean": rho[0], "rho_se": rho[1], "tuning_regret": sig["tuning_regret"],
                    "test_regret": float(test[f"{name}:regret"].mean()), "fired": float(lead.notna().mean()),
                    "lead_median": float(lead.median()) if lead.notna().any() else math.nan,
                    "before_peak": float((lead > 0).sum() / max(len(lead), 1))})
    return pd.DataFrame(out)


def tests(per_run: pd.DataFrame, alpha: float = 0.05) -> pd.DataFrame:
    """On each test group (loss, split): is the monitor's regret smaller than the last evaluation's, and than the
    fixed step's? One-sided paired t across seeds, Holm over the whole family."""
    out = []
    test = per_run[per_run["split"] != "tuning"]
    for (loss, beta, split), g in test.groupby(["loss", "beta", "split"]):
        g = g.sort_values("seed")
        for baseline in ("last", "fixed"):
            t = paired_t(g[f"regret_{baseline}"].to_numpy(), g["monitor_regret"].to_numpy(), alternative="greater")
            out.append({"loss": loss, "beta": beta, "split": split, "versus": baseline, "seeds": len(g),
                        "regret_monitor": float(g["monitor_regret"].mean()),
                        "regret_baseline": float(g[f"regret_{baseline}"].mean()), "difference": t.estimate,
                        "se": t.se, "p": t.p})
    df = pd.DataFrame(out)
    if len(df):
        df["p_holm"], df["passed"] = holm(df["p"].to_numpy(), alpha)
    return df


def number(x: float, spec: str = ".3f") -> str:
    """A table cell of a number (``format(x, spec)``), "n/a" where there is none (None or NaN)."""
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def signals_markdown(signals: pd.DataFrame) -> str:
    """``signal_table`` in markdown: each signal's tuned rule, rank correlation with gold, regrets and lead."""
    rows = [[s["signal"], f"`{s['rule']}`", f"{number(s['rho_mean'], '.2f')} +- {number(s['rho_se'], '.2f')}",
             number(s["tuning_regret"]), number(s["test_regret"]), f"{100 * s['fired']:.0f}%",
             number(s["lead_median"], ".2f"), f"{100 * s['before_peak']:.0f}%"] for _, s in signals.iterrows()]
    return markdown_table(["signal", "rule (tuned)", "rank corr. with gold", "tuning regret", "test regret",
                           "fired (test)", "median lead, epochs", "alarm before peak"], rows)


def regrets_markdown(per_run: pd.DataFrame) -> str:
    """Mean regret of the monitor, the last evaluation and the fixed step per (loss, beta, split)."""
    rows = [[loss, f"{beta:g}", split, len(g), number(g["gold_peak"].mean()), number(g["monitor_regret"].mean()),
             number(g["regret_last"].mean()), number(g["regret_fixed"].mean())]
            for (loss, beta, split), g in per_run.groupby(["loss", "beta", "split"])]
    return markdown_table(["loss", "beta", "split", "seeds", "gold peak", "monitor", "last evaluation",
                           "fixed step"], rows)


def tests_markdown(tested: pd.DataFrame) -> str:
    """``tests`` in markdown: one row per test group and baseline, Holm-adjusted p, shown or not."""
    rows = [[t["loss"], f"{t['beta']:g}", t["split"], t["versus"], t["seeds"], number(t["difference"]),
             number(t["se"]), number(t["p"], ".4f"), number(t["p_holm"], ".4f"), "yes" if t["passed"] else "not shown"]
            for _, t in tested.iterrows()]
    return markdown_table(["loss", "beta", "split", "versus", "seeds", "difference", "se", "p", "p (Holm)",
                           "shown"], rows)


def when_to_stop_section(table: pd.DataFrame, tune_seeds: Sequence[int] = (0, 1, 2, 3), tune_beta: float = 0.05,
                         alpha: float = 0.05, candidates: Sequence[str] = TRANSFERABLE) -> str:
    """The "When to stop" section of the demo report (markdown) from the validation rows (one per run and step).

    Numbers come from ``analyse``; each sentence that claims something is printed only when its Holm-corrected
    test passes; otherwise the section says the claim was not shown."""
    if table is None or not len(table):
        return ""
    res = analyse(table, tune_seeds, tune_beta, candidates)
    rule, per_run, tested = res["rule"], res["per_run"], res["tests"]
    n_runs, seeds = len(per_run), sorted(per_run["seed"].unique())
    lines = ["## When to stop: the overoptimization monitor against gold", "",
             f"A user has no gold reward; the monitor (`chipo.monitor`, `monitor=warn` in `chipo train`) sees only "
             f"the policy, pi_ref, held-out prompts and held-out preference pairs. Here its signals were recorded "
             f"beside the exact gold reward at {per_run.shape[0] and len(table) // n_runs} evaluations of each of "
             f"{n_runs} runs (losses {', '.join(sorted(per_run['loss'].unique()))}, betas "
             f"{', '.join(f'{b:g}' for b in sorted(per_run['beta'].unique()))}, seeds {seeds[0]}-{seeds[-1]}). "
             f"The alarm rule and its threshold were chosen on seeds {', '.join(map(str, tune_seeds))} at beta "
             f"{tune_beta:g} only (smallest mean regret among the signals that are fractions, so a threshold can "
             f"carry over to other models: {', '.join(candidates)}); every other run is a test run. Regret = gold "
             "at the gold peak (oracle early stopping) minus gold of the checkpoint kept (the evaluation before the "
             "first alarm).",
             "", f"**Chosen rule: `{rule.signal} {'>' if rule.above else '<'} {rule.threshold:.3g}`.** "
             f"Fixed-step baseline (no monitor; the step with the best mean gold on the tuning runs): step "
             f"{res['fixed_step']}.", "", signals_markdown(res["signals"]),
             "", "Regret of each stopping choice by group (gold units, mean over seeds):", "",
             regrets_markdown(per_run),
             "", f"Paired tests on the test runs (one-sided, the monitor's regret smaller; Holm over "
                 f"{len(tested)} comparisons, alpha {alpha:g}):", "", tests_markdown(tested)]
    shown = tested[tested["passed"]] if len(tested) else tested
    lines += [""]
    if len(shown):
        lines.append("Shown (after Holm): the monitor's checkpoint has less regret than "
                     + "; ".join(f"the {t['versus']} evaluation's for {t['loss']} at beta {t['beta']:g} "
                                 f"({t['split']})" for _, t in shown.iterrows()) + ".")
    else:
        lines.append("No comparison passed after Holm's correction: on these runs the monitor's choice is not shown "
                     "to beat training to the end or a fixed stopping step.")
    return "\n".join(lines) + "\n"
