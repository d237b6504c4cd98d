"""An overoptimization monitor without gold: signals a user can compute during training (KL and chi-squared to
pi_ref on the policy's own samples, the off-support rate, likelihood displacement, held-out implicit-reward accuracy,
length, entropy, clip rate, judge disagreement), alarm rules on them, and ``OveroptimizationMonitor`` to compute
them for a policy. ``chipo.train.monitor_callback`` runs it inside a ``transformers.Trainer``."""

from __future__ import annotations

from chipo.lazy import lazy_exports

# Imported on first use (PEP 562): a command's --help reads chipo.monitor.alarm (the monitor keys' check) without
# paying for the sampler, the data pipeline and torch that the signals need.
_LAZY = {"DEFAULT_RULES": "alarm", "AlarmRule": "alarm", "check": "alarm", "chosen_index": "alarm",
         "first_alarm": "alarm", "HeldoutPairs": "monitor", "MonitorSettings": "monitor",
         "OveroptimizationMonitor": "monitor", "displacement_signals": "signals", "divergence_signals": "signals",
         "judge_disagreement": "signals", "off_support_rate": "signals", "off_support_threshold": "signals",
         "pair_signals": "signals", "sample_signals": "signals"}

__all__ = ["DEFAULT_RULES", "AlarmRule", "HeldoutPairs", "MonitorSettings", "OveroptimizationMonitor", "check",
           "chosen_index", "displacement_signals", "divergence_signals", "first_alarm", "judge_disagreement",
           "off_support_rate", "off_support_threshold", "pair_signals", "sample_signals"]

__getattr__, __dir__ = lazy_exports(__name__, _LAZY, __all__)
