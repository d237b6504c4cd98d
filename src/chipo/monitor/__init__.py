"""An overoptimization monitor without gold: signals a user can compute during training (KL and chi-squared to
pi_ref on the policy's own samples, the off-support rate, likelihood displacement, held-out implicit-reward accuracy,
length, entropy, clip rate, judge disagreement), alarm rules on them, and ``OveroptimizationMonitor`` to compute
them for a policy. ``chipo.train.monitor_callback`` runs it inside a ``transformers.Trainer``."""

from chipo.monitor.alarm import DEFAULT_RULES, AlarmRule, check, chosen_index, first_alarm
from chipo.monitor.monitor import HeldoutPairs, MonitorSettings, OveroptimizationMonitor
from chipo.monitor.signals import (
    displacement_signals,
    divergence_signals,
    judge_disagreement,
    off_support_rate,
    off_support_threshold,
    pair_signals,
    sample_signals,
)

__all__ = ["DEFAULT_RULES", "AlarmRule", "HeldoutPairs", "MonitorSettings", "OveroptimizationMonitor", "check",
           "chosen_index", "displacement_signals", "divergence_signals", "first_alarm", "judge_disagreement",
           "off_support_rate", "off_support_threshold", "pair_signals", "sample_signals"]
