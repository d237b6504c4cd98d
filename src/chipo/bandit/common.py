"""What every experiment of the testbed shares: its sizes (``Settings``), a progress bar and the atomic writing of
its results. The experiments (``experiments``, ``online_experiment``) import these; nothing here imports them."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from chipo.io import atomic_directory, json_default


@dataclass(frozen=True)
class Settings:
    """Sizes of one run. ``quick`` shrinks everything so the whole suite runs in seconds."""

    seeds: int = 5
    tune_seeds: int = 3
    quick: bool = False
    kl_trap_n: tuple[int, ...] | None = None
    """Sample sizes of the kl_trap regret curve (None: the default grid)."""

    @property
    def beta_grid(self) -> np.ndarray:
        return np.logspace(-3, 1, 9 if self.quick else 17)


def progress(desc: str, total: int | None = None, iterable=None) -> tqdm:
    """A progress bar on stderr for one experiment (the full suite runs for minutes; stdout stays for results)."""
    return tqdm(iterable, total=total, desc=f"bandit {desc}", file=sys.stderr, dynamic_ncols=True, leave=True)


def write_experiment(out_dir: Path, report: str, results: dict,
                     plots: dict[str, Callable[[Path], None]]) -> Path:
    """Write report.md, results.json and each plot (name -> function writing the PNG) atomically into out_dir."""
    with atomic_directory(out_dir) as tmp:
        (tmp / "report.md").write_text(report)
        (tmp / "results.json").write_text(json.dumps(results, indent=1, default=json_default))
        for name, draw in plots.items():
            draw(tmp / name)
    return Path(out_dir)
