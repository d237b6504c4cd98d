"""The overoptimization lab: gold rewards, preference data by the seed's process, evaluation, sweeps, reports,
and the embedded world behind ``chipo demo``.

Modules: ``world`` (synthetic language, pi_ref by SFT, gold reward), ``gold`` (gold scorers), ``generate``
(sampling, log-probs, Bradley-Terry preference data), ``evaluate`` (gold reward, win rates, KL / chi-squared,
implicit-reward accuracy), ``sweep`` (losses x beta x epochs x seeds, resumable), ``report`` (report.md, plots,
tables), ``demo`` (the whole pipeline on the embedded world), ``cli`` (``chipo demo`` and ``chipo lab ...``).
"""
