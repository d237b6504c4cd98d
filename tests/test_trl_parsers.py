"""Every chipo config parses with ``transformers.HfArgumentParser`` and TRL's ``TrlParser``, from ``--key value``
arguments and from a YAML file, to the same config that chipo's own ``load_config`` builds from ``key=value``.

TRL's scripts (``trl/scripts/dpo.py``) parse ``(ScriptArguments, DPOConfig, ModelConfig)`` with ``TrlParser``; a user
who swaps in ``PreferenceConfig`` must get the same behaviour. HfArgumentParser accepts a union only when it is
``Optional[X]`` or contains ``str`` *and* reads it by position: ``None | str | list[str]`` becomes ``str``, while
``str | list[str] | None`` makes it call ``isinstance(None, list[str])`` (a TypeError), which crashed TRL's script.
"""

import pytest
import yaml
from transformers import HfArgumentParser, TrainingArguments
from trl import TrlParser

from chipo.config import ConfigError, load_config
from chipo.train.config import PreferenceConfig
from chipo.train.online_config import OnlineConfig
from chipo.train.reward_config import RewardConfig
from chipo.train.rl_config import RLConfig
from chipo.train.sft_config import SFTConfig

# Each config with the keys it requires plus a few of its own (non-default values, of several types).
CASES = {
    PreferenceConfig: {"beta": "0.25", "loss": "dpo", "r_max": "3.5", "packing": "false", "max_length": "64"},
    SFTConfig: {"max_length": "96", "learning_rate": "0.0003", "report_to": "tensorboard"},
    RewardConfig: {"max_length": "80", "center_rewards_coefficient": "0.01"},
    RLConfig: {"policy": "p", "reward": "r", "prompts": "q", "regularizer": "chi2", "beta": "0.02", "k": "4"},
    OnlineConfig: {"policy": "p", "prompts": "q", "judge": "j", "loss": "chipo", "beta": "0.05"},
}


def _chipo_configs() -> set[type]:
    """Every TrainingArguments subclass chipo defines (after importing the modules that define them)."""
    found, todo = set(), [TrainingArguments]
    while todo:
        for sub in todo.pop().__subclasses__():
            todo.append(sub)
            if sub.__module__.startswith("chipo."):
                found.add(sub)
    return found


def _comparable(config) -> dict:
    return config.to_dict()


def test_cases_cover_every_chipo_training_arguments_subclass():
    """A new config class must be added to CASES; a shared base of listed classes (TrainerConfig) need not be."""
    bases = {base for cls in CASES for base in cls.__mro__[1:]}
    assert _chipo_configs() - bases == set(CASES)


@pytest.mark.parametrize("cls", list(CASES), ids=lambda c: c.__name__)
def test_hf_argument_parser_command_line_matches_load_config(cls, tmp_path):
    """``--key value`` through HfArgumentParser == ``key=value`` through chipo's load_config."""
    values = {**CASES[cls], "output_dir": str(tmp_path / "out")}
    argv = [tok for k, v in values.items() for tok in (f"--{k}", v)]
    (parsed,) = HfArgumentParser(cls).parse_args_into_dataclasses(argv)
    ours = load_config(cls, None, [f"{k}={v}" for k, v in values.items()])
    assert _comparable(parsed) == _comparable(ours)
    assert isinstance(parsed.report_to, list) or parsed.report_to == "none"  # chipo's normalisation still ran


@pytest.mark.parametrize("cls", list(CASES), ids=lambda c: c.__name__)
def test_trl_parser_reads_yaml_and_command_line(cls, tmp_path):
    """TrlParser: a YAML file (``--config``) with command-line arguments overriding it, as in TRL's scripts."""
    values = {**CASES[cls], "output_dir": str(tmp_path / "out")}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({k: yaml.safe_load(v) for k, v in values.items()}))
    (from_yaml,) = TrlParser(cls).parse_args_and_config(["--config", str(path)])
    assert _comparable(from_yaml) == _comparable(load_config(cls, path))
    (overridden,) = TrlParser(cls).parse_args_and_config(["--config", str(path), "--seed", "7"])
    assert overridden.seed == 7 != from_yaml.seed


def test_hf_argument_parser_yaml_file_and_bool_flags(tmp_path):
    """HfArgumentParser.parse_yaml_file, and the bare ``--lora`` / ``--no_packing`` flags it adds for bools."""
    path = tmp_path / "run.yaml"
    path.write_text(f"beta: 0.1\nloss: chipo\noutput_dir: {tmp_path / 'out'}\nreport_to: none\n")
    (config,) = HfArgumentParser(PreferenceConfig).parse_yaml_file(str(path))
    assert _comparable(config) == _comparable(load_config(PreferenceConfig, path))
    assert (config.beta, config.loss) == (0.1, "chipo")
    argv = ["--beta", "0.1", "--loss", "chipo", "--output_dir", str(tmp_path / "out"), "--lora", "--no_packing"]
    (config,) = HfArgumentParser(PreferenceConfig).parse_args_into_dataclasses(argv)
    assert config.lora is True and config.packing is False


def test_report_to_is_still_validated_through_hf_argument_parser(tmp_path):
    """chipo's check of report_to runs in __post_init__, whichever parser built the config."""
    argv = ["--output_dir", str(tmp_path / "out"), "--report_to", "tensorbord"]
    with pytest.raises(ConfigError, match="report_to: unknown logger 'tensorbord'"):
        HfArgumentParser(PreferenceConfig).parse_args_into_dataclasses(argv)
    argv = ["--output_dir", str(tmp_path / "out"), "--report_to", "tensorboard,none"]
    (config,) = HfArgumentParser(PreferenceConfig).parse_args_into_dataclasses(argv)
    assert config.report_to == ["tensorboard", "none"]
