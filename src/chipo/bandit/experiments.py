"""The testbed's experiments: regret vs n, a sanity check of the change-of-measure bound, overoptimization vs beta
(and a solver benchmark).

Each ``run_*`` function computes results (plain dicts of floats), then ``write_experiment`` writes
``report.md``, PNG plots (matplotlib Agg) and ``results.json`` into a temporary directory beside the target
and renames it into place, so a crashed run never leaves a half-written result directory.

Conventions: "tuned" beta = the grid value with the lowest mean regret on *held-out* tuning seeds (separate
datasets, and separate random instances for the random family), then evaluated on fresh seeds; "theory" beta =
R_max * sqrt(|X||Y| / (n C^{pi*})), the scaling that balances chi-squared bias beta * C^{pi*} against the
statistical error R_max^2 |X||Y| / (n beta) (Theorem 3.1 of arXiv 2407.13399 up to constants and with
log |Pi| replaced by the tabular dimension |X||Y|; constants set to one).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from tqdm import tqdm  # noqa: E402

from chipo.bandit import measures as M  # noqa: E402
from chipo.bandit._threads import single_thread  # noqa: E402
from chipo.bandit.estimators import ESTIMATORS, estimator_policy, fit_rewards, sample_preferences  # noqa: E402
from chipo.bandit.instances import Instance, kl_trap_instance, random_instance  # noqa: E402
from chipo.bandit.optimum import OPTIMUM_DIVERGENCES, regularized_optimum  # noqa: E402
from chipo.bandit.rates import bootstrap_rates  # noqa: E402

METHODS = tuple(ESTIMATORS)
LABELS = {"dpo": "DPO", "chipo": "chiPO", "kl_rlhf": "KL-RLHF", "chi2_rlhf": "chi2-RLHF"}
COLORS = {"dpo": "tab:red", "chipo": "tab:blue", "kl_rlhf": "tab:orange", "chi2_rlhf": "tab:green"}
C_BOUND = 2.0
"""Concentrability budget of the second comparator: the best policy with C^pi = 1 + 2 D_chi2 <= 2."""


@dataclass(frozen=True)
class Settings:
    """Sizes of one run. ``quick`` shrinks everything so the whole suite runs in seconds."""

    seeds: int = 5
    tune_seeds: int = 3
    quick: bool = False
    kl_trap_n: tuple[int, ...] | None = None
    """Sample sizes of the kl_trap regret curve (None: the default grid)."""

    @property
    def beta_grid(self) -> np.ndarray:
        return np.logspace(-3, 1, 9 if self.quick else 17)


# ----------------------------------------------------------------------------------------------------- helpers


def theory_beta(inst: Instance, n: int) -> float:
    """R_max sqrt(|X||Y| / (n C^{pi*})) (module docstring)."""
    c_star = M.concentrability(inst, M.optimal_policy(inst))
    return float(inst.r_max * math.sqrt(inst.n_contexts * inst.n_actions / (n * c_star)))


def _mean_se(values: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    values = np.asarray(values, dtype=float)
    k = values.shape[axis]
    se = values.std(axis=axis, ddof=1) / math.sqrt(k) if k > 1 else np.zeros_like(values.mean(axis=axis))
    return values.mean(axis=axis), se


def loglog_slope(n: list[int] | np.ndarray, y: list[float] | np.ndarray) -> float:
    """Least-squares slope of log y against log n (nan if fewer than two positive points)."""
    n, y = np.asarray(n, float), np.asarray(y, float)
    ok = y > 0
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(n[ok]), np.log(y[ok]), 1)[0])


def progress(desc: str, total: int | None = None, iterable=None) -> tqdm:
    """A progress bar on stderr for one experiment (the full suite runs for minutes; stdout stays for results)."""
    return tqdm(iterable, total=total, desc=f"bandit {desc}", file=sys.stderr, dynamic_ncols=True, leave=True)


def _fmt(x: float, digits: int = 3) -> str:
    return "nan" if x is None or not np.isfinite(x) else f"{x:.{digits}g}"


def write_experiment(out_dir: Path, report: str, results: dict,
                     plots: dict[str, Callable[[Path], None]]) -> Path:
    """Write report.md, results.json and each plot (name -> function writing the PNG) atomically into out_dir."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        (tmp / "report.md").write_text(report)
        (tmp / "results.json").write_text(json.dumps(results, indent=1, default=_json_default))
        for name, draw in plots.items():
            draw(tmp / name)
        old = None
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}-old-{os.getpid()}"
            out_dir.rename(old)
        tmp.rename(out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _json_default(obj):
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj)}")


# ------------------------------------------------------------------------------------------ experiment 1: regret


def _family(kind: str, seed: int) -> Instance:
    """The instance of a family for a seed: kl_trap is fixed, random draws a new instance per seed."""
    if kind == "kl_trap":
        return kl_trap_instance()
    return random_instance(10, 20, concentration=0.3, r_max=1.0, seed=10_000 + seed)


def _regret_table(kind: str, n: int, seeds: range, betas: np.ndarray) -> dict[str, np.ndarray]:
    """Regret [seed, beta] of every method, plus regret at the theory beta [seed], and diagnostics."""
    out = {m: np.zeros((len(seeds), len(betas))) for m in METHODS}
    out |= {f"{m}@theory": np.zeros(len(seeds)) for m in METHODS}
    out |= {f"{m}@regC": np.zeros((len(seeds), len(betas))) for m in METHODS}
    out |= {f"{m}@chi2": np.zeros((len(seeds), len(betas))) for m in METHODS}
    grad = []
    for i, seed in enumerate(seeds):
        inst = _family(kind, seed)
        data = sample_preferences(inst, n, np.random.default_rng(seed))
        fits = fit_rewards(inst, data)
        grad.append(max(f.grad_norm for f in fits.values()))
        _, j_c = M.best_concentrable_policy(inst, C_BOUND)
        beta_th = theory_beta(inst, n)
        for m in METHODS:
            for b, beta in enumerate(betas):
                pi = estimator_policy(inst, fits, m, float(beta))
                out[m][i, b] = M.regret(inst, pi)
                out[f"{m}@regC"][i, b] = j_c - M.value(inst, pi)
                out[f"{m}@chi2"][i, b] = M.chi2_to_ref(inst, pi)
            out[f"{m}@theory"][i] = M.regret(inst, estimator_policy(inst, fits, m, beta_th))
    out["grad_norm"] = np.array(grad)
    return out


def run_regret(settings: Settings) -> dict:
    """Regret vs n with tuned and theory beta, on the kl_trap instance and on random instances."""
    betas = settings.beta_grid
    default_trap = [100, 1000] if settings.quick else [100, 300, 1000, 3000, 10000, 30000]
    grids = {"kl_trap": list(settings.kl_trap_n) if settings.kl_trap_n else default_trap,
             "random": [100, 1000] if settings.quick else [100, 300, 1000, 3000, 10000]}
    tune = range(1000, 1000 + settings.tune_seeds)
    evaluate = range(settings.seeds)
    results: dict = {"beta_grid": betas, "seeds": settings.seeds, "tune_seeds": settings.tune_seeds,
                     "c_bound": C_BOUND, "families": {}}
    bar = progress("regret", sum(len(ns) for ns in grids.values()))
    for kind, ns in grids.items():
        fam: dict = {"n": ns, "methods": {m: {"beta": [], "mean": [], "se": [], "theory_beta": [],
                                             "theory_mean": [], "theory_se": [], "regC_mean": [], "chi2_mean": [],
                                             "per_seed": []}
                                         for m in METHODS}, "max_grad_norm": 0.0}
        example = _family(kind, 0)
        fam["instance"] = {"name": example.name, "X": example.n_contexts, "Y": example.n_actions,
                           "r_max": example.r_max, "C_pi_star_seed0": M.concentrability(example,
                                                                                        M.optimal_policy(example)),
                           "meta": example.meta}
        for n in ns:
            tuned = _regret_table(kind, n, tune, betas)
            held = _regret_table(kind, n, evaluate, betas)
            fam["max_grad_norm"] = max(fam["max_grad_norm"], float(tuned["grad_norm"].max()),
                                       float(held["grad_norm"].max()))
            for m in METHODS:
                b = int(np.argmin(tuned[m].mean(0)))
                rec = fam["methods"][m]
                mean, se = _mean_se(held[m][:, b])
                th_mean, th_se = _mean_se(held[f"{m}@theory"])
                rec["beta"].append(float(betas[b]))
                rec["mean"].append(float(mean))
                rec["se"].append(float(se))
                rec["theory_beta"].append(theory_beta(example, n) if kind == "kl_trap" else float("nan"))
                rec["theory_mean"].append(float(th_mean))
                rec["theory_se"].append(float(th_se))
                rec["regC_mean"].append(float(held[f"{m}@regC"][:, b].mean()))
                rec["chi2_mean"].append(float(held[f"{m}@chi2"][:, b].mean()))
                rec["per_seed"].append(held[m][:, b].tolist())
            bar.set_postfix_str(f"{kind} n={n}")
            bar.update()
        for m in METHODS:
            rec = fam["methods"][m]
            rec["slope"] = loglog_slope(ns, rec["mean"])
            rec["theory_slope"] = loglog_slope(ns, rec["theory_mean"])
            positive = len(ns) >= 3 and min(rec["mean"]) > 0
            rec["rates"] = bootstrap_rates(ns, np.array(rec["per_seed"])) if positive else None
        results["families"][kind] = fam
    bar.close()
    return results


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
                  f"C^pi* = {_fmt(inst['C_pi_star_seed0'])} for seed 0)", "",
                  "| method | " + " | ".join(f"n={n}" for n in fam["n"]) + " | slope | slope (theory beta) |",
                  "|---" * (len(fam["n"]) + 3) + "|"]
        for m in METHODS:
            rec = fam["methods"][m]
            cells = [f"{_fmt(mu)} +- {_fmt(se, 2)} (b={_fmt(b, 2)})"
                     for mu, se, b in zip(rec["mean"], rec["se"], rec["beta"], strict=True)]
            lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + f" | {_fmt(rec['slope'], 2)} | "
                         f"{_fmt(rec['theory_slope'], 2)} |")
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
           "| method | a (power) | b (log law) | RMS power | RMS log law | RMS c/log n |", "|---|---|---|---|---|---|"]
    for m in METHODS:
        r = fam["methods"][m].get("rates")
        if not r:
            continue
        p, iv = r["point"], r["interval"]
        out.append(f"| {LABELS[m]} | {_fmt(p['a'], 2)} [{_fmt(iv['a'][0], 2)}, {_fmt(iv['a'][1], 2)}] | "
                   f"{_fmt(p['b'], 2)} [{_fmt(iv['b'][0], 2)}, {_fmt(iv['b'][1], 2)}] | {_fmt(p['rms_power'], 2)} | "
                   f"{_fmt(p['rms_loglaw'], 2)} | {_fmt(p['rms_inv_log'], 2)} |")
    return out


# ------------------------------------------------------------------------------------------- experiment 2: bound


def run_bound(settings: Settings) -> dict:
    """Check |E_pi[r* - r_hat]| <= sqrt(2 D_chi2 + 1) eps_stat on many random instances, rewards and policies."""
    n_instances = 10 if settings.quick else 200
    rng = np.random.default_rng(7)
    rows = []
    for k in progress("bound (sanity check)", iterable=range(n_instances)):
        inst = random_instance(int(rng.integers(1, 9)), int(rng.integers(2, 31)),
                               concentration=float(np.exp(rng.uniform(np.log(0.05), np.log(3.0)))),
                               r_max=float(rng.choice([1.0, 2.0, 5.0])), seed=k)
        n = int(rng.choice([30, 100, 300, 1000, 3000]))
        fit = fit_rewards(inst, sample_preferences(inst, n, rng))["rlhf"].params
        rewards = {"mle": fit, "mle_aligned": M.align_reward(inst, fit),
                   "noisy": inst.reward + rng.normal(0, 0.3 * inst.r_max, inst.reward.shape)}
        for r_name, r_hat in rewards.items():
            policies = {"worst_case": M.worst_case_policy(inst, r_hat), "pi_ref": inst.pi_ref,
                        "pi_star": M.optimal_policy(inst),
                        "dirichlet": rng.dirichlet(np.full(inst.n_actions, 0.3), size=inst.n_contexts)}
            for div in OPTIMUM_DIVERGENCES:
                for beta in (0.01, 0.1, 1.0):
                    policies[f"{div}_opt_b{beta:g}"] = regularized_optimum(inst.pi_ref, r_hat, beta, div)
            for p_name, pi in policies.items():
                b = M.change_of_measure_bound(inst, pi, r_hat)
                rows.append({"instance": k, "n": n, "reward": r_name, "policy": p_name, **b})
    ratio = np.array([r["ratio"] for r in rows])
    slack = np.array([r["slack"] for r in rows])
    rel_slack = slack / np.array([max(r["rhs"], 1e-300) for r in rows])
    violations = int((slack < -1e-12 * np.maximum(1.0, [r["rhs"] for r in rows])).sum())
    by_policy = {}
    for p in sorted({r["policy"] for r in rows}):
        rs = np.array([r["ratio"] for r in rows if r["policy"] == p])
        by_policy[p] = {"count": int(rs.size), "max_ratio": float(rs.max()), "median_ratio": float(np.median(rs))}
    return {"n_instances": n_instances, "n_checks": len(rows), "violations": violations,
            "min_slack": float(slack.min()), "min_relative_slack": float(rel_slack.min()),
            "max_ratio": float(ratio.max()), "median_ratio": float(np.median(ratio)),
            "by_policy": by_policy, "rows": rows}


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
             "| policy | checks | median ratio | max ratio |", "|---|---|---|---|"]
    for p, s in results["by_policy"].items():
        lines.append(f"| {p} | {s['count']} | {_fmt(s['median_ratio'])} | {_fmt(s['max_ratio'])} |")
    lines += ["", "![bound](bound.png)", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------- experiment 3: overopt


def run_overopt(settings: Settings) -> dict:
    """J, KL and chi2 of each estimator as beta goes from large to small at fixed n."""
    betas = np.logspace(1, -3, 9 if settings.quick else 25)
    n = 1000
    results: dict = {"n": n, "betas": betas, "seeds": settings.seeds, "families": {}}
    for kind in ("kl_trap", "random"):
        vals = {m: {"J": np.zeros((settings.seeds, betas.size)), "kl": np.zeros((settings.seeds, betas.size)),
                    "chi2": np.zeros((settings.seeds, betas.size))} for m in METHODS}
        j_star, j_ref = [], []
        for s in progress(f"overopt {kind}", iterable=range(settings.seeds)):
            inst = _family(kind, s)
            fits = fit_rewards(inst, sample_preferences(inst, n, np.random.default_rng(500 + s)))
            j_star.append(M.optimal_value(inst))
            j_ref.append(M.value(inst, inst.pi_ref))
            for m in METHODS:
                for b, beta in enumerate(betas):
                    pi = estimator_policy(inst, fits, m, float(beta))
                    vals[m]["J"][s, b] = M.value(inst, pi)
                    vals[m]["kl"][s, b] = M.kl_to_ref(inst, pi)
                    vals[m]["chi2"][s, b] = M.chi2_to_ref(inst, pi)
        fam: dict = {"J_star": float(np.mean(j_star)), "J_ref": float(np.mean(j_ref)), "methods": {}}
        for m in METHODS:
            jm, jse = _mean_se(vals[m]["J"])
            peak = int(np.argmax(jm))
            fam["methods"][m] = {"J_mean": jm, "J_se": jse, "kl_mean": vals[m]["kl"].mean(0),
                                 "chi2_mean": vals[m]["chi2"].mean(0), "peak_beta": float(betas[peak]),
                                 "peak_J": float(jm[peak]), "J_smallest_beta": float(jm[-1]),
                                 "drop": float(jm[peak] - jm[-1])}
        results["families"][kind] = fam
    return results


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


def report_overopt(results: dict) -> str:
    betas = results["betas"]
    lines = ["# Overoptimization vs beta", "",
             f"J(pi_hat) of each estimator at n = {results['n']} as beta goes from {_fmt(betas[0])} to "
             f"{_fmt(betas[-1])} ({results['seeds']} seeds; random: a new instance per seed). `drop` = peak J - J at "
             "the smallest beta (overoptimization: how much is lost by regularising too little).", ""]
    for kind, fam in results["families"].items():
        lines += [f"## {kind} (J* = {_fmt(fam['J_star'])}, J(pi_ref) = {_fmt(fam['J_ref'])})", "",
                  "| method | peak J | at beta | J at smallest beta | drop | chi2 at smallest beta "
                  "| KL at smallest beta |",
                  "|---|---|---|---|---|---|---|"]
        for m in METHODS:
            r = fam["methods"][m]
            lines.append(f"| {LABELS[m]} | {_fmt(r['peak_J'])} | {_fmt(r['peak_beta'], 2)} | "
                         f"{_fmt(r['J_smallest_beta'])} | {_fmt(r['drop'])} | {_fmt(r['chi2_mean'][-1])} | "
                         f"{_fmt(r['kl_mean'][-1])} |")
        lines += ["", f"![overopt {kind}](overopt_{kind}.png)", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- benchmark


def run_bench(settings: Settings) -> dict:
    """Wall time of regularized_optimum on an |X| x |Y| Dirichlet(0.3) instance for kl, chi2, chi2mix."""
    size = 200 if settings.quick else 1000
    inst = random_instance(size, size, concentration=0.3, seed=0)
    rows = []
    cases = [(div, beta) for div in OPTIMUM_DIVERGENCES for beta in (1.0, 0.01)]
    for div, beta in progress("bench", iterable=cases):
        times = []
        for _ in range(1 if settings.quick else 3):
            t0 = time.perf_counter()
            pi = regularized_optimum(inst.pi_ref, inst.reward, beta, div)
            times.append(time.perf_counter() - t0)
        rows.append({"divergence": div, "beta": beta, "seconds_min": min(times), "seconds_max": max(times),
                     "max_row_sum_error": float(np.abs(pi.sum(1) - 1).max())})
    return {"size": size, "rows": rows}


def report_bench(results: dict) -> str:
    s = results["size"]
    lines = [f"# regularized_optimum benchmark ({s} contexts x {s} actions, float64, this machine)", "",
             "| divergence | beta | seconds (best of runs) | max |row sum - 1| |", "|---|---|---|---|"]
    for r in results["rows"]:
        lines.append(f"| {r['divergence']} | {r['beta']:g} | {r['seconds_min']:.3f} | {r['max_row_sum_error']:.1e} |")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------- drivers

EXPERIMENTS = ("regret", "bound", "overopt", "online")


def _compute(name: str, settings: Settings) -> tuple[dict, str, dict[str, Callable[[Path], None]]]:
    """Results, report text and plots of one experiment."""
    if name == "regret":
        res = run_regret(settings)
        return res, report_regret(res), {f"regret_{k}.png": _plot_regret(res, k) for k in res["families"]}
    if name == "bound":
        res = run_bound(settings)
        return res, report_bound(res), {"bound.png": _plot_bound(res)}
    if name == "overopt":
        res = run_overopt(settings)
        return res, report_overopt(res), {f"overopt_{k}.png": _plot_overopt(res, k) for k in res["families"]}
    if name == "online":
        from chipo.bandit import online_experiment as O  # imports this module: import it lazily

        res = O.run_online_experiment(settings)
        return res, O.report_online(res), {"online.png": O.plot_online(res)}
    if name == "bench":
        res = run_bench(settings)
        return res, report_bench(res), {"bench.png": _plot_bench(res)}
    raise ValueError(f"unknown experiment {name!r}")


def run_experiment(name: str, out_dir: Path, settings: Settings) -> tuple[Path, str]:
    """Run one experiment (``regret``, ``bound``, ``overopt``, ``online``, ``bench``); write it to out_dir/name."""
    t0 = time.perf_counter()
    # Small-tensor work throughout: one thread avoids the thread-pool wait (see chipo.bandit._threads). The
    # benchmark keeps the default threads since its 1e6-entry tensors do benefit from them.
    with contextlib.nullcontext() if name == "bench" else single_thread():
        res, report, plots = _compute(name, settings)
    res["wall_seconds"] = time.perf_counter() - t0
    res["settings"] = {"seeds": settings.seeds, "tune_seeds": settings.tune_seeds, "quick": settings.quick,
                       "kl_trap_n": settings.kl_trap_n}
    report += f"\n_Wall time: {res['wall_seconds']:.1f} s; settings: {res['settings']}._\n"
    return write_experiment(Path(out_dir) / name, report, res, plots), report


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


def run_all(out_dir: Path, settings: Settings) -> Path:
    """Every experiment plus the benchmark; a top-level report.md concatenates their reports."""
    out_dir = Path(out_dir)
    sections = []
    for name in (*EXPERIMENTS, "bench"):
        _, report = run_experiment(name, out_dir, settings)
        sections.append(report.replace("](", f"]({name}/"))
    (out_dir / "report.md").write_text("# chipo bandit: the exact theory testbed\n\n" + "\n\n".join(sections))
    return out_dir
