"""``chipo bandit <experiment> [key=value ...]``: the exact tabular testbed (see chipo/bandit/README.md)."""

from __future__ import annotations

from chipo.bandit.command import CHOICES, BanditConfig
from chipo.cli.main import config_command

EXAMPLE = """examples:
  chipo bandit all --quick out=bandit-results        # every experiment, tiny grids
  chipo bandit regret seeds=10 kl_trap_n=100,1000,10000,100000
  chipo bandit online
"""


def main(argv: list[str]) -> int:
    """``chipo bandit EXPERIMENT ...`` is ``experiment=EXPERIMENT ...``."""
    if argv and argv[0] in CHOICES:
        argv = [f"experiment={argv[0]}", *argv[1:]]
    return config_command(argv, prog="chipo bandit", example=EXAMPLE, config_cls=BanditConfig,
                          description=f"The exact tabular testbed: {', '.join(CHOICES)}.",
                          runner="chipo.bandit.command:run_bandit")
