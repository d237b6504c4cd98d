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
import math
import time
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import numpy as np  # noqa: E402

from chipo.bandit import measures as M  # noqa: E402
from chipo.bandit import online_experiment as O  # noqa: E402
from chipo.bandit._threads import single_thread  # noqa: E402
from chipo.bandit.common import Settings, progress, write_experiment  # noqa: E402
from chipo.bandit.estimators import ESTIMATORS, estimator_policy, fit_rewards, sample_preferences  # noqa: E402
from chipo.bandit.instances import Instance, kl_trap_instance, random_instance  # noqa: E402
from chipo.bandit.optimum import OPTIMUM_DIVERGENCES, regularized_optimum  # noqa: E402
from chipo.bandit.rates import bootstrap_rates  # noqa: E402
from chipo.bandit.reports import (  # noqa: E402
    _plot_bench,
    _plot_bound,
    _plot_overopt,
    _plot_regret,
    report_bench,
    report_bound,
    report_overopt,
    report_regret,
)
from chipo.stats import mean_se  # noqa: E402

METHODS = tuple(ESTIMATORS)
C_BOUND = 2.0
"""Concentrability budget of the second comparator: the best policy with C^pi = 1 + 2 D_chi2 <= 2."""


# ----------------------------------------------------------------------------------------------------- helpers


def theory_beta(inst: Instance, n: int) -> float:
    """R_max sqrt(|X||Y| / (n C^{pi*})) (module docstring)."""
    c_star = M.concentrability(inst, M.optimal_policy(inst))
    return float(inst.r_max * math.sqrt(inst.n_contexts * inst.n_actions / (n * c_star)))


def loglog_slope(n: list[int] | np.ndarray, y: list[float] | np.ndarray) -> float:
    """Least-squares slope of log y against log n (nan if fewer than two positive points)."""
    n, y = np.asarray(n, float), np.asarray(y, float)
    ok = y > 0
    if ok.sum() < 2:
        return float("nan")
    return float(np.polyfit(np.log(n[ok]), np.log(y[ok]), 1)[0])


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
                mean, se = mean_se(held[m][:, b], axis=0)
                th_mean, th_se = mean_se(held[f"{m}@theory"], axis=0)
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
            jm, jse = mean_se(vals[m]["J"], axis=0)
            peak = int(np.argmax(jm))
            fam["methods"][m] = {"J_mean": jm, "J_se": jse, "kl_mean": vals[m]["kl"].mean(0),
                                 "chi2_mean": vals[m]["chi2"].mean(0), "peak_beta": float(betas[peak]),
                                 "peak_J": float(jm[peak]), "J_smallest_beta": float(jm[-1]),
                                 "drop": float(jm[peak] - jm[-1])}
        results["families"][kind] = fam
    return results


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


def run_all(out_dir: Path, settings: Settings) -> Path:
    """Every experiment plus the benchmark; a top-level report.md concatenates their reports."""
    out_dir = Path(out_dir)
    sections = []
    for name in (*EXPERIMENTS, "bench"):
        _, report = run_experiment(name, out_dir, settings)
        sections.append(report.replace("](", f"]({name}/"))
    (out_dir / "report.md").write_text("# chipo bandit: the exact theory testbed\n\n" + "\n\n".join(sections))
    return out_dir
