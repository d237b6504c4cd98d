"""``chipo sft`` configuration: every field has help text; ``__post_init__`` validates values.

The fields shared with ``chipo train`` and ``chipo reward`` come from ``chipo.train.common.TrainerConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from chipo.config import _field
from chipo.train.common import TrainerConfig
from chipo.train.honoured import SFT_HONOURED


@dataclass
class SFTConfig(TrainerConfig):
    """Supervised fine-tuning of a causal LM on prompt/completion data, loss on completion tokens only."""

    honoured: ClassVar[frozenset[str]] = SFT_HONOURED  # Trainer's own compute_loss: its label smoother runs too
    command: ClassVar[str] = "chipo sft"
    objective_keys: ClassVar[tuple[str, ...]] = (
        "model", "dataset", "split", "max_train_samples", "max_length", "max_prompt_length", "completion_only_loss")
    """run_config keys that define the objective: resuming a checkpoint trained on another is refused."""

    model: str = _field(None, "Model to fine-tune: a hub model name or a local HF directory.")
    dataset: str = _field(None, "SFT data: hub dataset name (e.g. trl-lib/tldr), local .json/.jsonl/.parquet/.arrow "
                                "file, or a directory saved by datasets. Layouts: prompt + completion (strings, or "
                                "lists of messages), or messages (the final assistant message is the completion).")
    output_dir: str = _field("outputs/chipo-sft", "Where checkpoints, the final HF model, run_config.yaml and "
                                                  "metrics.jsonl go.")
    max_length: int = _field(1024, "Max tokens of prompt + completion; completions are cut to fit (see "
                                   "chipo.train.sft: truncation).")
    learning_rate: float = _field(2e-5, "Peak learning rate.")
    lr_scheduler_type: str = _field("cosine", "transformers scheduler name (linear, cosine, constant, ...).")
    warmup_ratio: float = _field(0.03, "Fraction of steps of linear warm-up, in [0, 1).")
    completion_only_loss: bool = _field(True, "Loss on completion tokens only (labels -100 on the prompt); false "
                                              "also trains on the prompt tokens.")
    packing: bool = _field(True, "Padding-free batches: prompt + completion sequences side by side in rows no wider "
                                 "than the longest, position_ids restarting per sequence, attention confined to "
                                 "each (transformers' sdpa/eager/flex masks; flash-attention varlen in one row), "
                                 "no label at a sequence's first token. Same loss and gradients up to round-off; "
                                 "checked once on the first batch, falling back to padded rows with a warning. "
                                 "false: padded rows.")
