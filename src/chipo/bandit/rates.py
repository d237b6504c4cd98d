"""Which rate do regret-vs-n curves support? Fits of c / log n and c n^-a with bootstrap intervals over seeds.

The kl_trap argument (``instances.kl_trap_instance``) predicts regret ~ c / log n for the KL methods over a finite
range of n, and the chi-squared analysis of Huang et al. 2024 (arXiv 2407.13399, Theorem 3.1) predicts ~ n^-1/2 for
chiPO / chi2-RLHF. Over two or three decades of n the two shapes are hard to tell apart (1/log n has local log-log
slope -1 / log n: -0.22 at n = 100, -0.087 at n = 1e5), so we fit both and report intervals rather than pick one:

* power law:     log y = log c - a log n            (two parameters; a = 0.5 is the chi-squared rate)
* log law:       log y = log c - b log log n        (two parameters; b = 1 is c / log n)
* pure 1/log n:  log y = log c - log log n          (one parameter)

All fits are least squares in log y (regret varies over an order of magnitude, and seed noise is roughly
multiplicative). Intervals: percentile bootstrap, resampling the evaluation seeds with replacement independently at
every n (the datasets at different n are independent), refitting on the resampled means. The tuned beta is held
fixed (it was chosen on separate tuning seeds), so the intervals do not include beta-selection noise.
"""

from __future__ import annotations

import numpy as np


def _lsq(x: np.ndarray, logy: np.ndarray) -> tuple[float, float, float]:
    """Slope, intercept and RMS residual of logy ~ intercept + slope * x."""
    slope, icpt = np.polyfit(x, logy, 1)
    resid = logy - (icpt + slope * x)
    return float(slope), float(icpt), float(np.sqrt(np.mean(resid**2)))


def fit_forms(n: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Point fits of the three forms to mean regrets y at sample sizes n (all y > 0).

    Returns a (power exponent), b (log-law exponent), c_log (constant of c / log n) and the RMS log residuals
    rms_power, rms_loglaw, rms_inv_log.
    """
    n, y = np.asarray(n, float), np.asarray(y, float)
    logn, logy = np.log(n), np.log(y)
    slope_p, _, rms_p = _lsq(logn, logy)
    slope_l, _, rms_l = _lsq(np.log(logn), logy)
    log_c = float(np.mean(logy + np.log(logn)))
    rms_inv = float(np.sqrt(np.mean((logy - log_c + np.log(logn)) ** 2)))
    return {"a": -slope_p, "b": -slope_l, "c_log": float(np.exp(log_c)), "rms_power": rms_p, "rms_loglaw": rms_l,
            "rms_inv_log": rms_inv}


def bootstrap_rates(n: list[int] | np.ndarray, per_seed: np.ndarray, *, n_boot: int = 2000,
                    seed: int = 0, level: float = 0.95) -> dict:
    """Point fits and percentile-bootstrap intervals from per-seed regrets ``per_seed`` [len(n), seeds].

    Returns {"point": fit_forms(...), "interval": {key: (lo, hi)}, "n_boot": ...}. Bootstrap replicates whose mean
    regret is not positive at some n are dropped (their count is returned as ``dropped``); with regrets bounded
    away from zero none are.
    """
    n = np.asarray(n, float)
    per_seed = np.asarray(per_seed, float)
    if per_seed.ndim != 2 or per_seed.shape[0] != n.size:
        raise ValueError(f"per_seed must be [len(n)={n.size}, seeds], got {per_seed.shape}")
    point = fit_forms(n, per_seed.mean(1))
    rng = np.random.default_rng(seed)
    k = per_seed.shape[1]
    idx = rng.integers(0, k, size=(n_boot, n.size, k))
    means = np.take_along_axis(per_seed[None], idx, axis=2).mean(2)  # [boot, n]
    ok = (means > 0).all(1)
    fits = [fit_forms(n, m) for m in means[ok]]
    q = (100 * (1 - level) / 2, 100 * (1 + level) / 2)
    interval = {key: tuple(float(v) for v in np.percentile([f[key] for f in fits], q)) for key in point}
    return {"point": point, "interval": interval, "n_boot": int(ok.sum()), "dropped": int((~ok).sum()),
            "level": level}
