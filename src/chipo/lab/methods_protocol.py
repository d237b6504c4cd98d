"""The method table's protocol: its methods, their families and ``MethodTableSettings`` (shared by
``chipo.lab.methods``, which runs the table, and ``chipo.lab.methods_cells``, which trains one cell; neither
imports the other's module back)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from chipo.config import ConfigError
from chipo.lab.online_protocol import SPECS as ONLINE_METHODS
from chipo.lab.online_protocol import OnlineLabSettings
from chipo.lab.protocol import DemoSettings, OfflineRuns
from chipo.lab.rlhf import RLHFSettings

OFFLINE = {"dpo": ("dpo", {}), "chipo": ("chipo", {}), "dpo+sft": ("dpo", {"sft_weight": 1}),
           "chipo+sft": ("chipo", {"sft_weight": 1})}
RLHF = {"rlhf-kl": "kl", "rlhf-chi2mix": "chi2mix"}
INFERENCE = ("bon", "pessimism")
FAMILIES = {**{m: "offline" for m in OFFLINE}, **{m: "online" for m in ONLINE_METHODS},
            **{m: "rlhf" for m in RLHF}, **{m: "inference" for m in INFERENCE}}
METHODS = tuple(FAMILIES)
NO_BETA = ("bon",)  # best-of-n has no regularization strength


@dataclass(frozen=True)
class MethodTableSettings(OfflineRuns):
    """Sizes of the method table. Everything shared with the demo (``OfflineRuns``: seeds, betas, the label budget,
    scale, epochs, optimizer, response length), the online lab or RLHF is theirs. Epochs stay the demo's 16 and RL
    takes 150 steps (the demo's RLHF part: 300): the CPU budget of a shared 2-core machine (one seed at 32 epochs /
    300 steps measured 224 CPU-s). Online runs keep their 48 steps: the label budget sets them."""

    methods: tuple[str, ...] = METHODS
    num_samples: int = DemoSettings.num_samples
    max_eval_prompts: int | None = None
    best_of_n: int = 32  # the largest n of the demo's best-of-n curve: where overoptimizing the proxy would show
    online: OnlineLabSettings = field(default_factory=OnlineLabSettings)
    rlhf: RLHFSettings = field(default_factory=lambda: RLHFSettings(steps=150))

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in FAMILIES]
        if unknown:
            raise ConfigError(f"unknown method(s) {unknown}; valid: {', '.join(METHODS)}")
        if "dpo" not in self.methods:
            raise ConfigError("methods must include dpo: every comparison of the table is against it")
        if self.seeds < 1 or not self.betas or any(not b > 0 for b in self.betas):
            raise ConfigError("seeds must be >= 1 and betas positive and non-empty")
        if self.epochs < 1 or self.best_of_n < 1:
            raise ConfigError("epochs and best_of_n must be at least 1")

    @staticmethod
    def quick(seeds: int = 2) -> MethodTableSettings:
        """Smoke-test size (every method, one beta, a few steps)."""
        return MethodTableSettings(
            seeds=seeds, betas=(0.05,), pairs_per_prompt=4, epochs=2, num_samples=8, max_eval_prompts=4,
            best_of_n=2, online=OnlineLabSettings(seeds=seeds, prompts_per_step=4),
            rlhf=dataclasses.replace(RLHFSettings.quick(), steps=2, eval_every=2))

    def cells(self) -> list[tuple[str, float | None, int]]:
        """(method, beta, seed) of every run; best-of-n once per seed."""
        out = []
        for seed in range(self.seeds):
            for method in self.methods:
                out += [(method, None, seed)] if method in NO_BETA else [(method, b, seed) for b in self.betas]
        return out

    def shared(self) -> dict:
        """Settings every row depends on (data, evaluation) and the offline runs' (their checkpoints resume)."""
        d = dataclasses.asdict(self)
        return {k: d[k] for k in ("pairs_per_prompt", "scale", "num_samples", "max_eval_prompts", "max_new_tokens",
                                  "epochs", "learning_rate", "batch_size")}

    def family_settings(self, family: str) -> dict:
        """What a row of ``family`` was made with, stored in the row: a row made otherwise is run again."""
        if family == "online":
            return {k: v for k, v in dataclasses.asdict(self.online_settings()).items() if k not in ("seeds", "betas")}
        if family in ("rlhf", "inference"):
            return {**dataclasses.asdict(self.rlhf_settings(0)), "seed": None, "best_of_n": self.best_of_n}
        return {}

    def online_settings(self) -> OnlineLabSettings:
        """The online lab's settings at this table's label budget, noise and response length."""
        return dataclasses.replace(self.online, seeds=self.seeds, betas=self.betas,
                                   pairs_per_prompt=self.pairs_per_prompt, scale=self.scale,
                                   max_new_tokens=self.max_new_tokens, eval_fractions=(1.0,))

    def rlhf_settings(self, seed: int, pessimism_betas: tuple[float, ...] = ()) -> RLHFSettings:
        # RL is evaluated by the table's own evaluation at its last step: the curve only needs both ends.
        return dataclasses.replace(self.rlhf, seed=seed, scale=self.scale, max_new_tokens=self.max_new_tokens,
                                   eval_every=self.rlhf.steps, ns=(self.best_of_n,), pessimism_betas=pessimism_betas,
                                   max_eval_prompts=self.max_eval_prompts)
