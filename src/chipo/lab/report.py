"""The sweep report: ``report.md``, PNG plots (``chipo.lab.plots``), the raw results as JSON and CSV.

Generic over whatever the sweep ran (any losses, links and options as methods): every number comes from the
results table (``chipo.lab.tables``; its markdown tables are ``chipo.lab.report_tables``, this module writes the
prose around them) and every claim from a verdict function (``chipo.lab.verdicts``) that states
its sentence only when its paired test across seeds passes after Holm's adjustment over all of the report's
claims. A caller (``chipo demo``) adds its own claims and sections through ``Extra``; they join the same Holm
family. The report is written to a temporary directory and renamed into place, so a reader never sees half a
report.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from chipo.io import atomic_directory, write_json
from chipo.lab import tables, verdicts
from chipo.lab.plots import plot_all
from chipo.lab.report_rlhf import rlhf_curves, rlhf_text, write_rlhf_section  # noqa: F401 -- public API
from chipo.lab.report_tables import MC_KL, claims_table, frontier_table, mechanism_table, metrics_table, per_seed_table
from chipo.lab.sweep import read_results

ALPHA = 0.05


@dataclass
class Extra:
    """What a caller adds: claims (joining the Holm family) and markdown sections given the adjusted claims."""

    claims: Callable[[pd.DataFrame, dict], list[verdicts.Claim]]
    sections: Callable[[pd.DataFrame, dict, list[verdicts.Claim]], list[str]]
    plan: Callable[[list[str], list[float], list[int]], list[str]] | None = None  # ``claims`` from the design alone


def claim_plan(df: pd.DataFrame, extra: Extra | None = None) -> list[str]:
    """The report's family of claims described from the sweep's design (methods, betas, epochs), not its results:
    ``chipo demo`` records it before training (``meta["plan"]``)."""
    names = tables.methods(df)
    options = df.groupby("method")["options"].first().to_dict() if "options" in df else {}
    plan = verdicts.planned_claims(names, options, tables.betas(df), tables.epochs(df), verdicts.comparisons(df))
    if extra and extra.plan:
        plan += extra.plan(names, tables.betas(df), tables.epochs(df))
    return plan


def power_design(n_seeds: int, m: int, alpha: float = ALPHA) -> str:
    """What the design can show, from the seed count and the number of claims alone (``chipo.stats.t_power``)."""
    from chipo import stats

    level = stats.holm_first_level(alpha, m)
    if n_seeds < 2:
        return f"With {n_seeds} seed no claim can be tested (a paired t test needs 2)."
    one, two = (stats.detectable_effect_sd(n_seeds, level, verdicts.POWER, alt) for alt in ("greater", "two-sided"))
    p_one, p_two = (stats.t_power(verdicts.STATED_EFFECT_SD, n_seeds, level, alt) for alt in ("greater", "two-sided"))
    return (f"Power, from the design alone (paired t across {n_seeds} seeds, noncentral t): Holm's procedure over "
            f"{m} claims tests the smallest p-value at alpha/m = {level:.2g}, and a claim whose p is at most that "
            f"always passes, so the powers below are lower bounds (conservative). At it a one-sided claim detects a "
            f"true effect of {one:.2f} standard deviations of the per-seed differences with {verdicts.POWER:.0%} "
            f"power, a two-sided one {two:.2f}; at an effect of {verdicts.STATED_EFFECT_SD:g} sd the power is "
            f"{p_one:.2f} (one-sided) and {p_two:.2f} (two-sided).")


def power_summary(n_seeds: int, m: int, alpha: float = ALPHA) -> str:
    """``power_design`` in one line."""
    from chipo import stats

    if n_seeds < 2:
        return f"with {n_seeds} seed no claim can be tested (a paired t test needs 2)"
    level = stats.holm_first_level(alpha, m)
    one, two = (stats.detectable_effect_sd(n_seeds, level, verdicts.POWER, alt) for alt in ("greater", "two-sided"))
    return (f"{n_seeds} seeds at Holm's first level {level:.2g} detect {one:.2f} sd (one-sided) / {two:.2f} sd "
            f"(two-sided) with {verdicts.POWER:.0%} power")


def plan_section(df: pd.DataFrame, meta: dict, extra: Extra | None, claims: list[verdicts.Claim]) -> list[str]:
    plan = meta.get("plan")
    fixed = plan is not None
    plan = plan if fixed else claim_plan(df, extra)
    out = ["## Claims fixed before the run", "",
           ("Recorded by `chipo demo` before training, from the design alone (methods, betas, evaluated epochs); "
            if fixed else "Derived from the sweep's design (methods, betas, evaluated epochs), not its results; ")
           + "the Verdicts section below tests exactly these, in this order, as one Holm family.", ""]
    out += [f"{i}. {text}" for i, text in enumerate(plan, 1)]
    if len(plan) != len(claims):
        out += ["", f"Note: {len(claims)} claims were tested, not the {len(plan)} planned (the sweep lacks a method, "
                "beta or epoch the plan needs)."]
    return out + ["", power_design(len(tables.seeds(df)), len(claims))]


# ---------------------------------------------------------------------------------------------------- sections


def _sd_ratio_range(n: int) -> str:
    """The 90% range of s / sigma for the sample s.d. of n normal values: how far 'detectable' in units can be off."""
    from scipy import stats as sps

    lo, hi = (float(np.sqrt(sps.chi2.ppf(q, n - 1) / (n - 1))) for q in (0.05, 0.95))
    return f"x{lo:.2f} to x{hi:.2f}"


def claims_section(df: pd.DataFrame, claims: list[verdicts.Claim]) -> list[str]:
    from chipo import stats

    n_seeds = len(tables.seeds(df))
    level = stats.holm_first_level(ALPHA, len(claims))
    effect = verdicts.STATED_EFFECT_SD
    out = ["## Verdicts", "",
           f"Each claim is a paired t test across the {n_seeds} seed(s) (a seed shares its preference data across "
           f"methods); Holm's adjustment runs over all {len(claims)} claims of this report; the word is 'holds' "
           "(one-sided claim) or 'significant' (two-sided) only when the adjusted p is at most 5%, else 'not "
           f"shown'. 'Detectable': the smallest true difference the test detects with {verdicts.POWER:.0%} power "
           f"at Holm's first level alpha/m = {level:.2g} (conservative: a claim with p at most alpha/m always "
           "passes), in standard deviations of the per-seed differences (exact for normal differences) and in "
           "the claim's units through the seeds' own s.d. (an estimate"
           + (f": with {n_seeds} seeds it lies {_sd_ratio_range(n_seeds)} of the true s.d. 90% of the time"
              if n_seeds > 2 else "") + f"). 'Power at {effect:g} sd': the probability the claim passes at "
           f"alpha/m when its true effect is {effect:g} standard deviations (noncentral t). 'Halves': the same "
           "test on the first half of the seeds / on the rest (5%, no Holm): how stable the verdict is; a half of "
           "one seed can never pass.", "", claims_table(df, claims, level, ALPHA)]
    shown = [c.statement() for c in claims if c.statement()]
    out += ["", "What the data show (claims that pass):", ""]
    out += [f"- {s}" for s in shown] or [f"- None: no claim passes at 5% after Holm's adjustment with {n_seeds} "
                                         "seed(s). Differences smaller than the 'detectable' column cannot be told "
                                         "from seed-to-seed noise here; more seeds would shrink it."]
    return out


def frontier_section(df: pd.DataFrame, keys: dict, claims: list[verdicts.Claim]) -> list[str]:
    side_by_side = keys["exact"] and MC_KL in df and keys["kl"] != MC_KL
    out = ["## The frontier at matched distance", "",
           "Per method: the best gold reward over the evaluated epochs (oracle early stopping, pi_ref included), "
           "the gold reward where the run first reaches each sqrt(KL) level (linear between the evaluations "
           "around it), and at the last epoch. Levels: fractions of the distance every run at that beta reaches, "
           f"so every method has a value; distance: sqrt of the {keys['kl_name']}, in nats^1/2. Mean ± s.e. over "
           "seeds."]
    if side_by_side:
        out[-1] += (" The same with the Monte-Carlo KL (k3 on the policy's own samples: unbiased for the KL of "
                    "the responses as sampled, which keeps text outside the language apart) follows each table: "
                    "the partition KL lumps all text outside the language into a few cells, so it understates "
                    "the distance of a policy that puts mass there, and a comparison at "
                    "matched partition KL favours the method that pushes more mass out. The tests below use the "
                    "partition KL as fixed before the run; read them beside the Monte-Carlo table and the "
                    "out-of-language column.")
    out.append("")
    for beta in tables.betas(df):
        out += [f"beta {beta:g}, distance = partition KL (the tests' distance):" if side_by_side else f"beta {beta:g}:",
                "", frontier_table(df, keys, beta, keys["kl"], side_by_side)]
        if side_by_side:
            out += ["", f"beta {beta:g}, distance = Monte-Carlo KL (k3):", ""]
            out.append(frontier_table(df, keys, beta, MC_KL, True))
        out += ["", "Which the data support (better frontier = higher gold at the largest matched sqrt KL; slower "
                "drift = closer to pi_ref at the last epoch; each only when its test passes after Holm):", ""]
        for a, b in verdicts.comparisons(df):
            out.append(f"- {a} against {b}: {verdicts.frontier_reading(claims, a, b, beta)}.")
        out.append("")
    return out


def mechanism_section(df: pd.DataFrame, files: list[str]) -> list[str]:
    if "mass.mass_chosen" not in df:
        return []
    last = tables.epochs(df)[-1]
    out = ["## Where the probability goes", "",
           "On the training prompts, the policy's probability of: the responses chosen in its training pairs; "
           "those rejected (and never chosen); every other response of the language; text outside the language "
           "(gold reward 0). The four sum to 1. 'clip %': training pairs the loss clips, so they give no gradient "
           "(a margin clip at 2 r_max, or a reward bound; 0 for losses without either). Implicit "
           "accuracy: pairs the implicit reward beta * link(pi/pi_ref) orders like the label, on the training "
           f"pairs and on held-out pairs. pi_ref (epoch 0) and epoch {last}, mean ± s.e. over seeds.", "",
           mechanism_table(df, last)]
    out += [""] + [f"![{f}]({f})" for f in files if f.startswith("mechanism")]
    return out


def how_to_read(keys: dict) -> list[str]:
    out = ["## How to read the numbers", ""]
    out += [f"- **{name}**: {text}." for name, text in tables.COLUMN_HELP.items()]
    out.append("- Headline numbers are " + ("exact: gold reward and win rates over a partition of all responses on "
                                            "whose cells the gold reward is constant; KL and chi-squared over that "
                                            "partition are lower bounds of the sequence values (data processing)."
                                            if keys["exact"] else "Monte-Carlo estimates from the policy's samples."))
    out.append("- Per-run standard errors (in results.json) cluster samples by prompt; ± in the tables is the "
               "standard error over seeds.")
    return out


# ---------------------------------------------------------------------------------------------------- the report


def write_report(sweep_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                 meta: dict | None = None, analysis: str | None = None, extra: Extra | None = None) -> Path:
    """Write ``report.md``, plots, ``results.json`` and ``results.csv`` into ``out_dir`` (default sweep/report)."""
    sweep_dir = Path(sweep_dir)
    rows = read_results(sweep_dir / "results.jsonl")
    if not rows:
        raise FileNotFoundError(f"{sweep_dir / 'results.jsonl'}: no results to report")
    if meta is None and (sweep_dir / "meta.json").is_file():
        meta = json.loads((sweep_dir / "meta.json").read_text())
    meta = meta or {}
    df = tables.results_table(rows)
    keys = tables.headline(df)
    claims = verdicts.report_claims(df, keys) + (extra.claims(df, keys) if extra else [])
    claims = verdicts.holm(claims, ALPHA)
    final = Path(out_dir) if out_dir is not None else sweep_dir / "report"
    with atomic_directory(final) as tmp:
        files = plot_all(df, keys, tmp)
        level = ALPHA / max(len(claims), 1)  # Holm's first level, as in the Verdicts table
        write_json(tmp / "results.json", {"rows": rows, "claims": [
            {**c.verdict.__dict__, "detectable_level": level, "detectable": c.detectable(level),
             "detectable_sd": c.detectable_sd(level),
             f"power_at_{verdicts.STATED_EFFECT_SD:g}_sd": c.power(verdicts.STATED_EFFECT_SD, level),
             "statement": c.statement()} for c in claims], "meta": meta})
        tables.results_table(rows).to_csv(tmp / "results.csv", index=False)
        text = render_markdown(df, keys, claims, files, meta, analysis, extra, rows)
        (tmp / "report.md").write_text(text)
    return final / "report.md"


def setup_section(df: pd.DataFrame, meta: dict) -> list[str]:
    """What ran: the caller's setup lines, the methods, betas, seeds, epochs, training and evaluation settings."""
    ref = df[df["method"] == "pi_ref"]
    config = meta.get("sweep_config", {})
    out = ["## Setup", ""]
    out += [f"- {key}: {value}" for key, value in meta.get("setup", {}).items()]
    described = df[df["method"] != "pi_ref"].groupby("method", sort=False)[["loss", "options"]].first()
    out.append("- methods: " + "; ".join(f"{m} = {r['loss']}" + (f" with {r['options']}" if r["options"] else "")
                                         for m, r in described.iterrows()))
    out.append(f"- betas: {', '.join(f'{b:g}' for b in tables.betas(df))}; seeds: "
               f"{', '.join(map(str, tables.seeds(df)))}; evaluated epochs: "
               f"{', '.join(map(str, tables.epochs(df)))} (0 = pi_ref)")
    if config:
        out.append(f"- training: constant learning rate {config.get('learning_rate')}, batch "
                   f"{config.get('batch_size')} pairs, AdamW, r_max {config.get('r_max')!s} (margin clip of the "
                   "losses that clip), pairs with chosen == rejected dropped, reference log-probs cached")
    if not ref.empty:
        r = ref.iloc[0]
        out.append(f"- evaluation: {int(r['n_prompts'])} held-out prompts x "
                   f"{int(r['n_samples']) // max(int(r['n_prompts']), 1)} samples per policy")
    return out


def render_markdown(df, keys, claims, files, meta, analysis, extra: Extra | None, rows: list[dict]) -> str:
    out = [f"# {meta.get('title', 'chipo overoptimization lab report')}", ""]
    if meta.get("summary"):
        out += [meta["summary"], ""]
    out += setup_section(df, meta) + [""] + how_to_read(keys) + [""]
    out += plan_section(df, meta, extra, claims) + [""]
    if extra:
        out += extra.sections(df, keys, claims) + [""]
    out += claims_section(df, claims) + [""] + frontier_section(df, keys, claims)
    out += mechanism_section(df, files)
    if analysis:
        out += ["", "## Analysis", "", analysis]
    out += ["", "## Per seed", "", "Gold win rate against pi_ref (%) of every run, so the spread behind the means "
            "is visible.", "", per_seed_table(df, keys), "", "## Plots", ""]
    out += [f"![{f}]({f})" for f in files if not f.startswith("mechanism")]
    out += ["", "## All metrics (mean ± standard error over seeds)", "", metrics_table(df, keys), "",
            "KL k3 (MC) is `chipo.divergences.KL.estimate_from_policy` (E_pi[1/z - 1 + log z]) on the policy's "
            "samples. chi-squared is 1/2 E_ref[(z - 1)^2] (Huang et al. 2024); its Monte-Carlo estimator has "
            "variance growing with the distance itself, so large values are noisy lower bounds."]
    out += examples_section(rows)
    out += ["", "## Machine, versions, time", ""]
    out += [f"- {key}: {value}" for key, value in {**meta.get("machine", {}), **meta.get("timing", {})}.items()]
    out += ["", "Raw results: `results.json` (rows and every claim's test), `results.csv` (one row per method, "
            "beta, seed, epoch)."]
    return "\n".join(out) + "\n"


def examples_section(rows: list[dict]) -> list[str]:
    """A few responses of pi_ref and of every method at the last epoch (first seed), with their gold reward."""
    from chipo.lab.sweep import row_method

    trained = [r for r in rows if r["loss"] != "pi_ref"]
    if not trained:
        return []
    last, first_seed = max(r["epoch"] for r in trained), min(r["seed"] for r in trained)
    shown = [r for r in rows if r["loss"] == "pi_ref"] + [r for r in trained if r["epoch"] == last
                                                          and r["seed"] == first_seed]
    out = ["", "## Sample responses (first held-out prompts; gold reward in brackets)", ""]
    for r in shown:
        if not r.get("examples"):
            continue
        who = "pi_ref" if r["loss"] == "pi_ref" else f"{row_method(r)} beta {r['beta']:g} epoch {r['epoch']} " \
                                                     f"(seed {r['seed']})"
        out.append(f"- {who}: " + "; ".join(f"`{e['prompt']}` -> `{e['response'] or '(empty)'}` ({e['gold']:.2f})"
                                            for e in r["examples"][:4]))
    return out
