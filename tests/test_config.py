"""Typed config: YAML + key=value overrides, coercion, validation, one-line errors, help text."""

import dataclasses

import pytest
from transformers import TrainingArguments

from chipo.config import ConfigError, config_fields, config_help, load_config
from chipo.train.config import PreferenceConfig

BASE = ["model=m", "dataset=d"]


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\ndataset: d\nloss: dpo\nbeta: 0.2\nsave_strategy: no\n")
    config = load_config(PreferenceConfig, path, ["beta=0.05", "lora=true", "max_prompt_length=null",
                                                  "clip_margin=false"])
    assert config.loss == "dpo" and config.beta == 0.05 and config.lora is True
    assert config.save_strategy == "no"  # YAML 1.1 reads an unquoted `no` as False; restored for string fields
    assert config.r_max is None and config.loss_options()["r_max"] is None  # clip_margin=false: no clip at all


def test_loss_options_only_overrides():
    assert "r_max" not in load_config(PreferenceConfig, None, BASE).loss_options()  # preset default applies
    opts = load_config(PreferenceConfig, None, [*BASE, "link=chi2mix", "r_max=2", "label_smoothing=0.2"]).loss_options()
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
    ("learning_rate=nan", "learning_rate: expected a finite number"),
    ("max_grad_norm=.inf", "max_grad_norm: expected a finite number"),
    ("seed=-1", "seed must lie in [0, 2**32)"),
    ("optim=adamw_nope", "optim"),
    ("lr_scheduler_type=zigzag", "lr_scheduler_type"),
    ("report_to=tensorbored", "report_to: unknown logger 'tensorbored'"),
])
def test_errors_are_one_line(override, message):
    with pytest.raises(ConfigError) as info:
        load_config(PreferenceConfig, None, [*BASE, override])
    assert message in str(info.value) and "\n" not in str(info.value)


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(PreferenceConfig, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(PreferenceConfig, bad)


def test_every_field_has_help():
    """Every config key -- chipo's own and every TrainingArguments option it reads -- is listed with a non-empty
    help; the TrainingArguments options it refuses are not listed."""
    text = config_help(PreferenceConfig)
    names = [f.name for f in config_fields(PreferenceConfig)]
    assert set(names) >= {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    listed = PreferenceConfig.help_keys()  # TrainingArguments keys chipo train refuses are not listed
    for f in config_fields(PreferenceConfig):
        assert f.metadata.get("help"), f.name
        block = ("\n" + text).split(f"\n  {f.name} (", 1)
        if f.name not in listed:
            assert len(block) == 1, f.name
            continue
        assert len(block) == 2, f.name
        assert block[1].split("\n", 2)[1].strip(), f.name  # the help line under the key is not empty


def test_training_arguments_options_work_as_keys():
    """The config is a TrainingArguments: any HF option is a key, coerced to its type (dicts stay dicts)."""
    config = load_config(PreferenceConfig, None, [*BASE, "torch_compile=true", "adam_beta2=0.95", "run_name=x",
                                                  "lr_scheduler_kwargs={min_lr: 0.0}", "warmup_ratio=0.1"])
    assert isinstance(config, TrainingArguments)
    assert config.torch_compile is True and config.adam_beta2 == 0.95 and config.run_name == "x"
    assert config.lr_scheduler_kwargs == {"min_lr": 0.0} and config.warmup_steps == 0.1


@pytest.mark.parametrize("text,message", [
    ("model: m\nmodel: n\n", "duplicate key 'model'"),
    ("a: &x [1]\nb: *x\n", "anchors"),
])
def test_strict_yaml(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(PreferenceConfig, path)


def test_yaml_alias_bomb_is_refused_quickly(tmp_path):
    """A billion-laughs file (267 bytes, hundreds of MB expanded) is one short error, not memory exhaustion."""
    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"] + [
        f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
        f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]" for i in range(8)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(PreferenceConfig, path)
    assert len(str(info.value)) < 200


def test_binary_and_bom_files(tmp_path):
    binary = tmp_path / "b.yaml"
    binary.write_bytes(b"\xff\xfe\x00model: m")
    with pytest.raises(ConfigError, match="not UTF-8|binary"):
        load_config(PreferenceConfig, binary)
    bom = tmp_path / "bom.yaml"
    bom.write_bytes("\ufeffmodel: m\ndataset: d\n".encode())
    assert load_config(PreferenceConfig, bom).model == "m"


def test_renamed_lora_keys_still_read():
    """The LoRA fields left TRL's ModelConfig names free (lora_r, lora_alpha, lora_dropout, lora_target_modules);
    chipo's parser maps each old name onto its field, and refuses both spellings at once."""
    config = load_config(PreferenceConfig, None, [*BASE, "lora_r=4", "lora_alpha=8", "lora_dropout=0.1",
                                                  "lora_target_modules=q_proj,v_proj"])
    assert (config.lora_rank, config.lora_scaling_alpha, config.lora_dropout_rate, config.lora_modules) == \
        (4, 8, 0.1, "q_proj,v_proj")
    with pytest.raises(ConfigError, match="lora_r and lora_rank are the same key; give one"):
        load_config(PreferenceConfig, None, [*BASE, "lora_r=4", "lora_rank=8"])
