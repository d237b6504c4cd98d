"""``chipo train --config run.yaml key=value ...``"""

from __future__ import annotations

from chipo.cli.main import build_parser, run_guarded
from chipo.config import config_help, load_config
from chipo.train.config import TrainConfig

EXAMPLE = """example:
  chipo train model=EleutherAI/pythia-1b dataset=trl-lib/tldr-preference loss=chipo beta=0.05 \\
      bf16=true output_dir=runs/chipo-b0.05
  accelerate launch --num_processes 8 -m chipo.cli.main train --config run.yaml

config keys (YAML file and/or key=value; values parsed as YAML scalars):
"""


def main(argv: list[str]) -> int:
    parser = build_parser("chipo train", "Preference-train a causal LM with chiPO, DPO or a variant.",
                          EXAMPLE + config_help(TrainConfig))
    parser.add_argument("--config", help="YAML file of config keys (overridden by key=value arguments)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides")
    args = parser.parse_args(argv)

    def _train() -> None:
        from chipo.train.run import run_training

        config = load_config(TrainConfig, args.config, args.overrides)
        out = run_training(config)
        print(f"chipo: model saved to {out}")

    return run_guarded(_train)
