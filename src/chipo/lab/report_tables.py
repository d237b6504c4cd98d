"""The sweep report's tables (``chipo.lab.report``), one render function each, all written by
``chipo.markdown.markdown_table``: every number comes from the results table (``chipo.lab.tables``) and every test
from a claim of ``chipo.lab.verdicts``; the prose around them stays in ``chipo.lab.report``."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from chipo.lab import tables, verdicts
from chipo.markdown import markdown_table


def fmt(mean: float, se: float = math.nan, scale: float = 1.0, digits: int = 1, missing: str = "n/a") -> str:
    """``mean ± se`` (both times ``scale``, ``digits`` decimals) for every report table of the lab; the ``± se``
    part only when se is known, ``missing`` when the mean is not."""
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return missing
    text = f"{mean * scale:.{digits}f}"
    if se is not None and not math.isnan(se):
        text += f" ± {se * scale:.{digits}f}"
    return text


def fmt_g(mean: float, se: float = math.nan) -> str:
    if mean is None or math.isnan(mean):
        return "n/a"
    return f"{mean:.3g}" + (f" ± {se:.2g}" if se is not None and not math.isnan(se) else "")


def _p(p: float) -> str:
    return "n/a" if math.isnan(p) else f"{p:.3f}" if p >= 0.001 else f"{p:.1e}"


def _claim_row(df: pd.DataFrame, c: verdicts.Claim, level: float, alpha: float) -> list[str]:
    """One claim's cells: estimate, p, Holm p, word, detectable difference at ``level``, power, the halves' tests
    (each half at ``alpha``, no Holm)."""
    v = c.verdict
    halves = verdicts.split_half(df, c, alpha)
    unit = f" {c.unit}" if c.unit else ""
    detectable, detectable_sd = c.detectable(level), c.detectable_sd(level)
    if math.isnan(detectable_sd):
        detect_text = "n/a (needs 2 seeds)"
    else:
        detect_text = f"{detectable_sd:.2f} sd" + ("" if math.isnan(detectable) else
                                                    f" = {detectable * c.scale:.3g}{unit}")
    power = c.power(verdicts.STATED_EFFECT_SD, level)
    return [v.claim, "n/a" if math.isnan(v.estimate) else f"{v.estimate * c.scale:+.3g}{unit}", _p(v.p),
            _p(v.p_adjusted), v.word(), detect_text, "n/a" if math.isnan(power) else f"{power:.2f}",
            "n/a" if halves is None else " / ".join("pass" if h else "no" for h in halves)]


def claims_table(df: pd.DataFrame, claims: list[verdicts.Claim], level: float, alpha: float) -> str:
    """Every claim's test, in the family's order; 'detectable' and 'power' at Holm's first level ``level``."""
    head = ["claim", "estimate", "p", "Holm p", "verdict", "detectable at alpha/m",
            f"power at {verdicts.STATED_EFFECT_SD:g} sd", "halves"]
    return markdown_table(head, (_claim_row(df, c, level, alpha) for c in claims))


MC_KL = "kl_k3"
"""The Monte-Carlo KL of every evaluation (``chipo.divergences.KL.estimate_from_policy`` on the policy's own
samples): unbiased for the KL between the responses as sampled (cut at max_new_tokens, itself at most the
sequence KL), where the exact KL over the world's partition is a lower bound that lumps all text outside the
language into a few cells (it understates distance most where mass leaves the language, so a comparison at
matched partition KL favours the method that pushes more mass out)."""


def frontier_table(df: pd.DataFrame, keys: dict, beta: float, kl: str, with_mass: bool) -> str:
    """Per method at ``beta``: best gold (and its epoch), gold at matched sqrt(``kl``) levels, final gold and distance;
    ``with_mass`` adds the other KL estimate and the out-of-language mass at the last epoch."""
    keyed = {**keys, "kl": kl}
    levels = tables.distance_levels(df, beta, kl)
    head = ["method", "best gold (mean epoch)"] + [f"gold at sqrt KL {lv:.3g}" for lv in levels] + \
        ["final gold", "final sqrt KL"] + (["final sqrt KL, other estimate", "final out of language %"]
                                           if with_mass else [])
    rows = []
    other = MC_KL if kl != MC_KL else keys["kl"]
    for m in tables.methods(df):
        f = tables.frontier(df, m, beta, keyed, levels)
        best = fmt_g(*tables.mean_and_se(f["best"])) + f" ({fmt(np.nanmean(f['best_epoch']), digits=1)})"
        cells = [best] + [fmt_g(*tables.mean_and_se(f[f"at_{i}"])) for i in range(len(levels))]
        cells += [fmt_g(*tables.mean_and_se(f["final"])), fmt_g(*tables.mean_and_se(f["final_distance"]))]
        if with_mass:
            last = tables.epochs(df)[-1]
            cells += [fmt_g(*tables.mean_and_se(np.sqrt(np.clip(tables.at_epoch(df, m, beta, other, last), 0, None)))),
                      fmt(*tables.mean_and_se(tables.at_epoch(df, m, beta, "exact.mass_malformed", last)), 100)]
        rows.append([m, *cells])
    return markdown_table(head, rows)


def mechanism_table(df: pd.DataFrame, last: int) -> str:
    """Per method and beta: pi_ref's row (once, epoch 0) and the last epoch's, mean ± s.e. in percent."""
    names = [f"mass.{p}" for p in tables.MASS_PARTS] + ["clip_frac", "train_acc_exact", "implicit_acc"]
    agg = tables.aggregate(tables.with_start(df), names)
    rows = []
    for beta in tables.betas(df):
        for m in tables.methods(df):
            for epoch in (0, last):
                g = agg[(agg["method"] == m) & (agg["beta"] == beta) & (agg["epoch"] == epoch)]
                if g.empty or (epoch == 0 and m != tables.methods(df)[0]):
                    continue
                r = g.iloc[0]
                rows.append(["pi_ref" if epoch == 0 else m, f"{beta:g}", epoch,
                             *(fmt(r[n], r[f"{n}_se"], 100) for n in names)])
    return markdown_table(["method", "beta", "epoch", "chosen %", "rejected %", "other in-language %",
                           "out of language %", "clip %", "implicit acc train %", "held-out %"], rows)


def per_seed_table(df: pd.DataFrame, keys: dict) -> str:
    es = tables.epochs(df)
    rows = []
    for beta in tables.betas(df):
        for m in tables.methods(df):
            seeds = tables.seeds(df)
            got, values = tables.seed_matrix(df, m, beta, keys["win"], seeds)
            for i, seed in enumerate(seeds):
                cells = [fmt(values[i, got.index(e)] if e in got else math.nan, scale=100) for e in es]
                rows.append([m, f"{beta:g}", seed, *cells])
    return markdown_table(["method", "beta", "seed", *(f"epoch {e}" for e in es)], rows)


def metrics_table(df: pd.DataFrame, keys: dict) -> str:
    cols = [("win vs pi_ref %", keys["win"], 100), ("win vs reference %", keys["reference"], 100),
            ("gold", keys["gold"], None), ("sqrt KL" + (" (partition)" if keys["exact"] else ""), "sqrt_kl", None),
            ("sqrt KL (MC k3)", "sqrt_kl_mc", None), ("KL k3 (MC)", MC_KL, None),
            ("chi2", keys["chi2"], None), ("out of language %", "exact.mass_malformed", 100),
            ("length", "length_mean", None), ("implicit acc held-out %", "implicit_acc", 100)]
    runs = tables.with_start(df)
    runs = runs.assign(sqrt_kl=np.sqrt(runs[keys["kl"]].astype(float).clip(lower=0)))
    if MC_KL in runs and keys["kl"] != MC_KL:
        runs = runs.assign(sqrt_kl_mc=np.sqrt(runs[MC_KL].astype(float).clip(lower=0)))
    cols = [c for c in cols if c[1] in runs]
    agg = tables.aggregate(runs, [c[1] for c in cols])
    rows = []
    first = tables.methods(df)[0]
    for beta in tables.betas(df):
        for m in tables.methods(df):
            for _, r in agg[(agg["method"] == m) & (agg["beta"] == beta)].sort_values("epoch").iterrows():
                if r["epoch"] == 0 and m != first:
                    continue
                cells = [fmt(r[n], r[f"{n}_se"], s) if s else fmt_g(r[n], r[f"{n}_se"]) for _, n, s in cols]
                rows.append(["pi_ref" if r["epoch"] == 0 else m, f"{beta:g}", int(r["epoch"]), *cells])
    return markdown_table(["method", "beta", "epoch", *(c[0] for c in cols)], rows)
