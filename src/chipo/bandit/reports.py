"""Reports and plots of the testbed's experiments (``chipo.bandit.experiments`` computes the numbers)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from chipo.bandit.estimators import ESTIMATORS  # noqa: E402
from chipo.markdown import markdown_table  # noqa: E402

METHODS = tuple(ESTIMATORS)
LABELS = {"dpo": "DPO", "chipo": "chiPO", "kl_rlhf": "KL-RLHF", "chi2_rlhf": "chi2-RLHF"}
COLORS = {"dpo": "tab:red", "chipo": "tab:blue", "kl_rlhf": "tab:orange", "chi2_rlhf": "tab:green"}


def _fmt(x: float, digits: int = 3) -> str:
    return "nan" if x is None or not np.isfinite(x) else f"{x:.{digits}g}"


def _plot_regret(results: dict, kind: str) -> Callable[[Path], None]:
    def draw(path: Path) -> None:
        fam = results["families"][kind]
        ns = np.asarray(fam["n"])
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for m in METHODS:
            rec = fam["methods"][m]
            axes[0].errorbar(ns, rec["mean"], yerr=rec["se"], marker="o", color=COLORS[m], capsize=3,
                             label=f"{LABELS[m]} (tuned beta, slope {_fmt(rec['slope'], 2)})")
            axes[0].errorbar(ns * 1.04, rec["theory_mean"], yerr=rec["theory_se"], marker="x", ls="--",
                             color=COLORS[m], capsize=2, alpha=0.6, label=f"{LABELS[m]} (theory beta)")
            axes[1].plot(ns, rec["beta"], marker="o", color=COLORS[m], label=LABELS[m])
        ref = fam["methods"]["chipo"]["mean"][0]
        axes[0].plot(ns, ref * np.sqrt(ns[0] / ns), "k:", lw=1, label="n^-1/2")
        axes[0].plot(ns, ref * np.log(ns[0]) / np.log(ns), "k-.", lw=1, label="1/log n")
        axes[0].set(xscale="log", yscale="log", xlabel="n (preference pairs)", ylabel="regret J* - J(pi_hat)",
                    title=f"{fam['instance']['name']}: regret vs n")
        axes[0].legend(fontsize=6.5)
        axes[1].set(xscale="log", yscale="log", xlabel="n", ylabel="tuned beta", title="beta chosen on held-out seeds")
        axes[1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return draw


def report_regret(results: dict) -> str:
    lines = ["# Regret vs n", "",
             "Regret J(pi*) - J(pi_hat) of each estimator, beta tuned per method and per n on held-out seeds "
             f"(grid of {len(results['beta_grid'])} values in [1e-3, 10]), evaluated on {results['seeds']} fresh "
             f"seeds (mean +- standard error); dashed: the theory beta R_max sqrt(|X||Y|/(n C^pi*)). "
             "`slope` is the least-squares slope of log regret vs log n (n^-1/2 has slope -0.5; 1/log n is "
             "much flatter: between n = 100 and 3e4 it falls by a factor 2.2, i.e. an average slope -0.14).", ""]
    for kind, fam in results["families"].items():
        inst = fam["instance"]
        lines += [f"## {inst['name']} (|X| = {inst['X']}, |Y| = {inst['Y']}, R_max = {inst['r_max']}, "
                  f"C^pi* = {_fmt(inst['C_pi_star_seed0'])} for seed 0)", "", _regret_table(fam)]
        lines += ["", "Regret at the theory beta: " + "; ".join(
            f"{LABELS[m]} " + ", ".join(_fmt(v) for v in fam["methods"][m]["theory_mean"]) for m in METHODS), "",
            f"Regret against the best policy with C^pi <= {results['c_bound']} (tuned beta, negative = better "
            "than that comparator): " + "; ".join(
                f"{LABELS[m]} " + ", ".join(_fmt(v) for v in fam["methods"][m]["regC_mean"]) for m in METHODS), "",
            f"Largest final gradient norm of the reward fits: {_fmt(fam['max_grad_norm'])}.", ""]
        lines += _regret_verdict(fam)
        lines += _rate_table(fam)
        lines += ["", f"![regret {kind}](regret_{kind}.png)", ""]
    return "\n".join(lines)


def _regret_table(fam: dict) -> str:
    """Per method: regret +- s.e. (and the tuned beta) at each n, the log-log slopes at tuned and theory beta."""
    rows = []
    for m in METHODS:
        rec = fam["methods"][m]
        cells = [f"{_fmt(mu)} +- {_fmt(se, 2)} (b={_fmt(b, 2)})"
                 for mu, se, b in zip(rec["mean"], rec["se"], rec["beta"], strict=True)]
        rows.append([LABELS[m], *cells, _fmt(rec["slope"], 2), _fmt(rec["theory_slope"], 2)])
    return markdown_table(["method", *(f"n={n}" for n in fam["n"]), "slope", "slope (theory beta)"], rows)


def _regret_verdict(fam: dict) -> list[str]:
    """Plain statements computed from the numbers (never hard-coded)."""
    meth = fam["methods"]
    last = {m: meth[m]["mean"][-1] for m in METHODS}
    first = {m: meth[m]["mean"][0] for m in METHODS}
    best_kl = min(last["dpo"], last["kl_rlhf"])
    best_chi = min(last["chipo"], last["chi2_rlhf"])
    n0, n1 = fam["n"][0], fam["n"][-1]
    out = [f"At n = {n1}: best KL-regularised regret {_fmt(best_kl)} vs best chi-squared-regularised "
           f"{_fmt(best_chi)} (ratio {_fmt(best_kl / best_chi if best_chi > 0 else float('nan'), 2)}). "
           f"From n = {n0} to {n1} the regret changes by a factor "
           + ", ".join(f"{LABELS[m]} {_fmt(first[m] / last[m] if last[m] > 0 else float('nan'), 2)}"
                       for m in METHODS) + "."]
    return out


def _rate_table(fam: dict) -> list[str]:
    """Fits of c n^-a, c (log n)^-b and c / log n to the tuned-beta regret (``chipo.bandit.rates``)."""
    if not any(fam["methods"][m].get("rates") for m in METHODS):
        return []
    out = ["", "Rate fits (least squares in log regret over all n; 95% bootstrap intervals over evaluation seeds, "
           "tuned beta held fixed). a: exponent of c n^-a; b: exponent of c (log n)^-b (b = 1 is c / log n); "
           "RMS: root-mean-square log residual of each form (c / log n has one parameter, the others two).", "",
           ""]
    rows = []
    for m in METHODS:
        r = fam["methods"][m].get("rates")
        if not r:
            continue
        p, iv = r["point"], r["interval"]
        rows.append([LABELS[m], f"{_fmt(p['a'], 2)} [{_fmt(iv['a'][0], 2)}, {_fmt(iv['a'][1], 2)}]",
                     f"{_fmt(p['b'], 2)} [{_fmt(iv['b'][0], 2)}, {_fmt(iv['b'][1], 2)}]", _fmt(p["rms_power"], 2),
                     _fmt(p["rms_loglaw"], 2), _fmt(p["rms_inv_log"], 2)])
    return out + [markdown_table(["method", "a (power)", "b (log law)", "RMS power", "RMS log law", "RMS c/log n"],
                                 rows)]


def _plot_bound(results: dict) -> Callable[[Path], None]:
    def draw(path: Path) -> None:
        rows = results["rows"]
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        lhs = np.array([r["abs_lhs"] for r in rows])
        rhs = np.array([r["rhs"] for r in rows])
        worst = np.array([r["policy"] == "worst_case" for r in rows])
        axes[0].scatter(rhs[~worst], np.maximum(lhs[~worst], 1e-8), s=4, alpha=0.4, label="other policies")
        axes[0].scatter(rhs[worst], np.maximum(lhs[worst], 1e-8), s=6, alpha=0.6, c="tab:red",
                        label="Cauchy-Schwarz-aligned policy")
        lim = [max(1e-8, min(rhs.min(), 1e-4)), rhs.max() * 1.5]
        axes[0].plot(lim, lim, "k--", lw=1, label="|lhs| = rhs")
        axes[0].set(xscale="log", yscale="log", xlabel="rhs = sqrt(2 D_chi2 + 1) eps_stat",
                    ylabel="|E_pi[r* - r_hat]|", title=f"change-of-measure bound, {results['n_checks']} checks")
        axes[0].legend(fontsize=8)
        axes[1].hist([r["ratio"] for r in rows], bins=40, color="tab:blue")
        axes[1].set(xlabel="|lhs| / rhs (must be <= 1)", ylabel="count", title="tightness")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return draw


def report_bound(results: dict) -> str:
    lines = ["# Sanity check: |E_pi[r* - r_hat]| <= sqrt(2 D_chi2(pi || pi_ref) + 1) eps_stat", "",
             "This re-checks Cauchy-Schwarz (E_pi[e] = E_ref[(pi/pi_ref) e] <= ||pi/pi_ref||_ref ||e||_ref), so it "
             "cannot fail except through a bug in the measures; it is a sanity check of the code, not evidence for "
             "the theory. The ratio column shows how tight the bound is.", "",
             f"{results['n_checks']} checks on {results['n_instances']} random instances (1-8 contexts, 2-30 "
             "actions, Dirichlet concentration 0.05-3, R_max in {1, 2, 5}); rewards r_hat = the box-constrained "
             "Bradley-Terry MLE from 30-3000 pairs (raw and shifted per context to minimise eps_stat) and r* plus "
             "Gaussian noise; policies: pi_ref, pi*, a Dirichlet(0.3) policy, the KL/chi2/chi2mix optima of r_hat "
             "at beta in {0.01, 0.1, 1} and the Cauchy-Schwarz-aligned policy pi proportional to "
             "pi_ref (r* - r_hat - min)_+.", "",
             f"- violations: **{results['violations']}** (tolerance 1e-12 relative; a sanity check, cannot fail "
             "for correct code)",
             f"- smallest slack rhs - |lhs|: {_fmt(results['min_slack'])} "
             f"(relative to rhs: {_fmt(results['min_relative_slack'])})",
             f"- |lhs| / rhs: median {_fmt(results['median_ratio'])}, max {_fmt(results['max_ratio'])}", "",
             markdown_table(["policy", "checks", "median ratio", "max ratio"],
                            ([p, s["count"], _fmt(s["median_ratio"]), _fmt(s["max_ratio"])]
                             for p, s in results["by_policy"].items())),
             "", "![bound](bound.png)", ""]
    return "\n".join(lines)


def _plot_overopt(results: dict, kind: str) -> Callable[[Path], None]:
    def draw(path: Path) -> None:
        fam, betas = results["families"][kind], np.asarray(results["betas"])
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
        for m in METHODS:
            rec = fam["methods"][m]
            jm, jse = np.asarray(rec["J_mean"]), np.asarray(rec["J_se"])
            axes[0].plot(betas, jm, color=COLORS[m], label=LABELS[m])
            axes[0].fill_between(betas, jm - jse, jm + jse, color=COLORS[m], alpha=0.2)
            axes[1].plot(betas, np.maximum(rec["chi2_mean"], 1e-12), color=COLORS[m], label=f"{LABELS[m]} chi2")
            axes[1].plot(betas, np.maximum(rec["kl_mean"], 1e-12), color=COLORS[m], ls="--", label=f"{LABELS[m]} KL")
        axes[0].axhline(fam["J_star"], color="k", ls=":", label="J(pi*)")
        axes[0].axhline(fam["J_ref"], color="gray", ls="-.", label="J(pi_ref)")
        axes[0].set(xscale="log", xlabel="beta (large -> small)", ylabel="J(pi_hat) = E[r*]",
                    title=f"{kind}: overoptimization at n = {results['n']}")
        axes[0].invert_xaxis()
        axes[0].legend(fontsize=7)
        axes[1].set(xscale="log", yscale="log", xlabel="beta (large -> small)", ylabel="divergence to pi_ref",
                    title="distribution shift")
        axes[1].invert_xaxis()
        axes[1].legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return draw


def _overopt_table(fam: dict) -> str:
    """Per method: the peak of J over beta and where, J, the drop and the divergences at the smallest beta."""
    rows = []
    for m in METHODS:
        r = fam["methods"][m]
        rows.append([LABELS[m], _fmt(r["peak_J"]), _fmt(r["peak_beta"], 2), _fmt(r["J_smallest_beta"]),
                     _fmt(r["drop"]), _fmt(r["chi2_mean"][-1]), _fmt(r["kl_mean"][-1])])
    return markdown_table(["method", "peak J", "at beta", "J at smallest beta", "drop", "chi2 at smallest beta",
                           "KL at smallest beta"], rows)


def report_overopt(results: dict) -> str:
    betas = results["betas"]
    lines = ["# Overoptimization vs beta", "",
             f"J(pi_hat) of each estimator at n = {results['n']} as beta goes from {_fmt(betas[0])} to "
             f"{_fmt(betas[-1])} ({results['seeds']} seeds; random: a new instance per seed). `drop` = peak J - J at "
             "the smallest beta (overoptimization: how much is lost by regularising too little).", ""]
    for kind, fam in results["families"].items():
        lines += [f"## {kind} (J* = {_fmt(fam['J_star'])}, J(pi_ref) = {_fmt(fam['J_ref'])})", "",
                  _overopt_table(fam)]
        lines += ["", f"![overopt {kind}](overopt_{kind}.png)", ""]
    return "\n".join(lines)


def report_bench(results: dict) -> str:
    s = results["size"]
    # The last header holds "|" (an absolute value); markdown_table escapes it, so the table keeps four columns.
    rows = [[r["divergence"], f"{r['beta']:g}", f"{r['seconds_min']:.3f}", f"{r['max_row_sum_error']:.1e}"]
            for r in results["rows"]]
    table = markdown_table(["divergence", "beta", "seconds (best of runs)", "max |row sum - 1|"], rows)
    return f"# regularized_optimum benchmark ({s} contexts x {s} actions, float64, this machine)\n\n{table}\n"


def _plot_bench(results: dict) -> Callable[[Path], None]:
    def draw(path: Path) -> None:
        fig, ax = plt.subplots(figsize=(6, 3.5))
        labels = [f"{r['divergence']}\nbeta={r['beta']:g}" for r in results["rows"]]
        ax.bar(labels, [r["seconds_min"] for r in results["rows"]], color="tab:blue")
        ax.set(ylabel="seconds", title=f"regularized_optimum, {results['size']}x{results['size']}")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return draw
