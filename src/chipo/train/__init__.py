"""Training: the preference trainer (chiPO/DPO/variants) and its recipe.

The names below are imported on first use (PEP 562 ``__getattr__``): ``import chipo.train.rl_config`` (what
``chipo rl --help`` needs) then does not pay for the preference trainer and its data pipeline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from chipo.lazy import lazy_exports

if TYPE_CHECKING:
    from chipo.train.config import PreferenceConfig
    from chipo.train.pairwise import NonFiniteError
    from chipo.train.preference import PreferenceTrainer

_LAZY = {"PreferenceConfig": "config", "PreferenceTrainer": "preference", "NonFiniteError": "pairwise"}

__all__ = ["PreferenceConfig", "PreferenceTrainer", "NonFiniteError"]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
