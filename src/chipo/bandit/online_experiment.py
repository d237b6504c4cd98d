"""``chipo bandit online``: regret of online DPO, XPO and chi-squared XPO against the number of rounds.

Instance ``rare_best`` (``chipo.bandit.instances.rare_best_instance``): one context, 6 responses, the best one
(reward 1) produced by pi_ref with probability 0.02, a safe one (reward 0.5) with 0.6. Regret is
J(pi*) - J(pi_t), J the true (unregularised) expected reward, averaged over seeds (mean +- standard error).

Fixed, untuned settings (stated in the report): beta = 0.05 for the KL link and 0.002 for chiPO's link, chosen
so that the beta-regularised optimum of the *true* reward has regret below 0.001 for both (the regret floor of
each method, reported); bonus weight gamma = alpha / beta = 0.03 for both XPO variants (alpha = gamma * beta).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from chipo.bandit.common import Settings, progress  # noqa: E402
from chipo.bandit.instances import rare_best_instance  # noqa: E402
from chipo.bandit.online import ONLINE_METHODS, run_online  # noqa: E402
from chipo.bandit.optimum import regularized_optimum  # noqa: E402
from chipo.bandit.reports import _fmt  # noqa: E402
from chipo.markdown import markdown_table  # noqa: E402
from chipo.stats import mean_se  # noqa: E402

BETAS = {"kl": 0.05, "chi2mix": 0.002}
"""beta per link (module docstring)."""
GAMMA = 0.03
"""Bonus weight alpha / beta of XPO and chi-squared XPO."""
LABELS = {"online_dpo": "online DPO", "xpo": "XPO", "chi2_xpo": "chi2-XPO"}
COLORS = {"online_dpo": "tab:red", "xpo": "tab:orange", "chi2_xpo": "tab:blue"}


def run_online_experiment(settings: Settings) -> dict:
    """Regret curves [seed, round] of every method on ``rare_best``; summary at checkpoint rounds."""
    rounds = 40 if settings.quick else 300
    inst = rare_best_instance(n_actions=6, best_prob=0.02)
    checkpoints = [t for t in (0, 1, 3, 10, 30, 100, 300, 1000) if t <= rounds]
    results: dict = {"rounds": rounds, "seeds": settings.seeds, "gamma": GAMMA, "checkpoints": checkpoints,
                     "instance": {"name": inst.name, "Y": inst.n_actions, "pi_ref": inst.pi_ref[0],
                                  "reward": inst.reward[0], "r_max": inst.r_max}, "methods": {}}
    bar = progress("online", total=len(ONLINE_METHODS) * settings.seeds)
    for method, (link, bonus) in ONLINE_METHODS.items():
        beta = BETAS[link]
        curves, draws = [], []
        for s in range(settings.seeds):
            run = run_online(inst, method, rounds, beta, GAMMA, np.random.default_rng(20_000 + s))
            curves.append(run.regret)
            draws.append(run.best_action_draws)
            bar.update()
        curves = np.array(curves)
        mean, se = mean_se(curves, axis=0)
        floor_pi = regularized_optimum(inst.pi_ref, inst.reward, beta, link)
        results["methods"][method] = {
            "link": link, "beta": beta, "alpha": GAMMA * beta if bonus else 0.0, "regret_mean": mean,
            "regret_se": se, "at": {str(t): [float(mean[t]), float(se[t])] for t in checkpoints},
            "floor": float(inst.reward.max() - (floor_pi * inst.reward).sum()),
            "best_action_draws_mean": float(np.mean(draws)), "per_seed_final": curves[:, -1]}
    bar.close()
    return results


def plot_online(results: dict) -> Callable[[Path], None]:
    def draw(path: Path) -> None:
        fig, ax = plt.subplots(figsize=(6.5, 4.2))
        t = np.arange(results["rounds"] + 1)
        for m, rec in results["methods"].items():
            mean, se = np.asarray(rec["regret_mean"]), np.asarray(rec["regret_se"])
            ax.plot(t, mean, color=COLORS[m], label=f"{LABELS[m]} (beta={rec['beta']:g})")
            ax.fill_between(t, mean - se, mean + se, color=COLORS[m], alpha=0.2)
        ax.set(xscale="symlog", xlabel="round t", ylabel="regret J(pi*) - J(pi_t)",
               title=f"online preference optimization, {results['instance']['name']}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
    return draw


def _online_table(results: dict) -> str:
    """Per method: regret +- s.e. at each checkpoint round, its floor and how often the best response was drawn."""
    cps = results["checkpoints"]
    rows = [[LABELS[m], f"{rec['beta']:g}", f"{rec['alpha']:g}",
             *(f"{_fmt(rec['at'][str(t)][0])} +- {_fmt(rec['at'][str(t)][1], 2)}" for t in cps),
             _fmt(rec["floor"], 2), _fmt(rec["best_action_draws_mean"], 3)] for m, rec in results["methods"].items()]
    return markdown_table(["method", "beta", "alpha", *(f"t={t}" for t in cps), "floor", "best draws"], rows)


def report_online(results: dict) -> str:
    inst = results["instance"]
    lines = ["# Online preference optimization: online DPO vs XPO vs chi-squared XPO", "",
             f"Instance {inst['name']}: one context, {inst['Y']} responses, pi_ref = "
             + ", ".join(_fmt(p, 2) for p in inst["pi_ref"]) + "; rewards " + ", ".join(_fmt(r, 2) for r in
                                                                                   inst["reward"])
             + ". The best response is the one pi_ref rarely produces. One Bradley-Terry-labelled pair per round; "
             "the policy is the exact minimiser of the cumulative loss (XPO: best of two L-BFGS-B starts, the "
             "objective being non-convex). Regret J(pi*) - J(pi_t), J the true expected reward (not the "
             f"regularised objective); mean +- standard error over {results['seeds']} seeds. XPO bonus weight "
             f"gamma = alpha / beta = {results['gamma']:g}. `floor`: regret of the beta-regularised optimum of the "
             "true reward (what each method converges to at best). `best draws`: mean number of times the best "
             "response was drawn over the run.", "", _online_table(results), "", "![online](online.png)", ""]
    return "\n".join(lines)
