"""Alarm rules: when a gold-free signal says training has gone past its best point.

A rule is a threshold on one signal of ``chipo.monitor.signals`` (above or below). The monitor's choice of checkpoint
is the last evaluation before the first alarm (the last one when no alarm fires): the policy a user who stops at
the alarm keeps. ``DEFAULT_RULES`` was chosen on the embedded world's runs (seeds 0-3, beta 0.05) and tested on held-out
seeds and the other beta (``chipo.lab.monitor_validation``; numbers in docs/monitor-validation/).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class AlarmRule:
    """Fires when ``signal`` goes above (``above=True``) or below ``threshold``; ``why`` says what it means."""

    signal: str
    threshold: float
    above: bool = True
    why: str = ""

    def fires(self, signals: Mapping[str, float]) -> bool:
        value = signals.get(self.signal)
        if value is None or value != value:  # absent or NaN: this rule cannot judge
            return False
        return value > self.threshold if self.above else value < self.threshold

    def reason(self, signals: Mapping[str, float]) -> str:
        """One line: the signal, its value, the threshold and what crossing it means."""
        side = ">" if self.above else "<"
        text = f"{self.signal} = {signals[self.signal]:.4g} {side} {self.threshold:g}"
        return f"{text} ({self.why})" if self.why else text

    @staticmethod
    def parse(text: str) -> AlarmRule:
        """``'off_support>0.1'`` or ``'chosen_logratio<-2'``."""
        for op, above in ((">", True), ("<", False)):
            if op in text:
                name, value = text.split(op, 1)
                try:
                    return AlarmRule(name.strip(), float(value), above)
                except ValueError:
                    break
        raise ValueError(f"alarm rule {text!r}: expected SIGNAL>NUMBER or SIGNAL<NUMBER")


def check(signals: Mapping[str, float], rules: Sequence[AlarmRule]) -> str | None:
    """The reason of the first rule that fires on these signals (``'; '``-joined when several do), else None."""
    reasons = [rule.reason(signals) for rule in rules if rule.fires(signals)]
    return "; ".join(reasons) if reasons else None


def first_alarm(history: Sequence[Mapping[str, float]], rules: Sequence[AlarmRule]) -> int | None:
    """Index of the first evaluation in ``history`` at which a rule fires, or None."""
    return next((i for i, s in enumerate(history) if check(s, rules)), None)


def chosen_index(history: Sequence[Mapping[str, float]], rules: Sequence[AlarmRule]) -> int:
    """The monitor's checkpoint: the evaluation before the first alarm (0 if it fires at once), else the last."""
    alarm = first_alarm(history, rules)
    return len(history) - 1 if alarm is None else max(alarm - 1, 0)


DEFAULT_RULES: tuple[AlarmRule, ...] = (
    AlarmRule("off_support", 0.086, True, "the policy's samples leave pi_ref's support; gold fell after this in the "
                                          "lab's runs"),
)
"""Chosen on the embedded world (``chipo.lab.monitor_validation``: DPO and chiPO, 16 epochs, 33 evaluations per run)
among the fraction-valued signals, on seeds 0-3 at beta 0.05, by the smallest mean regret against oracle early
stopping (0.086 is the tuned 0.0859 rounded); tested on seeds 4-7 and on beta 0.005 (docs/monitor-validation/).
It assumes the default calibration (``MonitorSettings.quantile`` 0.02: at pi = pi_ref the rate is about 0.02, with a
standard error of about 0.012 at 128 samples, so 0.086 sits about 5 standard errors above it)."""
