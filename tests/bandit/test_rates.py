"""Rate fits: exact recovery on noise-free curves, and intervals that cover the truth under seed noise."""

from __future__ import annotations

import numpy as np
import pytest

from chipo.bandit.rates import bootstrap_rates, fit_forms

N = np.array([100, 300, 1000, 3000, 10000, 30000, 100000])


def test_exact_power_law_and_inverse_log() -> None:
    """y = 2 n^-0.4: log y = log 2 - 0.4 log n exactly, so a = 0.4 with zero residual; y = 3 / log n: log y =
    log 3 - log log n, so b = 1, c_log = 3 and both the log-law and the 1/log n residuals vanish."""
    p = fit_forms(N, 2.0 * N**-0.4)
    assert abs(p["a"] - 0.4) < 1e-12 and p["rms_power"] < 1e-12
    q = fit_forms(N, 3.0 / np.log(N))
    assert abs(q["b"] - 1.0) < 1e-12 and abs(q["c_log"] - 3.0) < 1e-12
    assert q["rms_loglaw"] < 1e-12 and q["rms_inv_log"] < 1e-12 and q["rms_power"] > 1e-3


def test_bootstrap_interval_covers_truth() -> None:
    """20 seeds of 5% multiplicative noise around 2 n^-0.4: the 95% interval for a contains 0.4 and is narrow."""
    rng = np.random.default_rng(0)
    per_seed = 2.0 * N[:, None] ** -0.4 * np.exp(rng.normal(0, 0.05, (N.size, 20)))
    r = bootstrap_rates(N, per_seed, n_boot=500)
    lo, hi = r["interval"]["a"]
    assert lo < 0.4 < hi and hi - lo < 0.05
    assert r["dropped"] == 0 and r["n_boot"] == 500


def test_shape_error() -> None:
    with pytest.raises(ValueError):
        bootstrap_rates(N, np.ones((3, 4)))
