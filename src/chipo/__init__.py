"""chipo: language-model post-training that does not overoptimize.

Layout: ``divergences`` (f-divergence objects), ``losses`` (links x pairwise losses), ``logprobs``,
``data``, ``train`` (preference trainer), ``bandit`` (exact tabular testbed), ``cli``.
"""

__version__ = "0.1.0"
