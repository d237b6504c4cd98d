"""The overoptimization lab: gold rewards, preference data by the paper's process, evaluation, sweeps, reports,
and the embedded world behind ``chipo demo``.

Modules: ``world`` (synthetic language, pi_ref by SFT, gold reward: registered as the ``world`` scorer of
``chipo.rewards`` on import), ``generate`` (Bradley-Terry preference data by the process of Huang et al. 2024),
``evaluate`` (gold reward, win rates, KL / chi-squared, implicit-reward accuracy), ``sweep`` (losses x beta x
epochs x seeds, resumable), ``report`` (report.md, plots, tables), ``demo`` (the whole pipeline on the embedded
world), ``cli`` (``chipo demo`` and ``chipo lab ...``).
"""

from chipo.lab.world import world_scorer
from chipo.rewards import register_scorer

register_scorer("world", world_scorer, "the embedded world's gold reward (world: the default world; world:DIR: the "
                                       "world saved in DIR)")
