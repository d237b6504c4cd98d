"""Training: the preference trainer (chiPO/DPO/variants), SFT and Bradley-Terry reward trainers, and their recipes.
Each config/trainer pair takes TRL's arguments (``from chipo.train import SFTConfig, SFTTrainer`` in place of
``from trl import ...``).

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
    from chipo.train.reward import RewardTrainer
    from chipo.train.reward_config import RewardConfig
    from chipo.train.sft import SFTTrainer
    from chipo.train.sft_config import SFTConfig

_LAZY = {"PreferenceConfig": "config", "PreferenceTrainer": "preference", "NonFiniteError": "pairwise",
         "SFTConfig": "sft_config", "SFTTrainer": "sft", "RewardConfig": "reward_config", "RewardTrainer": "reward"}

__all__ = ["PreferenceConfig", "PreferenceTrainer", "NonFiniteError", "SFTConfig", "SFTTrainer", "RewardConfig",
           "RewardTrainer"]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
