"""The sweep report's figures (matplotlib, Agg backend), generic over the sweep's methods.

* ``winrate_vs_epochs.png``: gold win rate against pi_ref vs epochs, a panel per beta, each method's points
  shifted slightly sideways so error bars (standard error over seeds) do not overlap;
* ``gold_vs_sqrt_kl.png``: gold reward vs sqrt(KL) along training (Gao et al. 2023, arXiv 2210.10760), a panel
  per beta, error bars in both directions; marker size grows with the epoch and only the last point is labelled;
  with exact metrics a second row uses the Monte-Carlo KL beside the partition KL;
* ``divergence_vs_epochs.png``: KL (nats; with exact metrics the partition's and the Monte-Carlo one) and
  chi-squared from pi_ref vs epochs, log scale, with units;
* ``mechanism_beta<b>.png``: per method, where the probability mass goes over training (the training pairs'
  chosen responses, their rejected responses, every other response of the language, text outside it), the
  fraction of training pairs at the loss's clip, and implicit-reward accuracy on training vs held-out pairs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from chipo.lab import tables

PALETTE = ["tab:red", "tab:blue", "tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive",
           "tab:cyan", "tab:gray"]
MASS_LABELS = {"mass_chosen": "chosen responses of the training pairs",
               "mass_rejected": "rejected responses (never chosen)",
               "mass_other_language": "every other response of the language",
               "mass_out_of_language": "text outside the language (gold 0)"}
MASS_COLORS = ["tab:green", "tab:red", "tab:blue", "tab:gray"]


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def colors(method_names: list[str]) -> dict[str, str]:
    return {m: PALETTE[i % len(PALETTE)] for i, m in enumerate(method_names)}


def _beta_text(beta: float) -> str:
    return f"{beta:g}".replace(".", "p")


def plot_all(df: pd.DataFrame, keys: dict, out: Path) -> list[str]:
    """Every figure of the module docstring that the data allow; returns the file names."""
    runs = tables.with_start(df)
    files = [winrate_vs_epochs(runs, keys, out), gold_vs_sqrt_kl(runs, keys, out), divergence_vs_epochs(runs, keys,
                                                                                                          out)]
    if "mass.mass_chosen" in runs:
        files += [mechanism(runs, beta, out) for beta in tables.betas(runs)]
    return files


def winrate_vs_epochs(runs: pd.DataFrame, keys: dict, out: Path) -> str:
    plt = _plt()
    names, betas = tables.methods(runs), tables.betas(runs)
    epochs = sorted({int(e) for e in runs["epoch"]})
    pos = {e: i for i, e in enumerate(epochs)}  # 0, 1, 2, 4, ...: equal spacing reads better
    agg = tables.aggregate(runs, [keys["win"]])
    col = colors(names)
    fig, axes = plt.subplots(1, len(betas), figsize=(max(5.5 * len(betas), 7.5), 4.6), squeeze=False, sharey=True)
    width = 0.5 / max(len(names), 1)
    for ax, beta in zip(axes[0], betas):
        for i, m in enumerate(names):
            g = agg[(agg["method"] == m) & (agg["beta"] == beta)].sort_values("epoch")
            x = np.array([pos[e] for e in g["epoch"]]) + (i - (len(names) - 1) / 2) * width
            ax.errorbar(x, g[keys["win"]], yerr=np.nan_to_num(g[f"{keys['win']}_se"]), label=m, marker="o",
                        ms=4, capsize=2, color=col[m], lw=1.2)
        ax.axhline(0.5, color="grey", ls="--", lw=1)
        ax.set_xticks(range(len(epochs)), [str(e) for e in epochs])
        ax.set_title(f"beta = {beta:g}")
        ax.set_xlabel("training epochs (0 = pi_ref)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("gold win rate vs pi_ref" + (" (exact)" if keys["exact"] else " (sampled)"))
    axes[0][-1].legend(fontsize=8, loc="lower left")
    fig.suptitle("Win rate against pi_ref under the gold reward\n(mean ± s.e. over seeds; 0.5 = pi_ref)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "winrate_vs_epochs.png", dpi=100)
    plt.close(fig)
    return "winrate_vs_epochs.png"


def gold_vs_sqrt_kl(runs: pd.DataFrame, keys: dict, out: Path) -> str:
    """One row of panels per distance: the headline KL and, when that is the partition KL, the Monte-Carlo KL
    (k3) below it, since the partition KL understates the distance of mass that leaves the language."""
    plt = _plt()
    names, betas = tables.methods(runs), tables.betas(runs)
    distances = [(keys["kl"], keys["kl_name"])]
    if keys["exact"] and "kl_k3" in runs and keys["kl"] != "kl_k3":
        distances.append(("kl_k3", "Monte-Carlo KL (k3 on the policy's samples: the KL of responses as sampled)"))
    col = colors(names)
    fig, axes = plt.subplots(len(distances), len(betas), figsize=(max(5.5 * len(betas), 7.5), 4.4 * len(distances)),
                             squeeze=False, sharey=True)
    for row, (kl, kl_name) in enumerate(distances):
        agg = tables.aggregate(runs.assign(sqrt_kl=np.sqrt(runs[kl].astype(float).clip(lower=0))),
                               [keys["gold"], "sqrt_kl"])
        for ax, beta in zip(axes[row], betas):
            for i, m in enumerate(names):
                g = agg[(agg["method"] == m) & (agg["beta"] == beta)].sort_values("epoch")
                if g.empty:
                    continue
                ax.errorbar(g["sqrt_kl"], g[keys["gold"]], xerr=np.nan_to_num(g["sqrt_kl_se"]),
                            yerr=np.nan_to_num(g[f"{keys['gold']}_se"]), color=col[m], lw=1, capsize=2, label=m,
                            marker="none")
                sizes = 12 + 60 * np.arange(len(g)) / max(len(g) - 1, 1)
                ax.scatter(g["sqrt_kl"], g[keys["gold"]], s=sizes, color=col[m], zorder=3)
                last = g.iloc[-1]
                ax.annotate(f"ep {int(last['epoch'])}", (last["sqrt_kl"], last[keys["gold"]]),
                            textcoords="offset points", xytext=(5, -9 - 7 * (i % 3)), fontsize=7,
                            color=col[m])  # staggered: no pile-up
            ax.set_title(f"beta = {beta:g}")
            ax.set_xlabel(f"sqrt(KL(pi || pi_ref)) [nats^1/2]\n{kl_name}", fontsize=9)
            ax.grid(alpha=0.3)
        axes[row][0].set_ylabel("gold reward" + (" (exact)" if keys["exact"] else " (sampled)"))
    axes[0][-1].legend(fontsize=8)
    fig.suptitle("Gold reward vs distance from pi_ref along training\n(mean ± s.e. over seeds; marker size grows "
                 "with the epoch, the last is labelled)", fontsize=11)
    fig.tight_layout()
    fig.savefig(out / "gold_vs_sqrt_kl.png", dpi=100)
    plt.close(fig)
    return "gold_vs_sqrt_kl.png"


def divergence_vs_epochs(runs: pd.DataFrame, keys: dict, out: Path) -> str:
    plt = _plt()
    names, betas = tables.methods(runs), tables.betas(runs)
    epochs = sorted({int(e) for e in runs["epoch"] if e > 0})
    pos = {e: i for i, e in enumerate(epochs)}
    what = [(keys["kl"], f"KL(pi || pi_ref) [nats]\n{keys['kl_name']}")]
    if keys["exact"] and "kl_k3" in runs and keys["kl"] != "kl_k3":  # beside the partition's lower bound
        what.append(("kl_k3", "KL(pi || pi_ref) [nats]\nMonte-Carlo k3 on the policy's samples"))
    chi2_kind = "over the partition of responses (a lower bound)" if keys["exact"] else "Monte-Carlo (heavy-tailed)"
    what.append((keys["chi2"], f"chi-squared(pi || pi_ref) [dimensionless]\n{chi2_kind}"))
    agg = tables.aggregate(runs[runs["epoch"] > 0], [name for name, _ in what])
    col = colors(names)
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, len(what), figsize=(5.5 * len(what), 4.2))
    for ax, (name, label) in zip(axes, what):
        for m in names:
            for j, beta in enumerate(betas):
                g = agg[(agg["method"] == m) & (agg["beta"] == beta)].sort_values("epoch")
                ax.errorbar([pos[e] for e in g["epoch"]], g[name].clip(lower=1e-6), yerr=np.nan_to_num(g[f"{name}_se"]),
                            marker="o", ms=3, ls=styles[j % len(styles)], color=col[m], capsize=2,
                            label=f"{m}, beta {beta:g}")
        ax.set_yscale("log")
        ax.set_xticks(range(len(epochs)), [str(e) for e in epochs])
        ax.set_xlabel("training epochs")
        ax.set_ylabel(label, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7, ncol=2)
    fig.suptitle("Distance from pi_ref over training (mean ± s.e. over seeds, log scale)")
    fig.tight_layout()
    fig.savefig(out / "divergence_vs_epochs.png", dpi=100)
    plt.close(fig)
    return "divergence_vs_epochs.png"


def mechanism(runs: pd.DataFrame, beta: float, out: Path) -> str:
    """Top row: stacked probability mass (mean over seeds) per method; bottom row: clip fraction and implicit
    accuracy on training vs held-out pairs."""
    plt = _plt()
    names = tables.methods(runs)
    sel = runs[runs["beta"] == beta]
    parts = [f"mass.{p}" for p in tables.MASS_PARTS]
    agg = tables.aggregate(sel, parts + ["clip_frac", "train_acc_exact", "implicit_acc"])
    fig, axes = plt.subplots(2, len(names), figsize=(max(3.2 * len(names), 7.5), 7.4), squeeze=False, sharey="row")
    for i, m in enumerate(names):
        g = agg[agg["method"] == m].sort_values("epoch")
        x = np.arange(len(g))
        ax = axes[0][i]
        ax.stackplot(x, *[np.nan_to_num(g[p]) for p in parts], colors=MASS_COLORS,
                     labels=[MASS_LABELS[p] for p in tables.MASS_PARTS], alpha=0.85)
        ax.set_title(m, fontsize=10)
        ax.set_ylim(0, 1)
        ax.set_xticks(x, [str(int(e)) for e in g["epoch"]], fontsize=8)
        ax = axes[1][i]
        for name, label, color in (("train_acc_exact", "implicit acc, training pairs", "tab:green"),
                                   ("implicit_acc", "implicit acc, held-out pairs", "tab:blue"),
                                   ("clip_frac", "pairs at the clip (no gradient)", "tab:red")):
            ax.errorbar(x, g[name], yerr=np.nan_to_num(g[f"{name}_se"]), marker="o", ms=3, capsize=2, color=color,
                        label=label)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xticks(x, [str(int(e)) for e in g["epoch"]], fontsize=8)
        ax.set_xlabel("training epochs (0 = pi_ref)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("probability mass on training prompts")
    axes[1][0].set_ylabel("fraction of pairs")
    for row, anchor in ((0, 0.045), (1, 0.0)):
        handles, labels = axes[row][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc="lower center", ncol=2 if row == 0 else 3, fontsize=8,
                   bbox_to_anchor=(0.5, anchor), frameon=False)
    fig.suptitle(f"Where the policy's probability goes (top) and what the training loss sees (bottom)\n"
                 f"beta {beta:g}, mean over seeds; training prompts", fontsize=11)
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    name = f"mechanism_beta{_beta_text(beta)}.png"
    fig.savefig(out / name, dpi=100)
    plt.close(fig)
    return name
