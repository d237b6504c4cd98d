"""``chipo sft --config sft.yaml key=value ...``"""

from __future__ import annotations

from chipo.cli.main import config_command
from chipo.train.common import TrainerConfig
from chipo.train.sft_config import SFTConfig

EXAMPLE = """example:
  chipo sft model=EleutherAI/pythia-1b dataset=trl-lib/tldr max_length=640 learning_rate=2e-5 \\
      bf16=true output_dir=runs/sft-pythia-1b
  accelerate launch --num_processes 8 -m chipo.cli.main sft --config sft.yaml

data: prompt + completion columns (strings or message lists), or messages (final assistant message = completion);
the loss is on completion tokens only (completion_only_loss=true).
"""

GROUPS = {"supervised fine-tuning (chipo)": SFTConfig, "data and sequences (chipo)": TrainerConfig}


def main(argv: list[str]) -> int:
    return config_command(argv, prog="chipo sft", example=EXAMPLE, config_cls=SFTConfig,
                          description="Supervised fine-tuning of a causal LM on prompt/completion data.",
                          runner="chipo.train.sft:run_sft", saved="model", groups=GROUPS)
