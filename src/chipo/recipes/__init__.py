"""Recipes: short commands that wire chipo's components into a published experiment, stage by stage.

- ``chipo.recipes.tldr``: the paper's TL;DR summarisation experiment (``chipo tldr``; configs and README in
  ``recipes/tldr/`` at the repository root).
"""
