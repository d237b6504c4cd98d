"""The paper's TL;DR experiment (Huang et al. 2024, arXiv 2407.13399, section 5) as a resumable, stage-by-stage recipe.

Stages (``chipo tldr <stage> --config recipes/tldr/<stage>.yaml key=value ...``), each reusing chipo's components:

========  ==============================================================================================
sft       ``chipo sft`` (``transformers.Trainer``) of a Pythia model on ``trl-lib/tldr``; skipped when done
sweep     ``chipo train`` per (loss, beta, seed), a checkpoint per epoch, reference log-probs cached once
generate  one summary per prompt of a fixed test subset per (run, epoch) and for the SFT model; log-ratios
          to pi_ref on the samples for KL
judge     win rate of each cell's summaries against the dataset's reference summaries (``chipo.judges``)
report    Table 1 layout (chiPO vs DPO win rate +- s.e.), KL per cell, plots, GPU-time estimate, commands
========  ==============================================================================================

Everything lives under one recipe directory (``out_dir``, default ``runs/tldr``); ``chipo.recipes.tldr.layout``
names every path. Every stage skips the work already on disk, so rerunning a stage after an interruption (or
rerunning the whole recipe) finishes what is missing and nothing else.
"""
