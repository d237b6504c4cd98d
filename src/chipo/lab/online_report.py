"""The online lab's tables, plots and report section, from its ``results.jsonl`` (and the offline demo's rows,
drawn beside the online runs)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

import numpy as np

from chipo.io import atomic_write_text
from chipo.lab.experiments import template
from chipo.lab.online_protocol import COLORS, LABELS, METRICS, OnlineLabSettings
from chipo.lab.report_tables import fmt
from chipo.markdown import markdown_table


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


def summary_table(summary: list[dict]) -> str:
    """Mean ± s.e. over seeds per method, beta, labels (and epoch, for the offline rows)."""
    def pm(e, k, scale=1.0, digits=3):
        return fmt(e[k], e[f"{k}_se"], scale, digits)

    rows = [[LABELS[e["method"]], "" if e["beta"] is None else f"{e['beta']:g}", e["labels"], e["epoch"] or "",
             pm(e, "gold"), pm(e, "win_rate_vs_ref", 100, 1), pm(e, "kl", digits=2), pm(e, "mass_malformed", 100, 1),
             e["n"]] for e in summary]
    return markdown_table(["method", "beta", "labels", "epoch", "gold J (exact)", "win rate vs pi_ref, %",
                           "KL (partition)", "malformed mass, %", "seeds"], rows)


def settings_text(settings: OnlineLabSettings, budget: int) -> str:
    """The judge, the optimizer and what the offline rows are (``templates/online_settings.md``)."""
    return template("online_settings", scale=f"{settings.scale:g}", prompts_per_step=settings.prompts_per_step,
                    learning_rate=f"{settings.learning_rate:g}", max_new_tokens=settings.max_new_tokens,
                    alpha=f"{settings.alpha:g}", seeds=settings.seeds, budget=budget)


def write_outputs(rows: list[dict], out: Path, settings: OnlineLabSettings,
                  offline_results: list[dict] | None = None) -> list[str]:
    """``online_lab.md`` and the two plots from ``rows`` (and the offline demo's rows, if given)."""
    budget = max(r["labels"] for r in rows)
    summary = summarize(rows + offline_rows(offline_results or [], budget))
    files = plot(summary, out)
    text = [f"# {TITLE} ({budget} labels)", "", settings_text(settings, budget), "", summary_table(summary), ""]
    atomic_write_text(out / "online_lab.md", "\n".join(text + [f"![{f}]({f})" for f in files]) + "\n")
    return files


TITLE = "Online DPO / chiPO, XPO and chi-squared XPO on the embedded world"


def section(out: Path, link: str) -> str:
    """``online_lab.md`` as a section of another report: its title becomes the section's, figures linked through
    ``link`` (the online directory relative to that report)."""
    body = (out / "online_lab.md").read_text().split("\n", 1)[1]
    return "\n".join([template("online_section", link=link), "",
                      body.replace("](online_", f"]({link}/online_").strip("\n"), ""])


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
