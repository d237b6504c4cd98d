"""Training: the preference trainer (chiPO/DPO/variants) and its recipe."""

from chipo.train.config import PreferenceConfig
from chipo.train.preference import NonFiniteError, PreferenceTrainer

__all__ = ["PreferenceConfig", "PreferenceTrainer", "NonFiniteError"]
