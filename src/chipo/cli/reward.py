"""``chipo reward --config reward.yaml key=value ...``"""

from __future__ import annotations

from chipo.cli.main import config_command
from chipo.train.common import TrainerConfig
from chipo.train.reward_config import RewardConfig

EXAMPLE = """example:
  chipo reward model=EleutherAI/pythia-410m dataset=trl-lib/tldr-preference eval_split=validation \\
      learning_rate=1e-5 center_rewards_coefficient=0.01 output_dir=runs/rm
  # the result is an HF AutoModelForSequenceClassification directory: use it as `reward=runs/rm` in chipo rl
"""

GROUPS = {"reward model (chipo)": RewardConfig, "data and sequences (chipo)": TrainerConfig}


def main(argv: list[str]) -> int:
    return config_command(argv, prog="chipo reward", example=EXAMPLE, config_cls=RewardConfig,
                          description="Train a Bradley-Terry reward model on preference data.",
                          runner="chipo.train.reward:run_reward_training", saved="reward model")
