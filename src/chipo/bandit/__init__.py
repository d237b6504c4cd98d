"""chipo.bandit: the exact theory testbed (tabular preference optimization checked to machine precision).

Modules: ``instances`` (random and named hard instances), ``optimum`` (exact f-regularised optimum),
``estimators`` (DPO, chiPO, KL-RLHF, chi2-RLHF on sampled Bradley-Terry data), ``measures`` (value, regret,
KL / chi2 to pi_ref, concentrability, the chi-squared change-of-measure bound), ``online`` (online DPO / XPO /
chi-squared XPO), ``common`` (what every experiment shares: settings, progress, atomic results), the experiments
(``experiments``, which also dispatches to each, and ``online_experiment``), ``reports`` and ``command`` (the
config and runner of ``chipo bandit``, whose command line is ``chipo.cli.bandit``).
Reference: Huang et al. 2024, arXiv 2407.13399 (chiPO), Proposition A.1 (KL-regularisation is not enough).

The names below are imported on first use (PEP 562 ``__getattr__``), so that ``chipo bandit --help`` (which
reads ``chipo.bandit.command``) does not import torch and scipy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from chipo.lazy import lazy_exports

if TYPE_CHECKING:
    from chipo.bandit.estimators import (
        ESTIMATORS,
        PreferenceData,
        estimator_policy,
        fit_direct_policy,
        fit_reward,
        fit_rewards,
        sample_preferences,
    )
    from chipo.bandit.instances import Instance, kl_trap_instance, named_instance, random_instance
    from chipo.bandit.optimum import regularized_optimum

_LAZY = {**dict.fromkeys(["ESTIMATORS", "PreferenceData", "estimator_policy", "fit_direct_policy", "fit_reward",
                          "fit_rewards", "sample_preferences"], "estimators"),
         **dict.fromkeys(["Instance", "kl_trap_instance", "named_instance", "random_instance"], "instances"),
         "regularized_optimum": "optimum"}

__all__ = ["ESTIMATORS", "Instance", "PreferenceData", "estimator_policy", "fit_direct_policy", "fit_reward",
           "fit_rewards", "kl_trap_instance", "named_instance", "random_instance", "regularized_optimum",
           "sample_preferences"]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
