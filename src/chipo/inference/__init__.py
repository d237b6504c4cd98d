"""Inference: reward functions, sampling from a policy, and inference-time alignment (best-of-n, pessimism).

Modules: ``rewards`` (``load_reward``: reward models, ``module:function``, the lab's world), ``generation``
(batched HF ``generate`` with KV cache, optional vLLM, padded scoring batches), ``samplers`` (best-of-n,
chi-squared-regularised rejection sampling of Huang et al. 2025, their exact output laws, ``sample_with_mode``).
"""

from chipo.inference.rewards import RewardModelScorer, load_reward
from chipo.inference.samplers import (
    MODES,
    Selection,
    best_of_n_distribution,
    best_of_n_kl_bound,
    pessimism_distribution,
    pessimism_normalizer,
    sample_with_mode,
    select,
)

__all__ = [
    "MODES",
    "RewardModelScorer",
    "Selection",
    "best_of_n_distribution",
    "best_of_n_kl_bound",
    "load_reward",
    "pessimism_distribution",
    "pessimism_normalizer",
    "sample_with_mode",
    "select",
]
