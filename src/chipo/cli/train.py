"""``chipo train --config run.yaml key=value ...``"""

from __future__ import annotations

from chipo.cli.main import config_command
from chipo.train.common import TrainerConfig
from chipo.train.config import PreferenceConfig, PreferenceLossFields

EXAMPLE = """example:
  chipo train model=EleutherAI/pythia-1b dataset=trl-lib/tldr-preference loss=chipo beta=0.05 \\
      bf16=true output_dir=runs/chipo-b0.05
  accelerate launch --num_processes 8 -m chipo.cli.main train --config run.yaml
"""

GROUPS = {"objective (chipo)": PreferenceLossFields, "preference training (chipo)": PreferenceConfig,
          "data and sequences (chipo)": TrainerConfig}


def main(argv: list[str]) -> int:
    return config_command(argv, prog="chipo train", example=EXAMPLE, config_cls=PreferenceConfig,
                          description="Preference-train a causal LM with chiPO, DPO or a variant.",
                          runner="chipo.train.run:run_training", saved="model", groups=GROUPS)
