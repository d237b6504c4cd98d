"""The ``chipo demo --full`` section of the report: standard RLHF, chi2-RLHF, best-of-n and pessimism curves of
gold (and proxy) reward against sqrt(KL), with DPO/chiPO's curves on the same axes.

The one KL estimate of every gold-vs-KL view: KL over the world's exact partition of responses (a lower bound of
the sequence KL) for trained policies; for best-of-n and pessimism the KL of their output law relative to the
pool they select from (stated on the axis).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from chipo import stats
from chipo.lab import tables
from chipo.lab.experiments import insert_section, template
from chipo.lab.report_tables import fmt
from chipo.markdown import markdown_table

RLHF_BEGIN, RLHF_END = "<!-- rlhf-section -->", "<!-- /rlhf-section -->"
RLHF_NAMES = {"kl": "KL-RLHF", "chi2mix": "chi2mix-RLHF", "bon": "best-of-n"}
RLHF_COLORS = {"kl": "tab:orange", "chi2mix": "tab:green", "bon": "tab:purple"}
SWEEP_COLORS = {"dpo": "tab:red", "chipo": "tab:blue"}


def _rlhf_name(key: str) -> str:
    base, _, beta = key.partition("_beta")
    name = "pessimism" if base == "pessimism" else RLHF_NAMES.get(base, base)
    return f"{name} (beta {beta})" if beta else name


def rlhf_curves(results: dict, rows: list[dict] | None = None) -> dict[str, dict]:
    """{name: {"x": sqrt KL, "gold", "proxy" (or None), "label" (steps / n / epochs)}} of every method."""
    curves = {}
    for reg, run in (results.get("rl") or {}).items():
        if "_seed" in reg:  # further seeds: tested in the seeds table, not drawn (one curve per method)
            continue
        c = run.get("curve") or []
        curves[reg] = {"x": [math.sqrt(max(p["kl_partition"], 0.0)) for p in c], "gold": [p["gold"] for p in c],
                       "proxy": [p["proxy"] for p in c], "label": [p["step"] for p in c], "unit": "step"}
    for key, c in ((results.get("inference") or {}).get("methods") or {}).items():
        curves[key] = {"x": [math.sqrt(max(p["kl"], 0.0)) for p in c], "gold": [p["gold"] for p in c],
                       "proxy": [p["proxy"] for p in c], "label": [p["n"] for p in c], "unit": "n"}
    if rows:
        df = tables.results_table(rows)
        if "exact.kl" in df and (df["method"] == "pi_ref").any():
            agg = tables.aggregate(tables.with_start(df), ["exact.gold", "exact.kl"])
            for (method, beta), g in agg.groupby(["method", "beta"], sort=True):
                g = g.sort_values("epoch")
                curves[f"{method}_beta{beta:g}"] = {
                    "x": [math.sqrt(max(v, 0.0)) for v in g["exact.kl"]], "gold": list(g["exact.gold"]),
                    "proxy": None, "label": [int(e) for e in g["epoch"]], "unit": "epoch",
                    "name": f"{method} beta {beta:g}", "sweep": True}
    return curves


def rl_seed_claims(results: dict, alpha: float = 0.05) -> list[dict]:
    """Per beta: the final gold reward of chi2mix-RLHF and KL-RLHF over seeds, and the paired t test (same seed,
    same prompts and sampling seeds) of chi2mix - kl, Holm-adjusted over the betas; the verdict word only when the
    adjusted p is below ``alpha``."""
    runs = [r for r in (results.get("rl") or {}).values() if r.get("done") and "seed" in r]
    by = {}
    for r in runs:
        by.setdefault(r["beta"], {}).setdefault(r["regularizer"], {})[r["seed"]] = r["curve"][-1]["gold"]
    claims = []
    for beta, regs in sorted(by.items(), reverse=True):
        seeds = sorted(set(regs.get("kl", {})) & set(regs.get("chi2mix", {})))
        if len(seeds) < 2:
            continue
        kl, mix = (np.array([regs[g][s] for s in seeds]) for g in ("kl", "chi2mix"))
        test = stats.paired_t(mix, kl)
        claims.append({"beta": beta, "seeds": seeds, "kl": kl, "chi2mix": mix, "test": test,
                       "detectable": stats.min_detectable_difference(test.se, test.df)
                       if math.isfinite(test.se) and test.df > 0 else math.nan})
    if claims:
        adjusted, passed = stats.holm([c["test"].p for c in claims], alpha)
        for c, p_adj, ok in zip(claims, adjusted, passed, strict=True):
            c["p_holm"], c["passed"] = float(p_adj), bool(ok)
    return claims


def rl_seed_text(claims: list[dict]) -> list[str]:
    """The seeds table: final gold per regularizer (mean +- s.e. over seeds) and the paired test's verdict."""
    if not claims:
        return []

    def pm(values: np.ndarray) -> str:
        return fmt(values.mean(), stats.mean_se(values)[1], digits=3)

    rows = [[f"{c['beta']:g}", len(c["seeds"]), pm(c["kl"]), pm(c["chi2mix"]), f"{c['test'].estimate:+.3f}",
             f"{c['p_holm']:.3g}", f"{c['detectable']:.3f}", "significant" if c["passed"] else "not shown"]
            for c in claims]
    return ["", "RL over seeds (final gold reward, exact; mean ± s.e. over seeds; paired t test of chi2mix - kl "
            "across seeds, Holm-adjusted over the betas):", "",
            markdown_table(["beta", "seeds", "KL-RLHF", "chi2mix-RLHF", "difference", "p (Holm)",
                            "smallest detectable", "verdict"], rows)]


def plot_rlhf(curves: dict, out: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    for key, c in curves.items():
        name = c.get("name") or _rlhf_name(key)
        if c.get("sweep"):
            style = dict(color=SWEEP_COLORS.get(key.split("_beta")[0]), ls="--" if key.endswith("beta0.05") else ":",
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
            if not c.get("sweep"):
                ax.annotate(str(c["label"][-1]), (c["x"][-1], c[field][-1]), textcoords="offset points",
                            xytext=(3, 3), fontsize=7)
    axes[0].set_ylabel("gold reward r*")
    axes[1].set_ylabel("proxy reward (the RM the methods optimise)")
    for ax in axes:
        ax.set_xlabel("sqrt(KL(pi || pi_ref)) [nats^1/2]\ntrained policies: exact KL over the partition of responses "
                      "(a lower bound); best-of-n / pessimism: KL of the output law to the pool", fontsize=8)
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


def _reward_model_lines(s: dict, rms: dict) -> list[str]:
    """The reward models: data, epochs, held-out accuracy, and whether the larger data set bought accuracy."""
    out = [f"Same world, same gold reward, same Bradley-Terry process (scale {s.get('scale', 5):g}) as the "
           "DPO/chiPO data. Reward models: `chipo reward` (backbone pi_ref, fresh score head, "
           f"{s.get('rm_epochs')} epochs, constant lr {s.get('rm_learning_rate')})."]
    for name, m in rms.items():
        what = ("exactly the DPO/chiPO pairs (seed 0)" if name == "rm_demo_pairs" else
                f"{s.get('rm_pairs_per_prompt')} fresh pi_ref pairs per training prompt, more than the DPO/chiPO "
                "data")
        out.append(f"- RM `{name}` on {m['pairs']} pairs ({what}): held-out accuracy {100 * m['acc_labels']:.0f}% "
                   f"against the BT labels, {100 * m['acc_gold']:.0f}% against the gold ordering "
                   f"({m['heldout_pairs']} held-out pairs).")
    if {"rm", "rm_demo_pairs"} <= set(rms):  # what the extra data bought, read off the two accuracies
        big, small = rms["rm"]["acc_gold"], rms["rm_demo_pairs"]["acc_gold"]
        out.append(f"- The larger data set {'gives' if big > small else 'does not give'} a more accurate reward model "
                   f"here: {100 * big:.0f}% vs {100 * small:.0f}% against the gold ordering.")
    return out


def _method_lines(s: dict, inf: dict) -> list[str]:
    """How RL, best-of-n and pessimism were run, and what the x axis measures (``templates/rlhf_*.md``)."""
    out = []
    if inf:
        out.append(f"- The RL runs, best-of-n and pessimism all use RM `rm`. Its correlation with the gold reward on "
                   f"pi_ref's samples: {inf['proxy_gold_correlation']:.2f}.")
    out.append(template("rlhf_rl", k=s.get("k"), prompts_per_step=s.get("prompts_per_step"), steps=s.get("steps"),
                        learning_rate=s.get("learning_rate"), betas=list(s.get("betas", [])),
                        eval_every=s.get("eval_every"), eval_samples=s.get("eval_samples")))
    if inf:
        out.append(template("rlhf_inference", pool=inf["pool_per_prompt"], prompts=inf["prompts"],
                            ns=list(s.get("ns", [])), r_max=f"{inf['r_max']:.2f}"))
    return out + template("rlhf_axes").split("\n")


_READINGS = {"yes": ". Overoptimization in the Gao et al. sense: the proxy kept rising while the gold turned down.",
             "gold-only": ". The gold turned down, but the proxy did not keep rising with it.",
             "no": ". The gold did not turn down on this range."}


def _curve_line(name: str, c: dict, tol: float) -> str:
    """One curve read off its numbers: start, peak, end, and whether the gold turned down (``_turns_down``)."""
    peak = int(np.argmax(c["gold"]))
    noise = 0.0
    if c["unit"] == "step" and len(c["gold"]) > 2:
        noise = float(np.abs(np.diff(c["gold"][1:])).max())
    line = (f"- {name}: gold {c['gold'][0]:.3f} -> peak {c['gold'][peak]:.3f} at {c['unit']} "
            f"{c['label'][peak]} (sqrt KL {c['x'][peak]:.2f}) -> {c['gold'][-1]:.3f} at {c['unit']} "
            f"{c['label'][-1]} (sqrt KL {c['x'][-1]:.2f})")
    if c["proxy"] is not None:
        line += f"; proxy {c['proxy'][0]:.2f} -> {c['proxy'][-1]:.2f}"
    if noise:
        line += (f"; gold moves by up to {noise:.3f} between consecutive evaluations after the first, "
                 "so a smaller fall from the peak is within training noise and not called a turn down")
    # A fall no larger than the run's own step-to-step movement is not called a turn down.
    return line + _READINGS[_turns_down(c["gold"], c["proxy"], max(tol, noise))]


def _regularizer_line(beta: float, a: dict, b: dict, tol: float) -> str:
    """KL-RLHF (``a``) against chi2mix-RLHF (``b``) at one beta, at their last step."""
    closer = "stays closer to pi_ref" if b["x"][-1] < a["x"][-1] else "moves as far or further"
    gold = (", and ends with the higher gold reward." if b["gold"][-1] > a["gold"][-1] + tol else
            ", and ends with the lower gold reward." if b["gold"][-1] < a["gold"][-1] - tol else
            f", with final gold rewards within {tol:g} of each other.")
    return (f"At beta {beta:g} and the same steps, KL-RLHF ends at sqrt KL {a['x'][-1]:.2f} (gold {a['gold'][-1]:.3f})"
            f" and chi2mix-RLHF at {b['x'][-1]:.2f} (gold {b['gold'][-1]:.3f}): chi2mix {closer}{gold}")


def _reading_lines(curves: dict, s: dict, ref_gold: float | None, tol: float) -> list[str]:
    """What the curves show, every sentence chosen by the numbers."""
    out = ["What the curves show (computed from the numbers below; 'turns down' = final gold more than "
           f"{tol:g}, and for RL more than the run's largest step-to-step movement, below the curve's peak):", ""]
    best = {}
    for key, c in curves.items():
        name = c.get("name") or _rlhf_name(key)
        peak = int(np.argmax(c["gold"]))
        best[name] = (c["gold"][peak], c["x"][peak])
        out.append(_curve_line(name, c, tol))
    if best:
        top = max(best, key=lambda k: best[k][0])
        out += ["", f"Highest gold reward reached: {top} ({best[top][0]:.3f} at sqrt KL {best[top][1]:.2f})"
                + (f"; pi_ref {ref_gold:.3f}." if ref_gold is not None else ".")]
        for beta in s.get("betas", []):
            a, b = curves.get(f"kl_beta{beta:g}"), curves.get(f"chi2mix_beta{beta:g}")
            if a is not None and b is not None:
                out.append(_regularizer_line(beta, a, b, tol))
    if all(_turns_down(c["gold"], c["proxy"], tol) == "no" for c in curves.values() if not c.get("sweep")):
        out.append("None of the RM-based methods shows the gold reward turning down on the KL range measured here: "
                   "with this reward model and budget the Gao et al. overoptimization regime is not reached (the "
                   "RM-based curves only show the rising part).")
    return out


def _tables(results: dict) -> list[str]:
    """Every evaluated RL step, and every n of best-of-n and pessimism."""
    rl = [[_rlhf_name(reg), p["step"], f"{math.sqrt(max(p['kl_partition'], 0)):.2f}", f"{p['gold']:.3f}",
           f"{p['proxy']:.2f}", f"{p['kl_k3']:.2f}", f"{p['chi2']:.3g}", f"{100 * p['mass_malformed']:.1f}%"]
          for reg, run in (results.get("rl") or {}).items() for p in run.get("curve", [])]
    inference = [[_rlhf_name(key), p["n"], f"{math.sqrt(max(p['kl'], 0)):.2f}",
                  f"{p['kl_analytic']:.2f}" if "kl_analytic" in p else "-", f"{p['gold']:.3f}",
                  f"{p['gold_selected']:.3f} ± {p['gold_selected_se']:.3f}", f"{p['proxy']:.2f}"]
                 for key, c in ((results.get("inference") or {}).get("methods") or {}).items() for p in c]
    return ["", markdown_table(["method", "step", "sqrt KL", "gold", "proxy", "KL k3 (MC)", "chi2 (MC)",
                                "malformed mass"], rl),
            "", markdown_table(["method", "n", "sqrt KL (law)", "KL log n - (n-1)/n", "gold (law)",
                                "gold (drawn ± se)", "proxy (law)"], inference)]


def _timing_lines(results: dict) -> list[str]:
    timing = dict(results.get("timing", {}))
    for key, run in (results.get("rl") or {}).items():
        timing[f"RL {_rlhf_name(key)}_s"] = run.get("seconds", math.nan)
    if not timing:
        return []
    parts = ", ".join(f"{k.removesuffix('_s').replace('_', ' ')} {v:.0f} s ({v / 60:.1f} min)"
                      for k, v in timing.items())
    return ["", f"Wall time of each part (measured when it ran; a resumed run keeps these): {parts}."]


def rlhf_text(results: dict, rows: list[dict] | None = None, tol: float = 0.01) -> list[str]:
    """The section's markdown lines; every claim is chosen by the numbers in ``results``."""
    s = results.get("settings", {})
    inf = results.get("inference") or {}
    return ([RLHF_BEGIN, "## Standard RLHF, chi2-RLHF, best-of-n and inference-time pessimism (`chipo demo --full`)",
             ""] + _reward_model_lines(s, results.get("reward_models", {})) + _method_lines(s, inf)
            + ["", "![rlhf_gold_vs_sqrt_kl.png](rlhf_gold_vs_sqrt_kl.png)", ""]
            + rl_seed_text(rl_seed_claims(results)) + [""]
            + _reading_lines(rlhf_curves(results, rows), s, inf.get("pi_ref", {}).get("gold"), tol)
            + _tables(results) + _timing_lines(results) + [RLHF_END])


def rlhf_section(report_dir: str | os.PathLike, results: dict, rows: list[dict] | None = None) -> str:
    """The section's markdown, with its figure ``rlhf_gold_vs_sqrt_kl.png`` written into ``report_dir``."""
    plot_rlhf(rlhf_curves(results, rows), Path(report_dir))
    return "\n".join(rlhf_text(results, rows)) + "\n"


def write_rlhf_section(report_dir: str | os.PathLike, results: dict, rows: list[dict] | None = None) -> Path:
    """Add (or replace) the RLHF section in ``report_dir/report.md`` and write ``rlhf_gold_vs_sqrt_kl.png``.

    The section goes before "## Machine, versions, time" (or at the end); rewriting it is idempotent.
    """
    from chipo.io import atomic_write_text

    path = Path(report_dir) / "report.md"
    text = path.read_text() if path.is_file() else ""
    if RLHF_BEGIN in text:
        head, rest = text.split(RLHF_BEGIN, 1)
        tail = rest.split(RLHF_END, 1)[1] if RLHF_END in rest else ""
        text = head.rstrip("\n") + "\n\n" + tail.lstrip("\n")
    atomic_write_text(path, insert_section(text, rlhf_section(report_dir, results, rows)))
    return path
