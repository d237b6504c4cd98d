"""The overoptimization monitor's config keys (``monitor``, ``monitor_prompts``, ...), mixed into the configs of
``chipo train``, ``chipo rl`` and ``chipo online``. Light on purpose: a command's ``--help`` builds its config class,
and must not import the monitor itself, transformers' Trainer or datasets (tests/test_cli_startup.py); the callback
that reads these keys is ``chipo.train.monitor_callback``."""

from __future__ import annotations

from dataclasses import dataclass

from chipo.config import ConfigError, _field
from chipo.monitor.alarm import AlarmRule

MODES = ("off", "log", "warn", "stop")


@dataclass
class MonitorFields:
    """The monitor keys of ``chipo train``, ``chipo rl`` and ``chipo online`` (mixed into their configs)."""

    monitor: str = _field("warn", "Overoptimization monitor at each evaluation (chipo train: with eval_split or "
                                  "eval_dataset; chipo rl / online: every eval_steps): off, log (log the "
                                  "signals), warn (and one line when an alarm rule fires), stop (and stop "
                                  "training). Signals (monitor/*): KL and chi-squared to "
                                  "pi_ref on the policy's samples, off-support rate, held-out displacement and "
                                  "implicit accuracy, length, entropy, clip rate. Cost: a pi_ref copy in memory "
                                  "(reference=precompute) and per evaluation a sampling pass worth ~10 training steps "
                                  "of a small model (benchmarks/RESULTS.md).")
    monitor_prompts: int = _field(16, "Held-out prompts the monitor samples (the first of the eval data).")
    monitor_samples: int = _field(8, "Monitor samples per prompt.")
    monitor_max_new_tokens: int = _field(64, "Max new tokens of the monitor's samples.")
    monitor_rules: list[str] | None = _field(None, "Alarm rules 'signal>x' / 'signal<x' (null: the defaults of "
                                                   "chipo.monitor.alarm).")

    def check_monitor(self) -> None:
        # YAML reads `monitor=off` as the boolean false (YAML 1.1 bools), which reaches a str field as "no" / "False".
        if isinstance(self.monitor, bool) or str(self.monitor).lower() in ("no", "false", "yes", "true", "on"):
            self.monitor = "off" if str(self.monitor).lower() in ("no", "false") else "warn"
        if self.monitor not in MODES:
            raise ConfigError(f"monitor must be one of {', '.join(MODES)}, got {self.monitor!r}")
        for name in ("monitor_prompts", "monitor_samples", "monitor_max_new_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for rule in self.monitor_rules or ():
            try:
                AlarmRule.parse(rule)
            except ValueError as e:
                raise ConfigError(str(e)) from None
