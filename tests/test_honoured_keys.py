"""Every ``transformers.TrainingArguments`` key, for every chipo trainer, is either honoured or refused.

Honoured: the key is in the trainer's explicit set (``chipo.train.honoured``) and the code that claims to read it
does read it (``.key`` appears in that code's source: chipo's loop for ``chipo rl`` / ``chipo online``, or
``transformers.Trainer`` / ``TrainingArguments`` for the Trainer-based commands). Refused: set to a value other than
its default, the config raises one ``ConfigError`` line naming the key. ``--help`` lists only the honoured ones.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib
import inspect
import re

import pytest

from chipo.config import ConfigError, config_help
from chipo.train.config import PreferenceConfig
from chipo.train.honoured import SETUP, TRAINING_ARGUMENTS
from chipo.train.online_config import OnlineConfig
from chipo.train.reward_config import RewardConfig
from chipo.train.rl_config import RLConfig
from chipo.train.sft_config import SFTConfig

REQUIRED = {RLConfig: {"policy": "p", "prompts": "q", "reward": "r"},
            OnlineConfig: {"policy": "p", "prompts": "q", "judge": "j"}}

TRAINER_SOURCES = ("transformers.trainer", "transformers.training_args", "transformers.trainer_callback",
                   "transformers.integrations.integration_utils", "transformers.trainer_pt_utils",
                   "transformers.integrations.deepspeed", "transformers.integrations.fsdp",
                   "transformers.trainer_optimizer")
SAMPLED_LOOP = ("chipo.train.sampled", "chipo.train.sampled_config", "chipo.train.rl_run", "chipo.train.rl",
                "chipo.train.online")
# chipo.train.common.opened_run, the run-directory entry that run_sampled shares with run_trainer, reads these
RUN_DIRECTORY = {"resume_from_checkpoint"}
# chipo.train.loop.optimizer_and_scheduler hands these to Trainer.get_optimizer_cls_and_kwargs / get_scheduler
OPTIMIZER = {"learning_rate", "lr_scheduler_type", "lr_scheduler_kwargs", "warmup_steps", "optim", "optim_args",
             "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_steps"}


def _source(modules) -> str:
    return "\n".join(inspect.getsource(importlib.import_module(m)) for m in modules)


def readers(cls, key) -> tuple[str, ...]:
    """Where ``cls``'s trainer reads ``key``."""
    if cls in REQUIRED:
        if key in SETUP:
            return ("transformers.training_args",)
        if key in OPTIMIZER:
            return ("chipo.train.loop", "transformers.trainer_optimizer", "transformers.training_args")
        if key in RUN_DIRECTORY:
            return ("chipo.train.common",)
        return SAMPLED_LOOP
    return TRAINER_SOURCES


def non_default(f: dataclasses.Field):
    default = f.default if f.default is not dataclasses.MISSING else (
        f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
    if isinstance(default, enum.Enum):
        return "something-else"
    if isinstance(default, bool):
        return not default
    if isinstance(default, int):
        return default + 3
    if isinstance(default, float):
        return default + 0.5
    if isinstance(default, str):
        return default + "-x"
    if isinstance(default, list):
        return ["x"]
    if isinstance(default, dict):
        return {"x": 1}
    return "x"


CONFIGS = [PreferenceConfig, SFTConfig, RewardConfig, RLConfig, OnlineConfig]


@pytest.mark.parametrize("cls", CONFIGS, ids=lambda c: c.__name__)
def test_every_training_arguments_key_is_honoured_or_refused(cls):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    honoured, refused = [], []
    for key in TRAINING_ARGUMENTS:
        if key in cls.honoured:
            pattern = re.compile(rf"\.{key}\b|[\"']{key}[\"']")
            assert pattern.search(_source(readers(cls, key))), f"{cls.__name__}: {key} is not read where claimed"
            honoured.append(key)
            continue
        value = non_default(fields[key])
        with pytest.raises(ConfigError, match=rf"^{key}=.*does not support this TrainingArguments key"):
            cls(**REQUIRED.get(cls, {}), **{key: value})
        refused.append(key)
    assert len(honoured) + len(refused) == len(TRAINING_ARGUMENTS)
    if cls in REQUIRED:
        assert {"gradient_accumulation_steps", "gradient_checkpointing", "report_to"} <= set(honoured)
        assert {"neftune_noise_alpha", "label_smoothing_factor", "use_liger_kernel", "auto_find_batch_size",
                "push_to_hub"} <= set(refused)
    # --help lists the honoured keys and none of the refused ones
    listed = set(re.findall(r"^  (\w+) \(", config_help(cls), flags=re.M))
    assert set(honoured) <= listed and not (set(refused) & listed)


def test_online_evaluates_the_monitor_every_eval_steps():
    """chipo online's evaluations are the overoptimization monitor's (tests/test_monitor_sampled.py runs them)."""
    config = OnlineConfig(**REQUIRED[OnlineConfig], eval_steps=5)
    assert config.every("eval") == 5 and config.monitor == "warn"


def test_a_key_left_at_its_default_is_not_refused():
    config = RLConfig(**REQUIRED[RLConfig], push_to_hub=False, neftune_noise_alpha=None)
    assert config.push_to_hub is False
