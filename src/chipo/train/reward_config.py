"""``chipo reward`` configuration: every field has help text; ``__post_init__`` validates values."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from chipo.config import ConfigError, _field
from chipo.train.common import TrainerConfig


@dataclass
class RewardConfig(TrainerConfig):
    """Bradley-Terry reward-model training on preference data (the same formats as ``chipo train``)."""

    command: ClassVar[str] = "chipo reward"
    objective_keys: ClassVar[tuple[str, ...]] = (
        "model", "dataset", "split", "max_train_samples", "drop_ties", "max_length", "max_prompt_length",
        "margin_column", "center_rewards_coefficient")
    """run_config keys that define the objective: resuming a checkpoint trained on another is refused."""

    model: str = _field(None, "Base model: a hub name or local HF directory (a causal LM gets a fresh 1-output "
                              "score head via AutoModelForSequenceClassification).")
    dataset: str = _field(None, "Preference data: hub name, .json/.jsonl/.parquet/.arrow file or a datasets "
                                "directory; TRL formats standard, conversational, implicit prompt.")
    output_dir: str = _field("outputs/chipo-reward", "Where checkpoints, the final HF reward model, "
                                                     "run_config.yaml and metrics.jsonl go.")
    eval_split: str | None = _field(None, "Evaluation split (accuracy and margin are logged on it); null: none.")
    # --- the objective
    drop_ties: bool = _field(False, "Drop rows whose chosen and rejected responses are identical (counted in the "
                                    "log); otherwise such rows are an error naming them.")
    margin_column: str | None = _field(None, "Optional column of per-pair margins m: loss -log sigmoid(r+ - r- - m) "
                                             "(Llama 2's margin loss). null: no margin.")
    center_rewards_coefficient: float | None = _field(None, "Optional reward centering: adds coef * (r+ + r-)^2 "
                                                            "per pair, pulling rewards toward zero mean "
                                                            "(Eisenstein et al. 2023). null: off.")
    # --- speed
    packing: bool = _field(True, "Padding-free batches: chosen and rejected sequences side by side in rows no "
                                 "wider than the longest, position_ids restarting per sequence, attention "
                                 "confined to each (transformers' sdpa/eager/flex masks; flash-attention varlen "
                                 "in one row); the reward is the score head at each sequence's pooled token. Same "
                                 "rewards and gradients up to round-off; checked once on the first batch, falling "
                                 "back to padded rows with a warning. false: padded rows.")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise ConfigError(f"center_rewards_coefficient must be >= 0, got {self.center_rewards_coefficient}")
        if self.margin_column is not None and not self.margin_column.strip():
            raise ConfigError("margin_column must be a column name or null")
