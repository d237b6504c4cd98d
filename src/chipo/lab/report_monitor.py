"""The demo report's "When to stop" section: the overoptimization monitor's default alarm rule
(``chipo.monitor.alarm.DEFAULT_RULES``, the off-support rate) applied to the demo's own runs, against gold.

The rule was fixed before this run: it was chosen on the embedded world's runs at seeds 0-3, beta 0.05
(``chipo.lab.monitor_validation``; docs/monitor-validation). The demo's seeds draw the same preference data as those
runs, so the demo's runs split the same way: seeds 0-3 at beta 0.05 are in-sample (shown, not tested), seeds 4-7
at beta 0.05 are held-out seeds, every seed at the other beta is the held-out beta.

Per run, the evaluations are pi_ref (epoch 0) and the demo's evaluated epochs; every evaluation records the
off-support rate (``chipo.lab.evaluate``: the fraction of the policy's samples that pi_ref gives a log-prob below the
2% quantile of its own samples'). The monitor keeps the evaluation before its first alarm; its regret is exact gold
at the best evaluated epoch (oracle early stopping) minus exact gold of the kept one. Baselines: the last epoch, and
a fixed epoch (the one with the best mean gold on the in-sample runs). Tests: one-sided paired t across seeds (the
monitor's regret smaller), Holm over every held-out group and baseline (``chipo.lab.monitor_analysis.tests``).
"""

from __future__ import annotations

import pandas as pd

from chipo.lab.monitor_analysis import at_step, fixed_step, number, outcome, tests
from chipo.markdown import markdown_table
from chipo.monitor.alarm import DEFAULT_RULES

TUNED_SEEDS = (0, 1, 2, 3)
TUNED_BETA = 0.05
"""Where ``DEFAULT_RULES`` was chosen (``chipo.lab.monitor_validation``), so where the demo's runs are in-sample."""


def monitor_runs(df: pd.DataFrame, keys: dict) -> dict[tuple, pd.DataFrame]:
    """One frame per (loss, beta, seed): step = epoch, gold (the headline gold), off_support; pi_ref first."""
    if "off_support" not in df or df["off_support"].isna().all():
        return {}
    gold = keys["gold"]
    ref = df[df["loss"] == "pi_ref"]
    start = {"step": 0, "epoch": 0.0, "gold": float(ref[gold].iloc[0]),
             "off_support": float(ref["off_support"].iloc[0])}
    out = {}
    for (loss, beta, seed), g in df[df["loss"] != "pi_ref"].groupby(["loss", "beta", "seed"]):
        g = g.sort_values("epoch")
        rows = [start] + [{"step": int(e), "epoch": float(e), "gold": float(v), "off_support": float(o)}
                          for e, v, o in zip(g["epoch"], g[gold], g["off_support"])]
        out[(loss, float(beta), int(seed))] = pd.DataFrame(rows)
    return out


def per_run_regrets(runs: dict[tuple, pd.DataFrame]) -> tuple[pd.DataFrame, int]:
    """Regret of the monitor, the last epoch and the fixed epoch per run; the fixed epoch itself."""
    tuning = {k: r for k, r in runs.items() if k[1] == TUNED_BETA and k[2] in TUNED_SEEDS}
    stop = fixed_step(tuning) if tuning else max(int(r["step"].max()) for r in runs.values())
    rows = []
    for (loss, beta, seed), run in runs.items():
        split = "in-sample" if (loss, beta, seed) in tuning else "held-out seeds" if beta == TUNED_BETA \
            else "held-out beta"
        gold = run["gold"].to_numpy()
        peak = float(gold.max())
        res = outcome(run, list(DEFAULT_RULES))
        rows.append({"loss": loss, "beta": beta, "seed": seed, "split": split, "gold_peak": peak,
                     "regret_last": peak - float(gold[-1]), "regret_fixed": peak - at_step(run, stop),
                     "monitor_regret": res["regret"], "monitor_epoch": res["choice_step"],
                     "alarm": res["alarm"]})
    return pd.DataFrame(rows), stop


def regret_table(per_run: pd.DataFrame) -> str:
    """Mean regret of each stopping choice per (loss, beta, split), and how often the alarm fired."""
    rows = [[loss, f"{beta:g}", len(g), split, number(g["gold_peak"].mean()), number(g["monitor_regret"].mean()),
             number(g["regret_last"].mean()), number(g["regret_fixed"].mean()), f"{int(g['alarm'].sum())}/{len(g)}"]
            for (loss, beta, split), g in per_run.groupby(["loss", "beta", "split"])]
    return markdown_table(["loss", "beta", "runs", "split", "gold peak", "monitor", "last epoch", "fixed epoch",
                           "alarm fired"], rows)


def tests_table(tested: pd.DataFrame) -> str:
    """The held-out runs' paired tests (``chipo.lab.monitor_analysis.tests``), one row per group and baseline."""
    rows = [[t["loss"], f"{t['beta']:g}", t["split"], f"{t['versus']} epoch", t["seeds"], number(t["regret_monitor"]),
             number(t["regret_baseline"]), number(t["p"], ".2g"), number(t["p_holm"], ".2g"),
             "shown" if t["passed"] else "not shown"] for _, t in tested.iterrows()]
    return markdown_table(["loss", "beta", "split", "versus", "seeds", "regret: monitor", "baseline", "p",
                           "p (Holm)", "verdict"], rows)


def when_to_stop_lines(df: pd.DataFrame, keys: dict) -> list[str]:
    """The section (markdown lines); empty when the rows carry no off-support rate (an older sweep)."""
    runs = monitor_runs(df, keys)
    if not runs:
        return []
    per_run, stop = per_run_regrets(runs)
    rule = "; ".join(f"`{r.signal} {'>' if r.above else '<'} {r.threshold:g}`" for r in DEFAULT_RULES)
    out = ["## When to stop: the overoptimization monitor against gold", "",
           f"A user has no gold reward. chipo's monitor (`chipo train monitor=warn`, `chipo.monitor`) raises an alarm "
           f"by the gold-free rule {rule} (the off-support rate: the fraction of the policy's samples that pi_ref "
           "gives a log-prob below the 2% quantile of its own samples'), chosen before this run on other runs of this "
           "world (seeds 0-3, beta 0.05). Here it is applied to this demo's evaluations (pi_ref, then each evaluated "
           "epoch); the checkpoint it keeps is the evaluation before its first alarm. Regret = exact gold at the "
           "best evaluated epoch (oracle early stopping) minus exact gold of the kept checkpoint, in gold units. "
           f"Fixed-epoch baseline: epoch {stop} (best mean gold on the in-sample runs). The evaluations are coarse "
           "(the gold peak often lies between them), so these regrets are those of a user who evaluates this often.",
           "", regret_table(per_run)]
    tested = tests(per_run[per_run["split"] != "in-sample"])
    if not len(tested):
        return out + ["", "No held-out runs: nothing is tested."]
    out += ["", f"Paired tests on the held-out runs (one-sided: the monitor's regret is smaller; Holm over "
                f"{len(tested)} comparisons):", "", tests_table(tested)]
    shown = tested[tested["passed"]]
    out.append("")
    for _, t in shown.iterrows():
        out.append(f"- {t['loss']} at beta {t['beta']:g} ({t['split']}): stopping where the monitor says lost "
                   f"{number(t['regret_monitor'])} gold against oracle early stopping, less than the "
                   f"{number(t['regret_baseline'])} of the {t['versus']} epoch (p {t['p_holm']:.2g} after Holm).")
    if len(shown) < len(tested):
        out.append(f"- {len(tested) - len(shown)} of {len(tested)} comparisons are not shown at this seed count "
                   "(which does not mean the monitor is worse there).")
    return out


__all__ = ["TUNED_BETA", "TUNED_SEEDS", "monitor_runs", "per_run_regrets", "when_to_stop_lines"]
