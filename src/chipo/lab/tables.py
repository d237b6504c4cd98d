"""The sweep's results as a table (pandas), and the per-seed arrays every verdict and plot is computed from.

``results_table`` flattens ``results.jsonl`` into one row per (method, beta, seed, epoch): scalar metrics as they
are, the exact block as ``exact.<name>``, where the mass goes as ``mass.<name>`` (pi_ref's value on the same
training pairs as ``mass_ref.<name>``). pi_ref is the row with ``method == "pi_ref"`` and epoch 0;
``with_start`` copies it in as epoch 0 of every run, so curves and frontiers start at pi_ref.

Nothing here knows a loss by name: methods are whatever the sweep ran (``chipo.lab.sweep.row_method``).
"""

from __future__ import annotations

import math
from collections import OrderedDict

import numpy as np
import pandas as pd

from chipo.lab.sweep import row_method
from chipo.stats import mean_se

KEYS = ["method", "loss", "beta", "seed", "epoch"]
MASS_PARTS = ("mass_chosen", "mass_rejected", "mass_other_language", "mass_out_of_language")

COLUMN_HELP = {
    "win vs pi_ref %": "probability that the policy's response beats a response of pi_ref under the gold reward "
                       "(ties count 1/2; 50% = no better than pi_ref)",
    "win vs reference %": "the same against the held-out prompts' reference responses (the writers' samples "
                          "stored with each prompt, not pi_ref)",
    "gold": "mean gold reward r*(x, y) of the policy's responses (0 for text outside the language)",
    "sqrt KL": "sqrt(KL(pi || pi_ref)), in nats^1/2 (the distance of Gao et al. 2023)",
    "out of language %": "probability the policy writes text outside the language (gold reward 0)",
    "clip %": "training pairs that give no gradient because the loss clips them (a margin clip |m| > 2 r_max, or a "
              "reward bound)",
    "implicit acc train / held-out %": "pairs ordered correctly by the implicit reward beta * link(pi/pi_ref), on "
                                       "the training pairs and on held-out pairs",
}


def results_table(rows: list[dict]) -> pd.DataFrame:
    """One row per result row; nested blocks flattened (``exact.``, ``mass.``, ``mass_ref.``); lists dropped."""
    flat = []
    for r in rows:
        f = {k: v for k, v in r.items() if not isinstance(v, (dict, list))}
        f["method"] = row_method(r)
        f["options"] = ", ".join(f"{k}={v}" for k, v in sorted((r.get("options") or {}).items()))
        for block in ("exact", "mass", "mass_ref"):
            f.update({f"{block}.{k}": v for k, v in (r.get(block) or {}).items()})
        flat.append(f)
    df = pd.DataFrame(flat)
    for key in KEYS:
        if key not in df:
            df[key] = np.nan
    return df


def headline(df: pd.DataFrame) -> dict:
    """Columns of the headline quantities: exact when every row has them, else the Monte-Carlo estimates.

    The one KL estimate of every gold-vs-KL view: the exact KL over the world's partition of responses (a lower
    bound of the sequence KL) when available, else the Monte-Carlo k3 estimate."""
    exact = "exact.win_rate_vs_ref" in df and bool(df["exact.win_rate_vs_ref"].notna().all())
    return {"win": "exact.win_rate_vs_ref" if exact else "win_rate_vs_ref",
            "gold": "exact.gold" if exact else "gold_mean",
            "kl": "exact.kl" if exact else "kl_k3",
            "kl_name": "exact KL over the partition of responses (a lower bound)" if exact
            else "Monte-Carlo KL, k3 estimator",
            "chi2": "exact.chi2" if exact else "chi2_mc",
            "reference": "exact.win_rate_vs_reference" if exact else "win_rate_vs_reference",
            "exact": exact}


def with_start(df: pd.DataFrame) -> pd.DataFrame:
    """Trained rows plus pi_ref's row as epoch 0 of every (method, beta, seed) run (pi_ref's mass on each run's
    own training pairs from ``mass_ref``)."""
    runs = df[df["method"] != "pi_ref"]
    ref = df[df["method"] == "pi_ref"]
    if ref.empty:
        return runs.copy()
    starts = []
    for (method, loss, beta, seed), g in runs.groupby(["method", "loss", "beta", "seed"], sort=False):
        start = ref.iloc[0].copy()
        start["method"], start["loss"], start["beta"], start["seed"], start["epoch"] = method, loss, beta, seed, 0
        for part in MASS_PARTS:
            if f"mass_ref.{part}" in g:
                start[f"mass.{part}"] = g[f"mass_ref.{part}"].iloc[0]
        # At pi = pi_ref every implicit-reward margin is 0: accuracy 1/2 (ties), no pair at a clip.
        for name, value in (("train_acc_exact", 0.5), ("clip_frac", 0.0), ("implicit_acc", 0.5)):
            if name in g:
                start[name] = value
        starts.append(start)
    return pd.concat([pd.DataFrame(starts), runs], ignore_index=True)


def methods(df: pd.DataFrame) -> list[str]:
    """Methods in the order the sweep first wrote them."""
    return list(dict.fromkeys(m for m in df["method"] if m != "pi_ref"))


def betas(df: pd.DataFrame) -> list[float]:
    return sorted({float(b) for b in df["beta"].dropna()}, reverse=True)


def seeds(df: pd.DataFrame) -> list[int]:
    values = column(df, "seed")
    return sorted({int(s) for s in values[~np.isnan(values)]})


def epochs(df: pd.DataFrame) -> list[int]:
    return sorted({int(e) for e in df["epoch"] if e > 0})


_ARRAYS: OrderedDict[int, tuple[pd.DataFrame, dict[str, np.ndarray]]] = OrderedDict()


def column(df: pd.DataFrame, name: str) -> np.ndarray:
    """``df[name]`` as a numpy array, memoised for the last few tables (the verdicts read the same columns of the
    same table many times; tables here are never modified in place, every change makes a new one)."""
    key = id(df)
    entry = _ARRAYS.get(key)
    if entry is None or entry[0] is not df:
        entry = (df, {})
        _ARRAYS[key] = entry
        while len(_ARRAYS) > 16:
            _ARRAYS.popitem(last=False)
    cache = entry[1]
    if name not in cache:
        values = df[name].to_numpy()
        cache[name] = values.astype(float) if name in ("beta", "seed", "epoch") or values.dtype != object else values
    return cache[name]


def seed_matrix(df: pd.DataFrame, method: str, beta: float, metric: str,
                seed_list: list[int] | None = None) -> tuple[list[int], np.ndarray]:
    """(epochs, values [seeds, epochs]) of one metric for one (method, beta); NaN where missing (the mean where a
    (seed, epoch) repeats)."""
    seed_list = seeds(df) if seed_list is None else seed_list
    if metric not in df:
        return [], np.full((len(seed_list), 0), np.nan)
    mask = (column(df, "method") == method) & (column(df, "beta") == beta)
    s, e = column(df, "seed")[mask], column(df, "epoch")[mask]
    v = column(df, metric)[mask].astype(float)
    es = sorted({int(x) for x in e})
    row = {seed: i for i, seed in enumerate(seed_list)}
    keep = np.array([int(x) in row for x in s], dtype=bool) & ~np.isnan(v)
    rows = np.array([row[int(x)] for x in s[keep]], dtype=int)
    cols = np.searchsorted(np.asarray(es), e[keep].astype(int))
    total = np.zeros((len(seed_list), len(es)))
    count = np.zeros((len(seed_list), len(es)))
    np.add.at(total, (rows, cols), v[keep])
    np.add.at(count, (rows, cols), 1.0)
    with np.errstate(invalid="ignore"):
        return es, np.where(count > 0, total / np.maximum(count, 1), np.nan)


def at_epoch(df: pd.DataFrame, method: str, beta: float, metric: str, epoch: int,
             seed_list: list[int] | None = None) -> np.ndarray:
    """Per-seed values at one epoch (NaN where missing), seeds in ``seed_list`` order."""
    es, values = seed_matrix(df, method, beta, metric, seed_list)
    if epoch not in es:
        return np.full(values.shape[0], np.nan)
    return values[:, es.index(epoch)]


def mean_and_se(values) -> tuple[float, float]:
    """``chipo.stats.mean_se`` of the non-NaN values (NaN, NaN when none)."""
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    return mean_se(x) if x.size else (math.nan, math.nan)


def aggregate(df: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Mean, standard error and n over seeds per (method, beta, epoch): columns ``<metric>``, ``<metric>_se``,
    ``n``."""
    out = []
    for (method, beta, epoch), g in df.groupby(["method", "beta", "epoch"], sort=False):
        row = {"method": method, "beta": beta, "epoch": int(epoch), "n": len(g)}
        for name in metrics:
            row[name], row[f"{name}_se"] = mean_and_se(g[name]) if name in g else (math.nan, math.nan)
        out.append(row)
    return pd.DataFrame(out)


# ---------------------------------------------------------------------------------------------------- frontier


def gold_at_distance(distance: np.ndarray, gold: np.ndarray, level: float) -> float:
    """Gold reward where a run first reaches ``level`` of sqrt(KL), linearly interpolated between the two
    evaluations that bracket it along training (in epoch order); NaN if the run never reaches it."""
    d, g = np.asarray(distance, dtype=float), np.asarray(gold, dtype=float)
    ok = ~(np.isnan(d) | np.isnan(g))
    d, g = d[ok], g[ok]
    for i in range(len(d)):
        if d[i] >= level:
            if i == 0 or d[i] == d[i - 1]:
                return float(g[i])
            w = (level - d[i - 1]) / (d[i] - d[i - 1])
            return float(g[i - 1] + w * (g[i] - g[i - 1]))
    return math.nan


def distance_levels(df: pd.DataFrame, beta: float, kl: str, fractions=(0.25, 0.5, 1.0)) -> list[float]:
    """Matched sqrt(KL) levels at ``beta``: fractions of the smallest distance that *every* run reaches (so every
    method has a value at each level). Chosen from the distances alone, never from the gold reward."""
    reach = []
    for method in methods(df):
        _, kl_values = seed_matrix(df, method, beta, kl)
        if kl_values.size:
            reach.extend(np.sqrt(np.clip(np.nanmax(kl_values, axis=1), 0, None)))
    common = float(np.nanmin(reach)) if reach and not np.all(np.isnan(reach)) else math.nan
    return [f * common for f in fractions] if common > 0 else []


def _with_ref_column(df: pd.DataFrame, values: np.ndarray, metric: str) -> np.ndarray:
    """Prepend pi_ref's value (its epoch-0 row) as the first column of a [seeds, epochs] matrix."""
    ref = column(df, metric)[column(df, "method") == "pi_ref"] if metric in df else []
    start = float(ref[0]) if len(ref) else math.nan
    return np.concatenate([np.full((values.shape[0], 1), start), values], axis=1)


def frontier(df: pd.DataFrame, method: str, beta: float, keys: dict, levels: list[float],
             seed_list: list[int] | None = None) -> dict[str, np.ndarray]:
    """Per-seed frontier numbers of one (method, beta): ``best`` gold over the evaluated epochs (oracle early
    stopping, pi_ref's epoch 0 included), ``best_epoch``, ``final`` gold, ``final_distance`` (sqrt KL at the last
    epoch) and ``at_<i>`` gold at ``levels[i]`` of sqrt KL."""
    es, gold = seed_matrix(df, method, beta, keys["gold"], seed_list)
    _, kl = seed_matrix(df, method, beta, keys["kl"], seed_list)
    gold, kl, es = _with_ref_column(df, gold, keys["gold"]), _with_ref_column(df, kl, keys["kl"]), [0, *es]
    dist = np.sqrt(np.clip(kl, 0, None))
    n = gold.shape[0]
    if len(es) == 1:
        empty = np.full(n, np.nan)
        return {"best": empty, "best_epoch": empty, "final": empty, "final_distance": empty,
                **{f"at_{i}": empty for i in range(len(levels))}}
    filled = np.where(np.isnan(gold), -np.inf, gold)
    best_index = filled.argmax(axis=1)
    all_nan = np.isnan(gold).all(axis=1)
    out = {"best": np.where(all_nan, np.nan, filled.max(axis=1)),
           "best_epoch": np.where(all_nan, np.nan, np.asarray(es, dtype=float)[best_index]),
           "final": gold[:, -1], "final_distance": dist[:, -1]}
    for i, level in enumerate(levels):
        out[f"at_{i}"] = np.array([gold_at_distance(dist[s], gold[s], level) for s in range(n)])
    return out
