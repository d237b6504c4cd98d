"""What ``chipo bandit <experiment>`` runs: ``BanditConfig`` (read like every chipo config) and ``run_bandit``."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from chipo.config import ConfigError, _field

# chipo.bandit.experiments.EXPERIMENTS, spelled out so that reading the config (chipo bandit --help) does not
# import the experiments (torch, scipy, matplotlib); tests/test_cli_startup.py checks that the two agree.
EXPERIMENTS = ("regret", "bound", "overopt", "online")
CHOICES = (*EXPERIMENTS, "bench", "all")


@dataclass
class BanditConfig:
    """One experiment of the exact tabular testbed (or ``all``); each writes OUT/<experiment>/{report.md, *.png,
    results.json}, ``all`` also OUT/report.md."""

    experiment: str = _field(None, f"Which experiment: {', '.join(CHOICES)}.")
    out: str = _field("bandit-results", "Output directory.")
    seeds: int | None = _field(None, "Evaluation seeds per setting (default 5; quick: 2).")
    quick: bool = _field(False, "Tiny grids: the whole suite in about a minute (smoke test).")
    kl_trap_n: list[int] = field(default_factory=list, metadata={
        "help": "regret: sample sizes of the kl_trap curve, comma-separated (default 100,...,30000)."})

    def __post_init__(self) -> None:
        if self.experiment not in CHOICES:
            raise ConfigError(f"experiment must be one of {', '.join(CHOICES)}, got {self.experiment!r}")
        if self.seeds is not None and self.seeds < 1:
            raise ConfigError(f"seeds must be at least 1, got {self.seeds}")
        if self.kl_trap_n and min(self.kl_trap_n) < 2:
            raise ConfigError(f"kl_trap_n must be integers >= 2, got {self.kl_trap_n}")


def run_bandit(config: BanditConfig) -> Path:
    """Run the experiment; returns the path of its report."""
    from chipo.bandit.common import Settings
    from chipo.bandit.experiments import run_all, run_experiment

    out = Path(config.out)
    seeds = config.seeds if config.seeds is not None else (2 if config.quick else 5)
    settings = Settings(seeds=seeds, tune_seeds=1 if config.quick else 3, quick=config.quick,
                        kl_trap_n=tuple(config.kl_trap_n) or None)
    t0 = time.perf_counter()
    if config.experiment == "all":
        path = run_all(out, settings) / "report.md"
    else:
        path = run_experiment(config.experiment, out, settings)[0] / "report.md"
    if config.experiment in ("bound", "all"):
        bound = json.loads((out / "bound" / "results.json").read_text())
        print(f"bound: sanity check of Cauchy-Schwarz (cannot fail for correct code): {bound['violations']} "
              f"violations in {bound['n_checks']} checks")
    print(f"wrote {path} in {time.perf_counter() - t0:.1f} s")
    return path
