"""One ``accelerate`` loop for every trainer that samples its own data from the policy (``chipo rl``,
``chipo online``): ``SampledTrainer``.

A subclass supplies only what differs: ``rollout(step)`` (sample this process's share of the step's prompts and
score or label them, no gradient) and ``micro_loss(rollout, part)`` (per-prompt losses [m] and per-prompt metric
columns [m] of one micro-batch), plus optionally ``summarize`` (metric columns of the whole step -> a log record)
and ``evaluate``. The base does everything else once:

* prepare: optimizer and schedule as ``transformers.Trainer`` builds them (``chipo.train.loop``), the policy
  through ``accelerator.prepare`` (DDP / DeepSpeed ZeRO-1/2; sampling needs full parameters, so FSDP and ZeRO-3
  are refused), gradient checkpointing;
* gradient accumulation: the process's m_total = P / N prompts are cut into G = ``gradient_accumulation_steps``
  micro-batches of m = P / (N G); ``accelerator.backward`` of each micro-batch's *mean* loss is divided by G and
  DDP averages the N processes, so the gradient is (1/N)(1/G) sum_micro (1/m) sum_i grad loss_i = (1/P) sum_i
  grad loss_i: the one-process full-batch gradient (``tests/test_sampled_loop.py`` checks G micro-batches against
  one batch to 1e-5);
* the guarded step: a non-finite loss (on any process) or gradient norm stops the run before the optimizer step,
  naming the step and the last good checkpoint (``NonFiniteError``);
* metrics: the per-prompt columns of every process are gathered and summarized once (main process logs them to
  ``metrics.jsonl``, stdout and accelerate's trackers, ``report_to``);
* checkpoints (``chipo.train.loop``: atomic ``checkpoint-<step>``), resume, the final save;
* ``transformers.TrainerCallback`` hooks, called as ``transformers.Trainer`` calls them, with (args, state,
  control, **kwargs) and a ``transformers.TrainerState`` kept here: on_train_begin, on_step_begin, on_step_end,
  on_evaluate, on_log, on_save, on_train_end. ``control.should_training_stop`` ends the run after the step
  (checkpointed when saving is on; the final policy is saved as always); ``should_log``, ``should_evaluate`` and
  ``should_save`` set by a callback are honoured at that step.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import sys
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm
from transformers import TrainerControl, TrainerState

from chipo.config import ConfigError
from chipo.io import staged_into
from chipo.models import pad_id
from chipo.train import loop
from chipo.train.common import TRACKER_PACKAGES, check_trackers, opened_run
from chipo.train.pairwise import NonFiniteError
from chipo.train.rundir import checkpoint_note

logger = logging.getLogger("chipo")

# The trackers accelerate logs to (chipo.train.common.TRACKER_PACKAGES says which package each needs).
ACCELERATE_TRACKERS = ("tensorboard", "wandb", "mlflow", "comet_ml", "clearml", "dvclive", "swanlab", "trackio")


def trackers(config) -> list[str] | None:
    """``report_to`` as accelerate's ``log_with``: None for none; a one-line ``ConfigError`` for a tracker that
    accelerate cannot log to (``make_accelerator`` checks first that its package is installed)."""
    wanted = config.report_to
    if wanted in ("none", [], None, ["none"]):
        return None
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    if "all" in wanted:
        return [name for name in ACCELERATE_TRACKERS
                if any(importlib.util.find_spec(p) for p in TRACKER_PACKAGES[name])] or None
    for name in wanted:
        if name not in ACCELERATE_TRACKERS:
            raise ConfigError(f"report_to={name}: accelerate cannot log to it; use one of "
                              f"{', '.join(ACCELERATE_TRACKERS)}")
    return wanted


def make_accelerator(config, command: str):
    """The ``accelerate.Accelerator`` of a sampled-data run: precision, accumulation and trackers from ``config``;
    refuses parameter sharding (every process samples with HF generate from its full copy of the policy)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, GradientAccumulationPlugin, ProjectConfiguration

    check_trackers(config)
    log_with = trackers(config)
    config.device  # noqa: B018 -- TrainingArguments sets up the (possibly distributed) state it describes
    project = ProjectConfiguration(project_dir=config.output_dir, automatic_checkpoint_naming=False,
                                   logging_dir=str(Path(config.output_dir) / "runs"))
    acc = Accelerator(cpu=config.use_cpu, mixed_precision=config.accelerate_precision(), log_with=log_with,
                      project_config=project, gradient_accumulation_plugin=GradientAccumulationPlugin(
                          num_steps=config.gradient_accumulation_steps, sync_with_dataloader=False))
    plugin = getattr(acc.state, "deepspeed_plugin", None)
    if acc.distributed_type == DistributedType.FSDP or (plugin is not None and plugin.zero_stage == 3):
        raise ConfigError(f"{command} samples with HF generate from the full policy on every process: launch it "
                          "with DDP or DeepSpeed ZeRO-1/2 (FSDP and ZeRO-3 shard the parameters)")
    return acc


def check_split(config, acc) -> None:
    """Each process takes prompts_per_step / N prompts, in gradient_accumulation_steps equal micro-batches."""
    share = acc.num_processes * config.gradient_accumulation_steps
    if config.prompts_per_step % share:
        raise ConfigError(f"prompts_per_step ({config.prompts_per_step}) must be divisible by num_processes x "
                          f"gradient_accumulation_steps ({acc.num_processes} x {config.gradient_accumulation_steps})")


def score_or_fail(scorer, prompts: list[str], responses: list[str], role: str):
    """``chipo.rewards.score_checked``; any exception of the scorer (often user code: ``module:function``) becomes
    one ``ConfigError`` line naming the scorer and the exception, instead of a traceback mid-run."""
    from chipo.rewards import score_checked

    try:
        return score_checked(scorer, prompts, responses)
    except Exception as e:  # noqa: BLE001 -- the scorer is user code: its failure is reported, not re-raised
        name = getattr(scorer, "name", "") or type(scorer).__name__
        raise ConfigError(f"{role} {name} failed: {type(e).__name__}: {e}") from None


def warn_dropout_with_checkpointing(model) -> None:
    rates = {k: v for k, v in model.config.to_dict().items() if "dropout" in k and isinstance(v, float) and v > 0}
    if rates:
        logger.warning("gradient_checkpointing keeps checkpointed layers in training mode; layers that apply "
                       "dropout themselves would drop out in the loss forward (config: %s)", rates)


class SampledTrainer:
    """The shared loop (module docstring). Subclasses set ``name`` and implement ``rollout`` and ``micro_loss``."""

    name = "chipo"
    kind = "sampled-data"  # in messages: "non-finite <kind> loss"

    def __init__(self, config, accelerator, policy, ref, tokenizer, out, *, callbacks=()):
        self.config, self.accelerator, self.tokenizer, self.out = config, accelerator, tokenizer, Path(out)
        self.pad = pad_id(tokenizer)
        if config.gradient_checkpointing:
            policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=config.gradient_checkpointing_kwargs)
            warn_dropout_with_checkpointing(policy)
        # The scheduler is not passed to accelerator.prepare: an AcceleratedScheduler would step N times per step
        # under DDP.
        optimizer, self.scheduler = loop.optimizer_and_scheduler(config, policy, config.max_steps)
        self.model, self.optimizer = accelerator.prepare(policy, optimizer)
        accelerator.register_for_checkpointing(self.scheduler)
        self.ref = ref.to(accelerator.device).eval().requires_grad_(False)
        self.callbacks = list(callbacks)
        self.state = TrainerState(is_local_process_zero=accelerator.is_local_main_process,
                                  is_world_process_zero=accelerator.is_main_process)
        self.control = TrainerControl()

    @property
    def step(self) -> int:
        return self.state.global_step

    @step.setter
    def step(self, value: int) -> None:
        self.state.global_step = value

    @property
    def policy(self):
        """The unwrapped policy (generation, evaluation, saving)."""
        return self.accelerator.unwrap_model(self.model)

    # --- what a subclass supplies
    def total_steps(self) -> int:
        """The last step of this run (``max_steps``; fewer when something else, e.g. a label budget, ends it)."""
        return self.config.max_steps

    def rollout(self, step: int):
        """Sample and score this process's share of step ``step``'s prompts (no gradient); ``len()`` = prompts."""
        raise NotImplementedError

    def micro_loss(self, rollout, part: slice) -> tuple[Tensor, dict[str, Tensor]]:
        """Per-prompt losses [m] (with gradient) and per-prompt metric columns [m] of ``rollout[part]``."""
        raise NotImplementedError

    def summarize(self, columns: dict[str, Tensor]) -> dict[str, float]:
        """The step's record from the gathered per-prompt columns [P] (default: means)."""
        return {name: float(column.mean()) for name, column in columns.items()}

    def evaluate(self, step: int) -> dict[str, float]:
        return {}

    @property
    def evaluating(self) -> bool:
        return False

    def checkpoint_state(self) -> dict:
        """Extra loop state saved in checkpoints (besides the step)."""
        return {}

    def restore_state(self, state: dict) -> None:
        pass

    def postfix(self, record: dict) -> dict:
        return {"loss": f"{record['loss']:.3f}"}

    # --- callbacks, as transformers.trainer_callback.CallbackHandler calls them
    def _event(self, event: str, **kwargs) -> None:
        kwargs = {"model": self.policy, "processing_class": self.tokenizer, "optimizer": self.optimizer,
                  "lr_scheduler": self.scheduler, **kwargs}
        for callback in self.callbacks:
            result = getattr(callback, event)(self.config, self.state, self.control, **kwargs)
            if result is not None:
                self.control = result

    # --- one step
    def train_step(self, step: int) -> dict[str, float]:
        acc, cfg = self.accelerator, self.config
        rollout = self.rollout(step)
        n, g = len(rollout), cfg.gradient_accumulation_steps
        micro = n // g
        parts = []
        for start in range(0, n, micro):
            with acc.accumulate(self.model):
                losses, metrics = self.micro_loss(rollout, slice(start, start + micro))
                acc.backward(losses.mean())  # accelerate divides by G; DDP averages: the (1/P) sum (docstring)
            parts.append({"loss": losses.detach(), **{k: v.detach() for k, v in metrics.items()}})
        names = list(parts[0])
        table = torch.stack([torch.cat([p[k].reshape(-1) for p in parts]).double() for k in names], 1)
        columns = dict(zip(names, acc.gather(table).T))
        if not bool(torch.isfinite(columns["loss"]).all()):
            raise NonFiniteError(f"non-finite {self.kind} loss at step {step + 1}; stopping before the optimizer "
                                 f"step; {checkpoint_note(self.out)}")
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm and cfg.max_grad_norm > 0 else math.inf
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), max_norm)
        if grad_norm is not None and not torch.isfinite(torch.as_tensor(grad_norm)):
            raise NonFiniteError(f"non-finite gradient at step {step + 1}; stopping before the optimizer step; "
                                 f"{checkpoint_note(self.out)}")
        learning_rate = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        record = self.summarize(columns)
        record.update(grad_norm=float(grad_norm) if grad_norm is not None else math.nan, learning_rate=learning_rate)
        return record

    # --- the loop
    def train(self) -> None:
        """Steps ``self.step + 1 .. total_steps()``, with logging, evaluation, checkpoints and callbacks."""
        cfg, acc = self.config, self.accelerator
        last = self.total_steps()
        log_every, eval_every, save_every = cfg.every("logging"), cfg.every("eval"), cfg.every("save")
        self.state.max_steps = last
        self.state.logging_steps, self.state.eval_steps, self.state.save_steps = log_every, eval_every, save_every
        self.control = TrainerControl()
        self._event("on_train_begin")
        if self.step == 0 and self.evaluating and eval_every:
            self._evaluated(0, {"step": 0})
        bar = tqdm(range(self.step, last), initial=self.step, total=last, desc=self.name, unit="step",
                   disable=bool(cfg.disable_tqdm) or not acc.is_main_process)
        for step in bar:
            self._event("on_step_begin")
            record = {"step": step + 1, **self.train_step(step)}
            self.step = step + 1
            self.state.epoch = None
            self._event("on_step_end")
            ctl = self.control
            if self.evaluating and ((eval_every and self.step % eval_every == 0) or ctl.should_evaluate):
                self._evaluated(self.step, record)
            elif (log_every and self.step % log_every == 0) or self.step == last or ctl.should_log \
                    or (self.step == 1 and cfg.logging_first_step) or ctl.should_training_stop:
                self._log(record)
            bar.set_postfix(**self.postfix(record))
            # also at the last step, so that a later run can extend max_steps and resume from it
            if save_every and (self.step % save_every == 0 or self.step == last or ctl.should_training_stop) \
                    or ctl.should_save:
                self.save_checkpoint()
            if ctl.should_training_stop:
                logger.info("a callback stopped training at step %d", self.step)
                break
            self.control.should_log = self.control.should_evaluate = self.control.should_save = False
        self._event("on_train_end")

    def _evaluated(self, step: int, record: dict) -> None:
        self.control.should_evaluate = False
        metrics = self.evaluate(step)
        self._event("on_evaluate", metrics=metrics)  # callbacks may add to metrics (the monitor's signals)
        record.update(metrics)
        self._log(record)

    def _log(self, record: dict) -> None:
        self.control.should_log = False
        self.state.log_history.append(record)
        self._event("on_log", logs=record)
        if not self.accelerator.is_main_process:
            return
        line = json.dumps(record)
        with (self.out / "metrics.jsonl").open("a") as f:
            f.write(line + "\n")
        tqdm.write(line, file=sys.stdout)
        if self.accelerator.trackers:
            self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])

    # --- checkpoints
    def save_checkpoint(self) -> Path:
        """``checkpoint-<step>`` (accelerate state + step + ``checkpoint_state``), atomically."""
        self.control.should_save = False
        path = loop.save_checkpoint(self.accelerator, self.out, self.step,
                                    {**self.checkpoint_state(), "max_steps": self.total_steps()},
                                    self.config.save_total_limit)
        self._event("on_save")
        return path

    def load_checkpoint(self, checkpoint: str | Path) -> None:
        """Restore policy, optimizer, scheduler, RNG states, the step and ``checkpoint_state``."""
        state = loop.load_checkpoint(self.accelerator, checkpoint)
        self.step = int(state["step"])
        self.restore_state(state)
        logger.info("resumed from %s at step %d", checkpoint, self.step)

    def save_final(self) -> None:
        """The final HF policy + tokenizer in ``output_dir`` (staged in a hidden directory, then moved in)."""
        acc = self.accelerator
        acc.wait_for_everyone()
        state_dict = acc.get_state_dict(self.model)  # a collective under ZeRO / FSDP: every process takes part
        if acc.is_main_process:
            with staged_into(self.out) as tmp:
                self.policy.save_pretrained(tmp, state_dict=state_dict)
                self.tokenizer.save_pretrained(tmp)
        acc.wait_for_everyone()


def run_sampled(config, accelerator, make_trainer) -> Path:
    """Run a validated sampled-data job in ``config.output_dir`` under the run-directory protocol
    (``chipo.train.rundir.open_run``: lock, overwrite clearing, complete checkpoint for 'latest', objective check,
    metrics cut back, a finished run resumed to nothing). ``make_trainer(out)`` builds the ``SampledTrainer`` once
    the directory is the run's. A run that fails before its first step in an output_dir it found empty leaves
    nothing behind, so the same command can be rerun; a full disk is one ``OSError`` line, not a traceback."""
    acc, out = accelerator, Path(config.output_dir)
    check_split(config, acc)
    try:
        with opened_run(config, out, is_main=acc.is_main_process, barrier=acc.wait_for_everyone,
                        objective_keys=type(config).objective_keys, total_steps=config.last_step()) as run:
            if run is None:
                return out
            if acc.log_with:
                acc.init_trackers(config.run_name or out.name or "chipo", config={
                    k: v for k, v in config.to_dict().items() if isinstance(v, (int, float, str, bool))})
            trainer = make_trainer(out)
            if run.checkpoint is not None:
                trainer.load_checkpoint(run.checkpoint)
            if not run.finished:  # finished, final model missing (killed while saving it): only save it again
                trainer.train()
            trainer.save_final()
            if acc.is_main_process:
                run.mark_finished()
    finally:
        acc.end_training()
    return out
