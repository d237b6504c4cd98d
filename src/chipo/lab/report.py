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

from chipo.io import atomic_directory, write_json
from chipo.lab.sweep import read_results

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


# ---------------------------------------------------------------------------------------------------- RLHF section

RLHF_BEGIN, RLHF_END = "<!-- rlhf-section -->", "<!-- /rlhf-section -->"
RLHF_NAMES = {"kl": "KL-RLHF", "chi2mix": "chi2mix-RLHF", "bon": "best-of-n"}
RLHF_COLORS = {"kl": "tab:orange", "chi2mix": "tab:green", "bon": "tab:purple"}


def _rlhf_name(key: str) -> str:
    base, _, beta = key.partition("_beta")
    name = "pessimism" if base == "pessimism" else RLHF_NAMES.get(base, base)
    return f"{name} (beta {beta})" if beta else name


def rlhf_curves(results: dict, rows: list[dict] | None = None) -> dict[str, dict]:
    """{name: {"x": sqrt KL, "gold", "proxy" (or None), "label" (steps / n / epochs)}} of every method."""
    curves = {}
    for reg, run in (results.get("rl") or {}).items():
        c = run.get("curve") or []
        curves[reg] = {"x": [math.sqrt(max(p["kl_partition"], 0.0)) for p in c], "gold": [p["gold"] for p in c],
                       "proxy": [p["proxy"] for p in c], "label": [p["step"] for p in c], "unit": "step"}
    for key, c in ((results.get("inference") or {}).get("methods") or {}).items():
        curves[key] = {"x": [math.sqrt(max(p["kl"], 0.0)) for p in c], "gold": [p["gold"] for p in c],
                       "proxy": [p["proxy"] for p in c], "label": [p["n"] for p in c], "unit": "n"}
    if rows:
        ref = next((r for r in rows if r["loss"] == "pi_ref" and r.get("exact")), None)
        agg = aggregate(rows, ["exact.gold", "exact.kl"])
        for loss, beta in sorted({(k[0], k[1]) for k in agg}, key=lambda k: (k[0], -k[1])):
            es = sorted(e for (lo, b, e) in agg if lo == loss and b == beta)
            if ref is None or not es:
                continue
            curves[f"{loss}_beta{beta:g}"] = {
                "x": [math.sqrt(max(agg[(loss, beta, e)]["exact.kl"][0], 0.0)) for e in es],
                "gold": [agg[(loss, beta, e)]["exact.gold"][0] for e in es], "proxy": None, "label": es,
                "unit": "epoch", "name": f"{_label(loss)} beta {beta:g}"}
    return curves


def plot_rlhf(curves: dict, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for key, c in curves.items():
        name = c.get("name") or _rlhf_name(key)
        if key.startswith(("dpo", "chipo")):
            style = dict(color=LOSS_COLORS.get(key.split("_")[0]), ls="--" if key.endswith("beta0.05") else ":",
                         marker=".", alpha=0.6)
        elif key.startswith("pessimism"):
            style = dict(marker="s", ls="-.", color="tab:brown" if key.endswith("beta0.05") else "tab:gray")
        else:
            style = dict(marker="o", ls="-" if key.endswith("beta0.05") else "--",
                         color=RLHF_COLORS.get(key.split("_")[0]))
        for ax, field in ((axes[0], "gold"), (axes[1], "proxy")):
            if c[field] is None:
                continue
            ax.plot(c["x"], c[field], label=name, **style)
            if not key.startswith(("dpo", "chipo")):
                ax.annotate(str(c["label"][-1]), (c["x"][-1], c[field][-1]), textcoords="offset points",
                            xytext=(3, 3), fontsize=7)
    axes[0].set_ylabel("gold reward r*")
    axes[1].set_ylabel("proxy reward (the RM the methods optimise)")
    for ax in axes:
        ax.set_xlabel("sqrt(KL(pi || pi_ref))")
        ax.grid(alpha=0.3)
    axes[0].set_title("Gold reward vs sqrt(KL) (Gao et al. 2023)")
    axes[1].set_title("Proxy reward vs sqrt(KL)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "rlhf_gold_vs_sqrt_kl.png", dpi=110)
    plt.close(fig)
    return "rlhf_gold_vs_sqrt_kl.png"


def _turns_down(gold: list[float], proxy: list[float] | None, tol: float) -> str:
    """Reading of one curve: does gold peak and fall (by more than tol) while the proxy keeps rising?"""
    peak = int(np.argmax(gold))
    fell = gold[-1] < gold[peak] - tol
    if not fell:
        return "no"
    if proxy is not None and proxy[-1] > proxy[peak]:
        return "yes"
    return "gold-only"


def rlhf_text(results: dict, rows: list[dict] | None = None, tol: float = 0.01) -> list[str]:
    """The section's markdown lines; every claim is chosen by the numbers in ``results``."""
    s = results.get("settings", {})
    curves = rlhf_curves(results, rows)
    out = [RLHF_BEGIN, "## Standard RLHF, chi2-RLHF, best-of-n and inference-time pessimism (`chipo demo --full`)",
           ""]
    rms = results.get("reward_models", {})
    out.append(f"Same world, same gold reward, same Bradley-Terry process (scale {s.get('scale', 5):g}) as the "
               "DPO/chiPO data. Reward models: `chipo reward` (backbone pi_ref, fresh score head, "
               f"{s.get('rm_epochs')} epochs, constant lr {s.get('rm_learning_rate')}).")
    for name, m in rms.items():
        what = ("exactly the DPO/chiPO pairs (seed 0)" if name == "rm_demo_pairs" else
                f"{s.get('rm_pairs_per_prompt')} fresh pi_ref pairs per training prompt, more than the DPO/chiPO "
                "data, because a reward model fit on a few hundred pairs of this world is close to chance")
        out.append(f"- RM `{name}` on {m['pairs']} pairs ({what}): held-out accuracy {100 * m['acc_labels']:.0f}% "
                   f"against the BT labels, {100 * m['acc_gold']:.0f}% against the gold ordering "
                   f"({m['heldout_pairs']} held-out pairs).")
    inf = results.get("inference") or {}
    if inf:
        out.append(f"- The RL runs, best-of-n and pessimism all use RM `rm`. Its correlation with the gold reward on "
                   f"pi_ref's samples: {inf['proxy_gold_correlation']:.2f}.")
    out.append(f"- RL: `chipo rl` (RLOO, k {s.get('k')}, {s.get('prompts_per_step')} prompts per step, "
               f"{s.get('steps')} steps, constant lr {s.get('learning_rate')}, betas {list(s.get('betas', []))}, "
               "estimator k1) "
               "with `regularizer=kl` and `regularizer=chi2mix`, everything else identical; evaluated every "
               f"{s.get('eval_every')} steps on the held-out prompts: proxy reward on {s.get('eval_samples')} samples "
               "per prompt, gold reward exact over the enumerable response space.")
    if inf:
        out.append(f"- best-of-n and pessimism (`chipo.inference.select`): one pool of {inf['pool_per_prompt']} pi_ref "
                   f"samples per held-out prompt ({inf['prompts']} prompts), n in {list(s.get('ns', []))}; the "
                   "curves are the methods' output laws over the pool (`best_of_n_distribution`, "
                   "`pessimism_distribution` with the population normaliser and R_max = the largest proxy reward in "
                   f"the pool, {inf['r_max']:.2f}); the selections actually drawn agree within their standard errors "
                   "(table). Pessimism betas are in the proxy's units.")
    out.append("- x axis: sqrt of KL(pi || pi_ref). Trained policies (RL, DPO, chiPO): KL over the exact partition "
               "of responses (a lower bound, tight except in lumped cells); best-of-n / pessimism: KL of the output "
               "law relative to the pool (best-of-n agrees with log n - (n - 1)/n, see table).")
    out += ["", "![rlhf_gold_vs_sqrt_kl.png](rlhf_gold_vs_sqrt_kl.png)", ""]

    # What the curves show.
    out += ["What the curves show (computed from the numbers below; 'turns down' = final gold more than "
            f"{tol:g}, and for RL more than the run's largest step-to-step movement, below the curve's peak):", ""]
    ref_gold = inf.get("pi_ref", {}).get("gold")
    best = {}
    for key, c in curves.items():
        name = c.get("name") or _rlhf_name(key)
        peak = int(np.argmax(c["gold"]))
        best[name] = (c["gold"][peak], c["x"][peak])
        noise = 0.0
        if c["unit"] == "step" and len(c["gold"]) > 2:
            noise = float(np.abs(np.diff(c["gold"][1:])).max())
        # A fall no larger than the run's own step-to-step movement is not called a turn down.
        verdict = _turns_down(c["gold"], c["proxy"], max(tol, noise))
        line = (f"- {name}: gold {c['gold'][0]:.3f} -> peak {c['gold'][peak]:.3f} at {c['unit']} "
                f"{c['label'][peak]} (sqrt KL {c['x'][peak]:.2f}) -> {c['gold'][-1]:.3f} at {c['unit']} "
                f"{c['label'][-1]} (sqrt KL {c['x'][-1]:.2f})")
        if c["proxy"] is not None:
            line += f"; proxy {c['proxy'][0]:.2f} -> {c['proxy'][-1]:.2f}"
        if noise:
            line += (f"; gold moves by up to {noise:.3f} between consecutive evaluations after the first, "
                     "so a smaller fall from the peak is within training noise and not called a turn down")
        line += {"yes": ". Overoptimization in the Gao et al. sense: the proxy kept rising while the gold turned "
                        "down.",
                 "gold-only": ". The gold turned down, but the proxy did not keep rising with it.",
                 "no": ". The gold did not turn down on this range."}[verdict]
        out.append(line)
    if best:
        top = max(best, key=lambda k: best[k][0])
        out += ["", f"Highest gold reward reached: {top} ({best[top][0]:.3f} at sqrt KL {best[top][1]:.2f})"
                + (f"; pi_ref {ref_gold:.3f}." if ref_gold is not None else ".")]
        for beta in s.get("betas", []):
            a, b = curves.get(f"kl_beta{beta:g}"), curves.get(f"chi2mix_beta{beta:g}")
            if a is None or b is None:
                continue
            out.append(f"At beta {beta:g} and the same steps, KL-RLHF ends at sqrt KL {a['x'][-1]:.2f} "
                       f"(gold {a['gold'][-1]:.3f}) and chi2mix-RLHF at {b['x'][-1]:.2f} "
                       f"(gold {b['gold'][-1]:.3f}): chi2mix "
                       + ("stays closer to pi_ref" if b["x"][-1] < a["x"][-1] else "moves as far or further")
                       + (", and ends with the higher gold reward." if b["gold"][-1] > a["gold"][-1] + tol else
                          ", and ends with the lower gold reward." if b["gold"][-1] < a["gold"][-1] - tol else
                          f", with final gold rewards within {tol:g} of each other."))
    none_down = all(_turns_down(c["gold"], c["proxy"], tol) == "no" for c in curves.values()
                    if not (c.get("name") or "").startswith(("DPO", "chiPO")))
    if none_down:
        out.append("None of the RM-based methods shows the gold reward turning down on the KL range measured here: "
                   "with this reward model and budget the Gao et al. overoptimization regime is not reached (the "
                   "RM-based curves only show the rising part).")

    # Tables.
    out += ["", "| method | step | sqrt KL | gold | proxy | KL k3 (MC) | chi2 (MC) | malformed mass |",
            "|---|---|---|---|---|---|---|---|"]
    for reg, run in (results.get("rl") or {}).items():
        for p in run.get("curve", []):
            out.append(f"| {_rlhf_name(reg)} | {p['step']} | {math.sqrt(max(p['kl_partition'], 0)):.2f} | "
                       f"{p['gold']:.3f} | {p['proxy']:.2f} | {p['kl_k3']:.2f} | {p['chi2']:.3g} | "
                       f"{100 * p['mass_malformed']:.1f}% |")
    out += ["", "| method | n | sqrt KL (law) | KL log n - (n-1)/n | gold (law) | gold (drawn ± se) | proxy (law) |",
            "|---|---|---|---|---|---|---|"]
    for key, c in (inf.get("methods") or {}).items():
        for p in c:
            analytic = f"{p['kl_analytic']:.2f}" if "kl_analytic" in p else "-"
            out.append(f"| {_rlhf_name(key)} | {p['n']} | {math.sqrt(max(p['kl'], 0)):.2f} | {analytic} | "
                       f"{p['gold']:.3f} | {p['gold_selected']:.3f} ± {p['gold_selected_se']:.3f} | "
                       f"{p['proxy']:.2f} |")
    timing = dict(results.get("timing", {}))
    for key, run in (results.get("rl") or {}).items():
        timing[f"RL {_rlhf_name(key)}_s"] = run.get("seconds", math.nan)
    if timing:
        parts = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.0f} s ({v / 60:.1f} min)"
                          for k, v in timing.items())
        out += ["", f"Wall time (measured when each part ran; a resumed run keeps these): {parts}."]
    out.append(RLHF_END)
    return out


def write_rlhf_section(report_dir: str | os.PathLike, results: dict, rows: list[dict] | None = None) -> Path:
    """Add (or replace) the RLHF section in ``report_dir/report.md`` and write ``rlhf_gold_vs_sqrt_kl.png``.

    The section goes before "## Machine, versions, time" (or at the end); rewriting it is idempotent.
    """
    from chipo.io import atomic_write_text

    report_dir = Path(report_dir)
    plot_rlhf(rlhf_curves(results, rows), report_dir)
    path = report_dir / "report.md"
    text = path.read_text() if path.is_file() else ""
    if RLHF_BEGIN in text:
        head, rest = text.split(RLHF_BEGIN, 1)
        tail = rest.split(RLHF_END, 1)[1] if RLHF_END in rest else ""
        text = head.rstrip("\n") + "\n\n" + tail.lstrip("\n")
    section = "\n".join(rlhf_text(results, rows)) + "\n\n"
    marker = "## Machine, versions, time"
    text = text.replace(marker, section + marker, 1) if marker in text else text + "\n" + section
    atomic_write_text(path, text)
    return path
