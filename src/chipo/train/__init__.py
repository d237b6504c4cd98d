"""Training: the preference trainer (chiPO/DPO/variants) and its recipe.

The names below are imported on first use (PEP 562 ``__getattr__``): ``import chipo.train.rl_config`` (what
``chipo rl --help`` needs) then does not pay for the preference trainer and its data pipeline.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chipo.train.config import PreferenceConfig
    from chipo.train.pairwise import NonFiniteError
    from chipo.train.preference import PreferenceTrainer

_LAZY = {"PreferenceConfig": "chipo.train.config", "PreferenceTrainer": "chipo.train.preference",
         "NonFiniteError": "chipo.train.pairwise"}

__all__ = ["PreferenceConfig", "PreferenceTrainer", "NonFiniteError"]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
