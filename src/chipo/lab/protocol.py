"""The demo's protocol: the sizes and values of ``chipo demo``, fixed before any run, in one place.

``chipo.lab.offline`` runs it and ``chipo.lab.online`` takes its label budget, noise, betas, learning rate and
response length from it, so the offline and online labs compare at equal settings; both import this module and
neither imports the other (``chipo demo`` composes them by name: ``chipo.lab.experiments``).

Why the values (Huang et al. 2024, arXiv 2407.13399 for chiPO; everything else is the demo's own choice, fixed
here before looking at any result):

* betas 0.05 and 0.005, the two values of the paper's Table 1;
* Bradley-Terry scale 5 on a gold reward in [0, 1], so chiPO's r_max = 5 is the paper's R_max (the range of the
  reward that generates the labels);
* AdamW, constant learning rate 1e-3, batch 32, over ~380 pairs per seed (a seed carries its own preference data,
  so seeds are the unit of every test);
* seeds, epochs and evaluated epochs: see ``DemoSettings``; they are chosen for power (``chipo.stats.t_power``):
  with 8 seeds and Holm over the report's claims, a paired difference of about 2 standard deviations of the
  per-seed differences is shown with 80% power, where 3 seeds needed about 12.
"""

from __future__ import annotations

from dataclasses import dataclass

DEMO_EXPERIMENTS = ("offline",)
"""What ``chipo demo`` runs (``chipo.lab.experiments`` names); ``--full`` runs ``FULL_EXPERIMENTS``."""
FULL_EXPERIMENTS = ("offline", "rlhf", "online")


@dataclass(frozen=True)
class WorldProcess:
    """What every lab experiment on the embedded world shares: the regularization strengths, the Bradley-Terry
    scale of the labels (chiPO's r_max = scale x the gold range: the paper's R_max), the optimizer's constant
    learning rate and the response length. Each experiment's settings subclass this and override only where its
    protocol differs."""

    betas: tuple[float, ...] = (0.05, 0.005)
    scale: float = 5.0
    learning_rate: float = 1e-3
    max_new_tokens: int = 8


@dataclass(frozen=True)
class PreferenceData(WorldProcess):
    """Experiments whose seeds each draw their own preference data: seeds and pairs per training prompt (the label
    budget is pairs_per_prompt x training prompts)."""

    seeds: int = 8
    pairs_per_prompt: int = 8


@dataclass(frozen=True)
class OfflineRuns(PreferenceData):
    """Experiments that train offline on those data: epochs (AdamW, the constant learning rate) and batch size."""

    epochs: int = 16
    batch_size: int = 32


@dataclass(frozen=True)
class DemoSettings(OfflineRuns):
    """Sizes of the demo; ``quick()`` is the CI smoke-test version."""

    losses: tuple[str, ...] = ("dpo", "chipo")
    eval_epochs: tuple[int, ...] | None = None  # None: 1, 2, 4, ... and the last (``sweep.default_eval_epochs``)
    heldout_pairs_per_prompt: int = 8
    num_samples: int = 64
    max_eval_prompts: int | None = None
    workers: int = 2
    ablations: bool = False

    @staticmethod
    def quick(seeds: int = 1) -> DemoSettings:
        return DemoSettings(seeds=seeds, epochs=4, eval_epochs=None, num_samples=16, max_eval_prompts=8)
