"""Which ``transformers.TrainingArguments`` keys each chipo trainer honours; the others are refused when set.

Every chipo config is a TrainingArguments subclass, so every TrainingArguments field is a config key. A key the
trainer never reads would be silently ignored (``gradient_accumulation_steps=8`` training with 1, ``push_to_hub``
pushing nothing), so a config refuses, in one line naming the key, any TrainingArguments field outside its
trainer's honoured set that the user set to a value other than its default. ``--help`` lists only the honoured ones.

The sets are explicit lists, each entry something the trainer reads: for the ``transformers.Trainer``-based
commands (train, sft, reward) Trainer itself or TrainingArguments' own set-up reads them; for the sampled-data
loops (rl, online) ``chipo.train.sampled`` / ``chipo.train.loop`` do (``tests/test_honoured_keys.py`` checks that
each honoured key is read by the code that claims it, and that every other key is refused).
"""

from __future__ import annotations

import dataclasses
import enum

from transformers import TrainingArguments

from chipo.config import ConfigError

TRAINING_ARGUMENTS = tuple(f.name for f in dataclasses.fields(TrainingArguments) if f.init)

# Read by TrainingArguments.__post_init__ / its device set-up, whichever loop runs afterwards.
SETUP = frozenset({"output_dir", "use_cpu", "local_rank", "ddp_backend", "ddp_timeout", "tf32"})

SAMPLED_HONOURED = SETUP | frozenset({
    # chipo.train.loop.optimizer_and_scheduler: Trainer's optimizer and schedule from these
    "learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "optim", "optim_args",
    "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_steps",
    # chipo.train.sampled.SampledTrainer
    "gradient_accumulation_steps", "max_grad_norm", "bf16", "fp16", "gradient_checkpointing",
    "gradient_checkpointing_kwargs", "logging_strategy", "logging_steps", "logging_first_step", "disable_tqdm",
    "report_to", "run_name", "save_strategy", "save_steps", "save_total_limit", "seed", "resume_from_checkpoint",
})
"""What ``chipo rl`` and ``chipo online`` read (both add evaluation: ``RL_HONOURED``, ``ONLINE_HONOURED``)."""

RL_HONOURED = SAMPLED_HONOURED | {"eval_strategy", "eval_steps"}
ONLINE_HONOURED = SAMPLED_HONOURED | {"eval_strategy", "eval_steps"}  # its evaluations run the monitor

# transformers.Trainer reads nearly every TrainingArguments field. Not these:
NOT_READ_BY_TRAINER = frozenset({"do_train", "do_eval", "do_predict"})  # "not directly used by Trainer" (its doc)
SFT_HONOURED = frozenset(TRAINING_ARGUMENTS) - NOT_READ_BY_TRAINER
PAIRWISE_HONOURED = SFT_HONOURED - {"label_smoothing_factor"}
"""``chipo train`` and ``chipo reward``: their pairwise losses replace Trainer's ``compute_loss``, so Trainer's
label smoother (``label_smoothing_factor``) never runs (``chipo train`` has its own ``label_smoothing``, cDPO)."""


def _plain(value):
    value = value.value if isinstance(value, enum.Enum) else value
    # "Off" spelled several ways (HfArgumentParser turns a default of "no" into False, None into ""): all one value.
    if value in (None, False, "", "no", "none", "false") or (isinstance(value, (list, dict, tuple)) and not value):
        return None
    return value


def unread_keys(config, honoured: frozenset[str]) -> list[str]:
    """TrainingArguments fields of ``config`` outside ``honoured`` whose value differs from the class default."""
    defaults = {f.name: f for f in dataclasses.fields(type(config)) if f.init}
    found = []
    for name in TRAINING_ARGUMENTS:
        if name in honoured or name not in defaults:
            continue
        f = defaults[name]
        default = f.default if f.default is not dataclasses.MISSING else (
            f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        if _plain(getattr(config, name)) != _plain(default):
            found.append(name)
    return found


def help_keys(cls) -> set[str]:
    """The config keys ``--help`` lists for ``cls``: its own fields and the TrainingArguments fields it honours."""
    return {f.name for f in dataclasses.fields(cls)
            if f.init and (f.name not in TRAINING_ARGUMENTS or f.name in cls.honoured)}


def refuse_unread(config, honoured: frozenset[str], command: str) -> None:
    """One-line ``ConfigError`` for the first TrainingArguments key ``command`` would ignore (``unread_keys``)."""
    unread = unread_keys(config, honoured)
    if unread:
        name = unread[0]
        raise ConfigError(f"{name}={getattr(config, name)!r}: {command} does not support this TrainingArguments "
                          f"key (it would be ignored); remove it (`{command} --help` lists the keys it reads)")
