"""Inference-time alignment: best-of-n and chi-squared-regularised rejection sampling (pessimism).

``samplers`` holds best-of-n, the chi-squared-regularised rejection sampler of Huang et al. 2025, their exact output
laws and ``sample_with_mode``; sampling comes from ``chipo.generation`` and rewards from ``chipo.rewards``.
"""

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
    "Selection",
    "best_of_n_distribution",
    "best_of_n_kl_bound",
    "pessimism_distribution",
    "pessimism_normalizer",
    "sample_with_mode",
    "select",
]
