"""Every config command reads ``key=value``, ``--key value`` and ``--key=value`` (HfArgumentParser's and TRL's
style), with ``--flag`` / ``--no-flag`` for bools; one parser (``chipo.config.cli_overrides``), tested here on its
own and through the real ``chipo`` entry point."""

import json

import pytest
import yaml

from chipo.cli.main import main
from chipo.config import ConfigError, cli_overrides
from chipo.train.config import PreferenceConfig


@pytest.mark.parametrize("argv,expected", [
    (["--beta", "0.1", "--loss", "chipo", "--output_dir", "x"], ["beta=0.1", "loss=chipo", "output_dir=x"]),
    (["--beta=0.1", "loss=chipo"], ["beta=0.1", "loss=chipo"]),
    (["--max-steps", "3"], ["max_steps=3"]),                           # dashes as argparse allows
    (["--lora", "--beta", "0.1"], ["lora=true", "beta=0.1"]),          # a bool before another key: the bare flag
    (["--lora", "true"], ["lora=true"]),
    (["--lora", "1", "--packing", "OFF"], ["lora=true", "packing=false"]),  # YAML would read a bare 1 as an int
    (["--no-packing", "--no_lora"], ["packing=false", "lora=false"]),
    (["--length_normalize", "--lora_r", "4"], ["length_normalize=true", "lora_r=4"]),  # bool | None; an old name
    (["--beta", "-0.5"], ["beta=-0.5"]),                               # a value may start with "-"
    (["--config", "run.yaml", "beta=0.2", "--config=b.yaml"], ["--config", "run.yaml", "beta=0.2", "--config=b.yaml"]),
    (["-h"], ["-h"]),
    (["--openai.model", "gpt-x"], ["openai.model=gpt-x"]),            # a nested section's key, checked by it
])
def test_cli_overrides_styles(argv, expected):
    assert cli_overrides(argv, PreferenceConfig) == expected


@pytest.mark.parametrize("argv,message", [
    (["--lorra"], "unknown config key 'lorra' .did you mean 'lora'.."),
    (["--beta"], "--beta needs a value"),
])
def test_cli_overrides_errors(argv, message):
    with pytest.raises(ConfigError, match=message):
        cli_overrides(argv, PreferenceConfig)


def test_chipo_train_with_dash_dash_arguments(tiny_dir, tmp_path):
    """A one-step LoRA run given entirely in ``--key value`` style; run_config.yaml records every value, and the
    model was loaded with model_init_kwargs (TRL's key; bfloat16 weights are saved as such)."""
    out = tmp_path / "run"
    code = main(["train", "--model", str(tiny_dir / "model"), "--dataset", str(tiny_dir / "train.jsonl"),
                 "--output_dir", str(out), "--ref_cache_dir", str(tmp_path / "cache"), "--lora", "--lora_r", "4",
                 "--beta", "0.2", "--loss=dpo", "--max-steps", "1", "--per_device_train_batch_size", "8",
                 "--save_strategy", "no", "--disable_tqdm", "--no-packing", "--group_by_length",
                 "--length_column_name", "n_tokens", "--model_init_kwargs", '{"dtype": "bfloat16"}'])
    assert code == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"  # loaded with model_init_kwargs
    saved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert (saved["loss"], saved["beta"], saved["lora"], saved["lora_rank"], saved["max_steps"], saved["packing"]) == \
        ("dpo", 0.2, True, 4, 1, False)
    # remove_unused_columns (on, as in TRL) kept the length column (named by length_column_name) that
    # group_by_length's sampler reads
    assert saved["group_by_length"] is True and saved["remove_unused_columns"] is True
    assert saved["length_column_name"] == "n_tokens"
    assert (out / "adapter" / "adapter_config.json").is_file()


@pytest.mark.parametrize("argv,message", [
    (["train", "--model", "m", "--dataset", "d", "--beta", "-1"], "beta must be positive, got -1.0"),
    (["train", "--lorra"], "unknown config key 'lorra' (did you mean 'lora'?)"),
    (["sft", "--max_length", "1"], "max_length must be at least 2, got 1"),
    (["reward", "--max_length=1"], "max_length must be at least 2, got 1"),
    (["rl", "--policy", "p", "--reward", "r", "--prompts", "q", "--regularizer", "l2"], "regularizer must be one of"),
    (["online", "--policy", "p", "--prompts", "q", "--judge", "j", "--exploration", "ucb"],
     "exploration must be one of"),
    (["bandit", "--experiment", "nope"], "experiment must be one of"),
])
def test_every_config_command_reads_dash_dash_values(argv, message, capsys, tmp_path, monkeypatch):
    """The value after ``--key`` reaches each command's config validation (one line, exit code 2)."""
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and err.startswith("chipo: error:") and len(err.splitlines()) == 1


def test_tldr_stage_reads_dash_dash_values(capsys):
    """``chipo tldr cost``: ``--sft_rows 1000 --sft-epochs=2`` gives the same table as ``sft_rows=1000
    sft_epochs=2``, and differs from the default (the SFT row counts 1,000 rows x 2 epochs)."""
    assert main(["tldr", "cost", "--sft_rows", "1000", "--sft-epochs=2"]) == 0
    dashed = capsys.readouterr().out
    assert main(["tldr", "cost", "sft_rows=1000", "sft_epochs=2"]) == 0
    assert capsys.readouterr().out == dashed and "1,000 rows x 450 tokens x 2 epoch(s)" in dashed
    assert main(["tldr", "cost", "--bogus", "1"]) == 2
    assert "unknown config key 'bogus'" in capsys.readouterr().err


def response_length(prompts, responses):
    """A scorer for ``chipo judge --judge reward-model --model test_cli_args:response_length``."""
    return [float(len(r)) for r in responses]


def test_judge_reads_dash_dash_judge_keys(tmp_path, capsys):
    """``chipo judge``'s own options and its judge's keys side by side: ``--model X`` is the reward-model judge's
    ``model=X``. The longer response wins: a wins 2 of 3 pairs."""
    pairs = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "p", "a": "long answer", "b": "short"}, {"prompt": "q", "a": "x", "b": "yy"},
            {"prompt": "r", "a": "abcd", "b": "abc"}]
    pairs.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "res.json"
    assert main(["judge", "--pairs", str(pairs), "--judge", "reward-model", "--output", str(out),
                 "--model", "test_cli_args:response_length", "--batch-size=2"]) == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["judge"] == "reward-model:test_cli_args:response_length" and res["win_rate_a"] == pytest.approx(2 / 3)
    refused = ["judge", "--pairs", str(pairs), "--judge", "openai", "--output", str(out), "--max_concurency", "2"]
    assert main(refused) == 2
    assert "did you mean 'max_concurrency'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["sft", "reward"])
def test_group_by_length_reads_the_column_length_column_name_names(command, tiny_dir, tmp_path):
    """chipo sft and chipo reward add the length column under length_column_name (a TrainingArguments key they
    honour), which is the column the length-grouped sampler reads: a column named 'length' instead made the
    sampler fail ('Can only automatically infer lengths ...')."""
    data = tiny_dir / "train.jsonl"
    if command == "sft":
        rows = [json.loads(line) for line in data.read_text().splitlines() if line.strip()]
        data = tmp_path / "sft.jsonl"
        data.write_text("".join(json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n" for r in rows))
    out = tmp_path / "run"
    assert main([command, "--model", str(tiny_dir / "model"), "--dataset", str(data), "--output_dir", str(out),
                 "--max_steps", "1", "--per_device_train_batch_size", "4", "--save_strategy", "no",
                 "--disable_tqdm", "--group_by_length", "--length_column_name", "n_tokens"]) == 0
    assert yaml.safe_load((out / "run_config.yaml").read_text())["length_column_name"] == "n_tokens"
