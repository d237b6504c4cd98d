"""The sweep report: ``report.md``, PNG plots, and the raw results as JSON and CSV.

Every number in the report is computed here from the sweep's ``results.jsonl`` (and the run metadata in
``meta.json`` when a demo wrote one); nothing is typed in by hand. Plots (matplotlib, Agg backend):

* ``winrate_vs_epochs.png``: gold win rate against pi_ref vs training epochs, one panel per beta, every loss on the
  same axes, error bars = standard error over seeds (the seed's and the paper's Table-1 view);
* ``gold_vs_sqrt_kl.png``: gold reward vs d = sqrt(KL(pi || pi_ref)) along training (Gao et al. 2023,
  arXiv 2210.10760, who fit R(d) = d (a - b log d) for RL);
* ``divergence_vs_epochs.png``: KL and chi-squared from pi_ref vs epochs (log scale).

The table in the layout of the paper's Table 1 (arXiv 2407.13399; field notes section 1) lists, per beta and
epoch, "chiPO vs DPO" gold win rates in percent. The report is written to a temporary directory and renamed into
place, so a reader never sees half a report.
"""

from __future__ import annotations

import csv
import io
import math
import os
from collections import defaultdict
from pathlib import Path

import numpy as np

from chipo.lab.generate import write_json
from chipo.lab.sweep import read_results
from chipo.train.io import atomic_directory

LOSS_LABELS = {"dpo": "DPO", "chipo": "chiPO", "pi_ref": "pi_ref"}
LOSS_COLORS = {"dpo": "tab:red", "chipo": "tab:blue"}


def _label(loss: str) -> str:
    return LOSS_LABELS.get(loss, loss)


def metric(row: dict, name: str) -> float:
    """A metric of a result row; ``exact.<name>`` reads the exact block. Missing values are nan."""
    if name.startswith("exact."):
        value = (row.get("exact") or {}).get(name[6:])
    else:
        value = row.get(name)
    return float(value) if value is not None else math.nan


def primary(rows: list[dict]) -> dict[str, str]:
    """Which column is the headline for each quantity: exact when every row has it, else Monte Carlo."""
    exact = bool(rows) and all(r.get("exact") for r in rows)
    return {"win": "exact.win_rate_vs_ref" if exact else "win_rate_vs_ref",
            "gold": "exact.gold" if exact else "gold_mean",
            "kl": "kl_k3", "chi2": "exact.chi2" if exact else "chi2_mc", "exact": exact}


def aggregate(rows: list[dict], names: list[str]) -> dict:
    """{(loss, beta, epoch): {name: (mean, se, n)}} over seeds; pi_ref (epoch 0) under every (loss, beta)."""
    groups: dict[tuple, list[dict]] = defaultdict(list)
    ref_rows = [r for r in rows if r["loss"] == "pi_ref"]
    cells = {(r["loss"], r["beta"]) for r in rows if r["loss"] != "pi_ref"}
    for r in rows:
        if r["loss"] != "pi_ref":
            groups[(r["loss"], r["beta"], r["epoch"])].append(r)
    for loss, beta in cells:
        groups[(loss, beta, 0)] = ref_rows
    out = {}
    for key, members in groups.items():
        stats = {}
        for name in names:
            values = np.array([metric(m, name) for m in members])
            values = values[~np.isnan(values)]
            if values.size == 0:
                stats[name] = (math.nan, math.nan, 0)
            else:
                se = float(values.std(ddof=1) / math.sqrt(values.size)) if values.size > 1 else math.nan
                stats[name] = (float(values.mean()), se, int(values.size))
        out[key] = stats
    return out


def _fmt(mean: float, se: float = math.nan, scale: float = 1.0, digits: int = 1) -> str:
    if math.isnan(mean):
        return "n/a"
    text = f"{mean * scale:.{digits}f}"
    if not math.isnan(se):
        text += f" ± {se * scale:.{digits}f}"
    return text


def _fmt_g(mean: float, se: float = math.nan) -> str:
    if math.isnan(mean):
        return "n/a"
    text = f"{mean:.3g}"
    if not math.isnan(se):
        text += f" ± {se:.2g}"
    return text


# ---------------------------------------------------------------------------------------------------- plots


def plot_all(rows: list[dict], agg: dict, keys: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    losses = sorted({k[0] for k in agg})
    betas = sorted({k[1] for k in agg}, reverse=True)
    epochs = sorted({k[2] for k in agg})
    pos = {e: i for i, e in enumerate(epochs)}  # epochs are 0, 1, 2, 4, ...: equal spacing reads better
    files = []

    fig, axes = plt.subplots(1, len(betas), figsize=(5 * len(betas), 4), squeeze=False, sharey=True)
    for ax, beta in zip(axes[0], betas):
        for loss in losses:
            es = [e for e in epochs if (loss, beta, e) in agg]
            m = [agg[(loss, beta, e)][keys["win"]][0] for e in es]
            s = [agg[(loss, beta, e)][keys["win"]][1] for e in es]
            ax.errorbar([pos[e] for e in es], m, yerr=np.nan_to_num(s), label=_label(loss), marker="o", capsize=3,
                        color=LOSS_COLORS.get(loss))
        ax.axhline(0.5, color="grey", ls="--", lw=1, label="pi_ref (0.5)")
        ax.set_xticks(range(len(epochs)), [str(e) for e in epochs])
        ax.set_title(f"beta = {beta:g}")
        ax.set_xlabel("epochs")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("gold win rate vs pi_ref" + (" (exact)" if keys["exact"] else " (sampled)"))
    axes[0][0].legend()
    fig.suptitle("Win rate against pi_ref under the gold reward (mean ± s.e. over seeds)")
    fig.tight_layout()
    fig.savefig(out / "winrate_vs_epochs.png", dpi=110)
    plt.close(fig)
    files.append("winrate_vs_epochs.png")

    fig, ax = plt.subplots(figsize=(6, 4.5))
    styles = ["-", "--", ":", "-."]
    for loss in losses:
        for j, beta in enumerate(betas):
            es = [e for e in epochs if (loss, beta, e) in agg]
            x = [math.sqrt(max(agg[(loss, beta, e)]["kl_k3"][0], 0.0)) for e in es]
            y = [agg[(loss, beta, e)][keys["gold"]][0] for e in es]
            ax.plot(x, y, marker="o", ls=styles[j % len(styles)], color=LOSS_COLORS.get(loss),
                    label=f"{_label(loss)}, beta {beta:g}")
            for xi, yi, e in zip(x, y, es):
                ax.annotate(str(e), (xi, yi), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xlabel("sqrt(KL(pi || pi_ref))  (Monte-Carlo, nats^1/2)")
    ax.set_ylabel("gold reward" + (" (exact)" if keys["exact"] else " (sampled)"))
    ax.set_title("Gold reward vs sqrt(KL) (Gao et al. 2023); labels = epochs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "gold_vs_sqrt_kl.png", dpi=110)
    plt.close(fig)
    files.append("gold_vs_sqrt_kl.png")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, name, title in ((axes[0], "kl_k3", "KL(pi || pi_ref) (Monte-Carlo)"),
                            (axes[1], keys["chi2"], "chi-squared(pi || pi_ref)" +
                             (" (over the partition: lower bound)" if keys["exact"] else " (Monte-Carlo)"))):
        for loss in losses:
            for j, beta in enumerate(betas):
                es = [e for e in epochs if (loss, beta, e) in agg and e > 0]
                y = [max(agg[(loss, beta, e)][name][0], 1e-6) for e in es]
                ax.plot([pos[e] for e in es], y, marker="o", ls=styles[j % len(styles)],
                        color=LOSS_COLORS.get(loss), label=f"{_label(loss)}, beta {beta:g}")
        ax.set_yscale("log")
        ax.set_xticks(range(len(epochs)), [str(e) for e in epochs])
        ax.set_xlabel("epochs")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "divergence_vs_epochs.png", dpi=110)
    plt.close(fig)
    files.append("divergence_vs_epochs.png")
    return files


# ---------------------------------------------------------------------------------------------------- tables


def table1(agg: dict, keys: dict) -> str:
    """Rows beta, columns epochs, cells 'chiPO vs DPO' win rates in percent (the paper's Table 1 layout)."""
    betas = sorted({k[1] for k in agg}, reverse=True)
    epochs = sorted({k[2] for k in agg if k[2] > 0})
    head = "| beta | " + " | ".join(f"epochs {e} (chiPO vs DPO)" if i == 0 else f"{e}"
                                      for i, e in enumerate(epochs)) + " |"
    lines = [head, "|" + "---|" * (len(epochs) + 1)]
    for beta in betas:
        cells = []
        for e in epochs:
            c = agg.get(("chipo", beta, e), {}).get(keys["win"], (math.nan, math.nan, 0))
            d = agg.get(("dpo", beta, e), {}).get(keys["win"], (math.nan, math.nan, 0))
            cells.append(f"{_fmt(c[0], scale=100)} vs {_fmt(d[0], scale=100)}")
        lines.append(f"| {beta:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def metrics_table(agg: dict, keys: dict) -> str:
    cols = [("win rate vs pi_ref %", keys["win"], "pct"), ("sampled win %", "win_rate_vs_ref", "pct"),
            ("win vs reference %", "exact.win_rate_vs_reference" if keys["exact"] else "win_rate_vs_reference",
             "pct"),
            ("gold reward", keys["gold"], "g"), ("KL (MC k3)", "kl_k3", "g"), ("KL (MC k1)", "kl_k1", "g"),
            ("chi2 (MC)", "chi2_mc", "g")]
    if keys["exact"]:
        cols += [("KL (exact, partition)", "exact.kl", "g"), ("chi2 (exact, partition)", "exact.chi2", "g"),
                 ("malformed mass %", "exact.mass_malformed", "pct")]
    cols += [("length", "length_mean", "g"), ("implicit acc held-out %", "implicit_acc", "pct"),
             ("train acc %", "train_acc", "pct")]
    lines = ["| loss | beta | epoch | " + " | ".join(c[0] for c in cols) + " |",
             "|" + "---|" * (len(cols) + 3)]
    for key in sorted(agg, key=lambda k: (-k[1], k[0], k[2])):
        loss, beta, epoch = key
        if epoch == 0 and loss != sorted({k[0] for k in agg})[0]:
            continue
        cells = []
        for _, name, kind in cols:
            m, s, _ = agg[key].get(name, (math.nan, math.nan, 0))
            cells.append(_fmt(m, s, 100, 1) if kind == "pct" else _fmt_g(m, s))
        label = "pi_ref" if epoch == 0 else _label(loss)
        lines.append(f"| {label} | {'' if epoch == 0 else f'{beta:g}'} | {epoch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------- claims


def claim_checks(agg: dict, keys: dict) -> list[str]:
    """The seed's claims, checked mechanically on the numbers (2 standard errors over seeds as the yardstick)."""
    lines = []
    betas = sorted({k[1] for k in agg})
    epochs = sorted({k[2] for k in agg if k[2] > 0})
    if not epochs or not {"dpo", "chipo"} <= {k[0] for k in agg}:
        return ["(the claims compare DPO and chiPO; this sweep does not have both)"]
    first, last = epochs[0], epochs[-1]

    def w(loss, beta, e):
        return agg[(loss, beta, e)][keys["win"]]

    def diff_sig(a, b):
        """a - b and whether it exceeds 2 combined standard errors (None: no standard error, e.g. one seed)."""
        d = a[0] - b[0]
        se = math.sqrt(np.nan_to_num(a[1]) ** 2 + np.nan_to_num(b[1]) ** 2)
        return d, (abs(d) > 2 * se if se > 0 else None)

    def fall(drop, sig):
        """The change from the peak to the last epoch, with its significance stated (not rounded to a verdict)."""
        if drop <= 0:
            return "no fall"
        size = f"a fall of {drop * 100:.1f} points"
        if sig is None:
            return f"{size} (one seed: no significance test)"
        return f"{size}, {'significant' if sig else 'not significant'} at 2 standard errors"

    for beta in betas:
        dpo_best_e = max(epochs, key=lambda e: w("dpo", beta, e)[0])
        chipo_best_e = max(epochs, key=lambda e: w("chipo", beta, e)[0])
        d_drop, d_sig = diff_sig(w("dpo", beta, dpo_best_e), w("dpo", beta, last))
        c_drop, c_sig = diff_sig(w("chipo", beta, chipo_best_e), w("chipo", beta, last))
        gap, gap_sig = diff_sig(w("chipo", beta, last), w("dpo", beta, last))
        gap_verdict = ("one seed: no significance test" if gap_sig is None
                       else "significant at 2 s.e." if gap_sig else "not significant at 2 s.e.")
        lines.append(
            f"- beta {beta:g}: DPO's win rate peaks at {_fmt(w('dpo', beta, dpo_best_e)[0], scale=100)}% (epoch "
            f"{dpo_best_e}) and ends at {_fmt(w('dpo', beta, last)[0], scale=100)}% (epoch {last}): "
            f"{fall(d_drop, d_sig)}. chiPO peaks at "
            f"{_fmt(w('chipo', beta, chipo_best_e)[0], scale=100)}% (epoch {chipo_best_e}) and ends at "
            f"{_fmt(w('chipo', beta, last)[0], scale=100)}%: "
            f"{fall(c_drop, c_sig)}. At epoch {last} chiPO - DPO = "
            f"{gap * 100:+.1f} points ({gap_verdict}).")
        kl_below = sum(agg[("chipo", beta, e)]["kl_k3"][0] < agg[("dpo", beta, e)]["kl_k3"][0] for e in epochs)
        chi_below = sum(agg[("chipo", beta, e)][keys["chi2"]][0] < agg[("dpo", beta, e)][keys["chi2"]][0]
                        for e in epochs)
        lines.append(f"  chiPO's KL is below DPO's at {kl_below} of {len(epochs)} epochs, its chi-squared at "
                     f"{chi_below} of {len(epochs)} (KL at epoch {last}: chiPO "
                     f"{_fmt_g(agg[('chipo', beta, last)]['kl_k3'][0])} vs DPO "
                     f"{_fmt_g(agg[('dpo', beta, last)]['kl_k3'][0])}; chi-squared: chiPO "
                     f"{_fmt_g(agg[('chipo', beta, last)][keys['chi2']][0])} vs DPO "
                     f"{_fmt_g(agg[('dpo', beta, last)][keys['chi2']][0])}).")
    small = betas[0]
    gaps = {b: w("chipo", b, last)[0] - w("dpo", b, last)[0] for b in betas}
    if len(betas) > 1:
        verdict = ("larger at the smaller beta, as the seed says" if gaps[small] > gaps[betas[-1]]
                   else "not larger at the smaller beta")
        lines.append(f"- The gap at epoch {last} is {gaps[small] * 100:+.1f} points at beta {small:g} and "
                     f"{gaps[betas[-1]] * 100:+.1f} at beta {betas[-1]:g}: {verdict}.")
    first_gap = w("chipo", small, first)[0] - w("dpo", small, first)[0]
    lines.append(f"- At beta {small:g} the gap grows from {first_gap * 100:+.1f} points at epoch {first} to "
                 f"{gaps[small] * 100:+.1f} at epoch {last}"
                 f"{' (it grows with training, as the seed says)' if gaps[small] > first_gap else ''}.")
    return lines


# ---------------------------------------------------------------------------------------------------- the report


def write_report(sweep_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 meta: dict | None = None, analysis: str | None = None) -> Path:
    """Write ``report.md``, plots, ``results.json`` and ``results.csv`` into ``out_dir`` (default sweep/report)."""
    sweep_dir = Path(sweep_dir)
    rows = read_results(sweep_dir / "results.jsonl")
    if not rows:
        raise FileNotFoundError(f"{sweep_dir / 'results.jsonl'}: no results to report")
    if meta is None and (sweep_dir / "meta.json").is_file():
        import json

        meta = json.loads((sweep_dir / "meta.json").read_text())
    meta = meta or {}
    keys = primary(rows)
    names = ["win_rate_vs_ref", "win_rate_vs_reference", "gold_mean", "kl_k1", "kl_k3", "chi2_mc", "length_mean",
             "implicit_acc", "train_acc", "exact.win_rate_vs_ref", "exact.win_rate_vs_reference", "exact.gold",
             "exact.kl", "exact.chi2", "exact.mass_malformed"]
    agg = aggregate(rows, names)
    final = Path(out_dir) if out_dir is not None else sweep_dir / "report"
    with atomic_directory(final) as tmp:
        plots = plot_all(rows, agg, keys, tmp)
        write_json(tmp / "results.json", {"rows": rows, "aggregate": [
            {"loss": k[0], "beta": k[1], "epoch": k[2], **{n: {"mean": v[0], "se": v[1], "n": v[2]}
                                                          for n, v in stats.items()}}
            for k, stats in sorted(agg.items(), key=lambda kv: (kv[0][0], -kv[0][1], kv[0][2]))], "meta": meta})
        (tmp / "results.csv").write_text(rows_to_csv(rows))
        (tmp / "report.md").write_text(render_markdown(rows, agg, keys, plots, meta, analysis))
    return final / "report.md"


def per_seed_table(rows: list[dict], keys: dict) -> str:
    epochs = sorted({r["epoch"] for r in rows if r["epoch"] > 0})
    runs = sorted({(r["loss"], r["beta"], r["seed"]) for r in rows if r["loss"] != "pi_ref"},
                  key=lambda k: (-k[1], k[0], k[2]))
    lines = ["| loss | beta | seed | " + " | ".join(f"epoch {e}" for e in epochs) + " |",
             "|" + "---|" * (len(epochs) + 3)]
    for loss, beta, seed in runs:
        values = {r["epoch"]: metric(r, keys["win"]) for r in rows
                  if r["loss"] == loss and r["beta"] == beta and r["seed"] == seed}
        lines.append(f"| {_label(loss)} | {beta:g} | {seed} | "
                     + " | ".join(_fmt(values.get(e, math.nan), scale=100) for e in epochs) + " |")
    return "\n".join(lines)


def rows_to_csv(rows: list[dict]) -> str:
    flat = []
    for r in rows:
        f = {k: v for k, v in r.items() if not isinstance(v, (dict, list))}
        f.update({f"exact.{k}": v for k, v in (r.get("exact") or {}).items()})
        f.update({f"sampling.{k}": v for k, v in (r.get("sampling") or {}).items()})
        flat.append(f)
    columns = list(dict.fromkeys(k for f in flat for k in f))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns)
    writer.writeheader()
    writer.writerows(flat)
    return buf.getvalue()


def render_markdown(rows, agg, keys, plots, meta, analysis) -> str:
    seeds = sorted({r["seed"] for r in rows if r.get("seed") is not None})
    betas = sorted({r["beta"] for r in rows if r.get("beta") is not None}, reverse=True)
    losses = sorted({r["loss"] for r in rows if r["loss"] != "pi_ref"})
    sampling = next((r.get("sampling") for r in rows if r.get("sampling")), {})
    ref = next((r for r in rows if r["loss"] == "pi_ref"), None)
    config = meta.get("sweep_config", {})
    out = [f"# {meta.get('title', 'chipo overoptimization lab report')}", ""]
    if meta.get("summary"):
        out += [meta["summary"], ""]
    out += ["## Setup", ""]
    for key, value in meta.get("setup", {}).items():
        out.append(f"- {key}: {value}")
    out += [f"- losses: {', '.join(_label(x) for x in losses)}; betas: {', '.join(f'{b:g}' for b in betas)}; "
            f"seeds: {', '.join(map(str, seeds))}; evaluated epochs: "
            f"{', '.join(str(e) for e in sorted({r['epoch'] for r in rows}))} (0 = pi_ref)"]
    if config:
        out.append(f"- training: constant learning rate {config.get('learning_rate')}, batch "
                   f"{config.get('batch_size')} pairs, AdamW, r_max {config.get('r_max')!s} (chiPO's margin clip), "
                   f"reference log-probs precomputed and cached")
    if ref:
        out.append(f"- evaluation: {ref['n_prompts']} held-out prompts x {ref['n_samples'] // max(ref['n_prompts'], 1)}"
                   f" samples per policy; sampling {sampling}")
    out.append("- headline numbers: " + ("exact gold reward and win rates over a partition of all responses; chi2 "
                                         "over that partition (a lower bound); KL Monte-Carlo" if keys["exact"]
                                         else "sampled (Monte-Carlo)") + "; every column is in the tables below")
    out += ["", "## Result in the layout of the paper's Table 1", "",
            f"Gold win rate against pi_ref, percent, mean over {len(seeds)} seed(s): chiPO vs DPO.", "",
            table1(agg, keys), "", "## What the numbers say about the seed's claims", ""]
    out += claim_checks(agg, keys)
    if analysis:
        out += ["", "## Analysis", "", analysis]
    out += ["", "## Per seed", "", "Gold win rate against pi_ref (%) of every run, so the spread behind the means "
            "is visible.", "", per_seed_table(rows, keys)]
    out += ["", "## Plots", ""]
    out += [f"![{p}]({p})" for p in plots]
    out += ["", "## All metrics (mean ± standard error over seeds)", "", metrics_table(agg, keys), "",
            "Notes: win rates count ties as 1/2. KL (MC k3) is `chipo.divergences.KL.estimate_from_policy` "
            "(E_pi[1/z - 1 + log z]); KL (MC k1) the mean log-ratio. chi2 uses the seed's 1/2 convention. ",
            "Caveat on chi2 (MC): " + CHI2_NOTE]
    if keys["exact"]:
        out += ["Exact columns use a partition of all responses on whose cells the gold reward is constant (every "
                "response of up to L letters, and lumped cells for longer or non-letter continuations): gold reward "
                "and win rates are exact; KL and chi2 over the partition are lower bounds of the full-sequence "
                "values (data-processing inequality), tight except inside the lumped cells. Malformed mass = "
                "probability of text outside the language (gold reward 0)."]
    last_epoch = max(x["epoch"] for x in rows)
    examples = [r for r in rows if r.get("examples") and r["epoch"] == last_epoch and r["seed"] == min(seeds)]
    if examples or ref:
        out += ["", "## Sample responses (first held-out prompts; gold reward in brackets)", ""]
        for r in ([ref] if ref else []) + sorted(examples, key=lambda r: (-r["beta"], r["loss"])):
            who = "pi_ref" if r["loss"] == "pi_ref" else f"{_label(r['loss'])} beta {r['beta']:g} epoch {r['epoch']}"
            shown = "; ".join(f"`{e['prompt']}` -> `{e['response'] or '(empty)'}` ({e['gold']:.2f})"
                              for e in (r.get("examples") or [])[:4])
            out.append(f"- {who} (seed {r['seed']}): {shown}")
    out += ["", "## Machine, versions, time", ""]
    for key, value in meta.get("machine", {}).items():
        out.append(f"- {key}: {value}")
    for key, value in meta.get("timing", {}).items():
        out.append(f"- {key}: {value}")
    out += ["", "Raw results: `results.json`, `results.csv` (one row per loss, beta, seed, epoch)."]
    return "\n".join(out) + "\n"


CHI2_NOTE = ("the estimator E_pi[(z - 2 + 1/z)/2] has variance that grows with E_pi[z^2], the very distance it "
             "estimates, so large values are noisy lower bounds from a finite sample.")
