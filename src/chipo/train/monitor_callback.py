"""``OveroptimizationCallback``: the gold-free overoptimization monitor (``chipo.monitor``) inside any
``transformers.Trainer`` -- chipo's ``PreferenceTrainer`` (``chipo train monitor=warn``) or TRL's ``DPOTrainer``.

At every evaluation it measures the signals of the current
policy on a small prompt set, logs them under ``monitor/`` through the trainer's own logging (so ``report_to``
loggers and chipo's ``metrics.jsonl`` get them) and appends them to ``<output_dir>/monitor.jsonl``. When an alarm
rule fires (``chipo.monitor.alarm``) it records the reason, and by ``mode``:

* ``log``: signals and the alarm flag are logged, nothing is printed;
* ``warn``: also one warning line with the reason and the monitor's best checkpoint (the last evaluation before
  the alarm);
* ``stop``: also stops training (``control.should_training_stop``).

At the end of training ``<output_dir>/monitor.json`` names the alarm, its reason and the monitor's best step and
checkpoint (when one was saved at that step).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
from pathlib import Path

from transformers import Trainer, TrainerCallback

from chipo.io import write_json
from chipo.monitor import DEFAULT_RULES, AlarmRule, MonitorSettings, OveroptimizationMonitor, check
from chipo.train.monitor_fields import MODES

logger = logging.getLogger("chipo")



class OveroptimizationCallback(TrainerCallback):
    """Runs an ``OveroptimizationMonitor`` at each evaluation (module docstring).

    ``attach(trainer)`` (or passing ``trainer=``) lets the callback log through the trainer, so ``report_to`` sees
    the signals; without it they still go to ``monitor.jsonl``, to the evaluation's metrics dict and to
    ``state.log_history``.
    """

    def __init__(self, monitor: OveroptimizationMonitor, mode: str = "warn", rules=DEFAULT_RULES, trainer=None,
                 prefix: str = "monitor/"):
        if mode not in MODES:
            raise ValueError(f"monitor mode must be one of {', '.join(MODES)}, got {mode!r}")
        self.monitor, self.mode, self.prefix = monitor, mode, prefix
        self.rules = [AlarmRule.parse(r) if isinstance(r, str) else r for r in rules]
        self.trainer = trainer
        self.history: list[dict] = []
        self.alarm: dict | None = None

    def attach(self, trainer) -> OveroptimizationCallback:
        """Log through ``trainer`` and add this callback to it (unless it is there already)."""
        self.trainer = trainer
        if self not in trainer.callback_handler.callbacks:
            trainer.add_callback(self)
        return self

    # --- hooks
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.mode != "off" and model is not None:
            # pi_ref's side once, before the policy moves (with LoRA, pi_ref is the policy with adapters off). No
            # measurement of the initial policy itself: at pi = pi_ref every signal has its reference value (KL,
            # displacement 0; accuracy 1/2; off-support rate ~ the quantile), and it would cost one more sampling.
            self.monitor.calibrate(getattr(model, "module", model))

    def on_evaluate(self, args, state, control, model=None, metrics=None, **kwargs):
        if self.mode != "off" and model is not None:
            self._measure(args, state, control, model, metrics)

    def on_train_end(self, args, state, control, **kwargs):
        if self.mode != "off" and self.history and state.is_world_process_zero:
            write_json(Path(args.output_dir) / "monitor.json", self.summary(args.output_dir))

    # --- work
    def _measure(self, args, state, control, model, metrics: dict | None = None) -> None:
        if self.history and self.history[-1]["step"] == state.global_step:
            return  # one measurement per step (e.g. an evaluation right at the start)
        # A loop that hands over its DDP-wrapped policy (chipo's sampled loops) -> the module itself, which samples.
        signals = self.monitor.measure(getattr(model, "module", model))
        reason = check(signals, self.rules)
        self.history.append({"step": state.global_step, "epoch": state.epoch, **signals})
        if reason and self.alarm is None:
            # The evaluation before the alarm; at the first evaluation that is the initial policy (step 0).
            best = self.history[-2]["step"] if len(self.history) > 1 else 0
            self.alarm = {"step": state.global_step, "reason": reason, "best_step": best}
            if self.mode in ("warn", "stop") and state.is_world_process_zero:
                logger.warning("overoptimization monitor at step %d: %s; best checkpoint by the monitor: step %d%s",
                               state.global_step, reason, best,
                               "; stopping (monitor=stop)" if self.mode == "stop" else "")
            if self.mode == "stop":
                control.should_training_stop = True
        logs = {self.prefix + k: v for k, v in signals.items()}
        logs[self.prefix + "alarm"] = float(self.alarm is not None)
        if metrics is not None:
            metrics.update(logs)
        if self.trainer is not None:
            # The base class's log: subclasses (chipo's, TRL's) add their training-window metrics to every log
            # call and would hand this evaluation-time record the window's numbers.
            Trainer.log(self.trainer, dict(logs))
        elif metrics is None:
            state.log_history.append({**logs, "step": state.global_step})
        if state.is_world_process_zero and args.output_dir:
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            with open(os.path.join(args.output_dir, "monitor.jsonl"), "a") as f:
                f.write(json.dumps({"step": state.global_step, "epoch": state.epoch, **signals,
                                    "alarm": reason}) + "\n")

    def summary(self, output_dir: str | None = None) -> dict:
        """The alarm (None if none fired), the monitor's best step and its checkpoint directory when one exists."""
        best = self.alarm["best_step"] if self.alarm else (self.history[-1]["step"] if self.history else None)
        ckpt = Path(output_dir) / f"checkpoint-{best}" if output_dir and best is not None else None
        return {"alarm": self.alarm, "best_step": best,
                "best_checkpoint": str(ckpt) if ckpt is not None and ckpt.is_dir() else None,
                "rules": [dataclasses.asdict(r) for r in self.rules], "mode": self.mode,
                "evaluations": len(self.history)}


def monitor_for(trainer, args, max_pairs: int = 256) -> OveroptimizationCallback | None:
    """The callback for a ``PreferenceTrainer`` built from a ``PreferenceConfig`` (None when ``monitor=off``).

    It measures at evaluations, so it needs evaluation data: idle (None) without it. Prompts: the first
    ``monitor_prompts`` distinct prompts of the eval split; its first ``max_pairs`` rows are the held-out pairs (with
    pi_ref's precomputed log-probs when present).
    pi_ref: the trainer's frozen copy, the policy with adapters off (LoRA), ``ref_model`` loaded once, or else a copy
    of the initial policy taken now, before training (memory for one more model: ``monitor=off`` avoids it)."""
    import torch

    from chipo.monitor import HeldoutPairs

    held = trainer.eval_dataset if hasattr(trainer.eval_dataset, "select") else None
    if args.monitor == "off" or held is None:
        if args.monitor != "off":
            logger.info("overoptimization monitor: no evaluation data (eval_split / eval_dataset), so it stays idle")
        return None
    rows = held.select(range(min(len(held), max_pairs)))
    prompts = list(dict.fromkeys(tuple(p) for p in rows["prompt_input_ids"]))[:args.monitor_prompts]
    refs = [torch.tensor(rows[c], dtype=torch.float64) for c in ("ref_chosen_logps", "ref_rejected_logps")
            if c in rows.column_names]
    pairs = HeldoutPairs(rows["prompt_input_ids"], rows["chosen_input_ids"], rows["rejected_input_ids"],
                         *(refs if len(refs) == 2 else ()))
    ref_model = trainer.ref_model
    if ref_model is None and not trainer.ref_adapter_disabled:
        if args.ref_model:
            from chipo.models import load_causal_lm

            ref_model = load_causal_lm(args.ref_model)
        else:
            ref_model = copy.deepcopy(trainer.accelerator.unwrap_model(trainer.model))
        ref_model = ref_model.eval().requires_grad_(False).to(trainer.args.device)
    settings = MonitorSettings(num_samples=args.monitor_samples, max_new_tokens=args.monitor_max_new_tokens,
                               seed=args.seed)
    monitor = OveroptimizationMonitor(trainer.processing_class, [list(p) for p in prompts], ref_model=ref_model,
                                      pairs=pairs, settings=settings, loss=trainer.loss_name, beta=trainer.beta,
                                      loss_options=trainer.loss_options)
    return OveroptimizationCallback(monitor, mode=args.monitor, rules=args.monitor_rules or DEFAULT_RULES
                                    ).attach(trainer)


def sampled_monitor(config, tokenizer, prompt_ids, ref_model) -> OveroptimizationCallback | None:
    """The callback for ``chipo rl`` / ``chipo online`` (None when ``monitor=off`` or nothing is evaluated).

    Their loop (``chipo.train.sampled``) calls ``on_evaluate`` every ``eval_steps`` steps; the monitor samples the
    first ``monitor_prompts`` of ``prompt_ids`` (the evaluation prompts) against ``ref_model`` (pi_ref). There are
    no held-out pairs, so the pair signals (displacement, implicit accuracy) are absent; the proxy reward is the
    loop's own ``eval_reward`` (``chipo rl``)."""
    if config.monitor == "off" or not prompt_ids:
        if config.monitor != "off":
            logger.info("overoptimization monitor: no evaluation (eval_steps), so it stays idle")
        return None
    settings = MonitorSettings(num_samples=config.monitor_samples, max_new_tokens=config.monitor_max_new_tokens,
                               seed=config.seed)
    monitor = OveroptimizationMonitor(tokenizer, [list(p) for p in prompt_ids[:config.monitor_prompts]],
                                      ref_model=ref_model, settings=settings)
    return OveroptimizationCallback(monitor, mode=config.monitor, rules=config.monitor_rules or DEFAULT_RULES)
