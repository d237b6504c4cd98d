"""Typed config: YAML + key=value overrides, coercion, validation, one-line errors, help text."""

import dataclasses

import pytest

from chipo.config import ConfigError, config_help, load_config
from chipo.train.config import TrainConfig

BASE = ["model=m", "dataset=d"]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ndataset: d\nloss: dpo\nbeta: 0.2\nsave_strategy: no\n")
    config = load_config(TrainConfig, path, ["beta=0.05", "lora=true", "max_prompt_length=null", "r_max=null"])
    assert config.loss == "dpo" and config.beta == 0.05 and config.lora is True
    assert config.save_strategy == "no"  # YAML 1.1 reads an unquoted `no` as False; restored for string fields
    assert config.r_max is None and config.loss_options()["r_max"] is None


def test_loss_options_only_overrides():
    assert "r_max" not in load_config(TrainConfig, None, BASE).loss_options()  # preset default applies
    opts = load_config(TrainConfig, None, [*BASE, "link=chi2mix", "r_max=2", "label_smoothing=0.2"]).loss_options()
    assert opts["link"] == "chi2mix" and opts["r_max"] == 2.0 and opts["label_smoothing"] == 0.2


@pytest.mark.parametrize("override,message", [
    ("beta=-1", "beta must be positive"),
    ("beta=abc", "beta: expected a number"),
    ("loss=foo", "unknown loss 'foo'; valid: "),
    ("betta=1", "did you mean 'beta'"),
    ("max_length=1.5", "max_length: expected an integer"),
    ("lora=maybe", "lora: expected true/false"),
    ("max_prompt_length=600", "max_prompt_length must lie in (0, max_length=512)"),
    ("reference=none", "reference must be one of"),
    ("r_max=-1", "r_max must be positive"),
    ("novalue", "not of the form key=value"),
])
def test_errors_are_one_line(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(TrainConfig, None, [*BASE, override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(TrainConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(TrainConfig, bad)


def test_every_field_has_help():
    text = config_help(TrainConfig)
    for f in dataclasses.fields(TrainConfig):
        assert f.metadata.get("help"), f.name
        assert f"  {f.name} (" in text
    assert "model (str, required)" in text
