"""``chipo reward --config reward.yaml key=value ...``"""

from __future__ import annotations

from chipo.cli.main import build_parser, run_guarded
from chipo.config import config_help, load_config
from chipo.train.reward_config import RewardConfig

EXAMPLE = """example:
  chipo reward model=EleutherAI/pythia-410m dataset=trl-lib/tldr-preference eval_split=validation \\
      learning_rate=1e-5 center_rewards_coefficient=0.01 output_dir=runs/rm
  # the result is an HF AutoModelForSequenceClassification directory: use it as `reward=runs/rm` in chipo rl

config keys (YAML file and/or key=value; values parsed as YAML scalars):
"""


def main(argv: list[str]) -> int:
    parser = build_parser("chipo reward", "Train a Bradley-Terry reward model on preference data.",
                          EXAMPLE + config_help(RewardConfig))
    parser.add_argument("--config", help="YAML file of config keys (overridden by key=value arguments)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)

    def _train() -> None:
        from chipo.train.reward import run_reward_training

        config = load_config(RewardConfig, args.config, args.overrides)
        out = run_reward_training(config)
        print(f"chipo: reward model saved to {out}")

    return run_guarded(_train)
