"""The overoptimization lab: gold rewards, preference data by the paper's process, evaluation, sweeps, reports,
and the embedded world behind ``chipo demo``.

Modules: ``language`` and ``world`` (the synthetic language, pi_ref by SFT, the gold reward; its scorer ``world`` /
``world:DIR`` is found by ``chipo.rewards.load_scorer`` through the ``chipo.scorers`` entry point, without importing
the lab first), ``generate`` (Bradley-Terry preference data by the process of Huang et al. 2024, arXiv 2407.13399),
``evaluate`` (gold reward, win rates, KL / chi-squared, implicit-reward accuracy), ``sweep`` (losses x beta x
epochs x seeds, resumable), ``report`` and ``tables`` (report.md, plots, tables), ``demo`` (the whole pipeline on the
embedded world), ``online`` (the online preference-optimization comparison) and ``commands`` (what ``chipo demo``
and ``chipo lab ...`` run; their command line is ``chipo.cli.lab``).
"""
