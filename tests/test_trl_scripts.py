"""TRL's own way of running DPO works with chipo's classes: ``TrlParser((ScriptArguments, PreferenceConfig,
ModelConfig))`` with ``--key value`` arguments, a model given by name, ``peft_config`` / ``quantization_config`` from
TRL's helpers, and TRL's shipped ``trl/scripts/dpo.py`` with its two imports swapped; on a tiny local model."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import trl
import yaml
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

from chipo.config import ConfigError
from chipo.io import read_jsonl
from chipo.train import PreferenceConfig, PreferenceTrainer

SCRIPT = '''
import json, sys
from datasets import load_dataset
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from chipo.train import PreferenceConfig, PreferenceTrainer  # was: from trl import DPOConfig, DPOTrainer

parser = TrlParser((ScriptArguments, PreferenceConfig, ModelConfig))
script_args, training_args, model_args = parser.parse_args_and_config()
dataset = load_dataset(script_args.dataset_name)
trainer = PreferenceTrainer(model=model_args.model_name_or_path, args=training_args,
                            train_dataset=dataset[script_args.dataset_train_split],
                            peft_config=get_peft_config(model_args),
                            quantization_config=get_quantization_config(model_args))
trainer.train()
trainer.save_model(training_args.output_dir)
print(json.dumps({"loss": training_args.loss, "beta": training_args.beta, "peft": hasattr(trainer.model, "peft_config"),
                  "history": [h for h in trainer.state.log_history if "rewards/margins" in h]}))
'''


def _data_dir(tiny_dir, tmp_path) -> Path:
    """A dataset directory as `load_dataset(dir)` reads it: train.jsonl and test.jsonl become two splits."""
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "test"):
        (data / f"{split}.jsonl").write_bytes((tiny_dir / f"{split}.jsonl").read_bytes())
    return data


def _run(script: Path, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def _common_args(tiny_dir, tmp_path) -> list[str]:
    return ["--model_name_or_path", str(tiny_dir / "model"), "--dataset_name", str(_data_dir(tiny_dir, tmp_path)),
            "--output_dir", str(tmp_path / "out"), "--ref_cache_dir", str(tmp_path / "cache"),
            "--per_device_train_batch_size", "8", "--max_steps", "3", "--learning_rate", "2e-3",
            "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
            "--max_length", "64"]


def test_trl_style_script_trains_with_chipo_classes(tiny_dir, tmp_path):
    """``--loss chipo --beta 0.2`` reach the trainer; LoRA through TRL's ``--use_peft`` (ModelConfig) trains
    adapters; three steps are logged and the saved adapter loads."""
    script = tmp_path / "dpo_chipo.py"
    script.write_text(SCRIPT)
    argv = [*_common_args(tiny_dir, tmp_path), "--loss", "chipo", "--beta", "0.2", "--use_peft", "--lora_r", "4",
            "--lora_target_modules", "q_proj", "v_proj"]
    done = _run(script, argv, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["loss"], result["beta"], result["peft"]) == ("chipo", 0.2, True)
    steps = [h["step"] for h in result["history"]]
    assert steps == [1, 2, 3]
    assert result["history"][0]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at start
    assert json.loads((tmp_path / "out" / "adapter_config.json").read_text())["r"] == 4


def test_trl_dpo_script_with_two_imports_swapped(tiny_dir, tmp_path):
    """TRL's shipped ``trl/scripts/dpo.py``, unchanged except ``DPOConfig`` -> ``PreferenceConfig`` and
    ``DPOTrainer`` -> ``PreferenceTrainer``, run with TRL's documented ``--key value`` arguments."""
    source = (Path(trl.__file__).parent / "scripts" / "dpo.py").read_text()
    swaps = {"from trl import DPOTrainer, ":
             "from chipo.train import PreferenceTrainer as DPOTrainer\n    from trl import ",
             "from trl import DatasetMixtureConfig, DPOConfig, ":
             "from chipo.train import PreferenceConfig as DPOConfig\n    from trl import DatasetMixtureConfig, "}
    for old, new in swaps.items():
        assert source.count(old) == 1, f"TRL's dpo.py changed: {old!r} not found once"
        source = source.replace(old, new)
    script = tmp_path / "dpo.py"
    script.write_text(source)
    # --no_remove_unused_columns as in TRL's documented command (HfArgumentParser offers --no_X only for bools that
    # default to true; PreferenceConfig's does, as DPOConfig's).
    argv = [*_common_args(tiny_dir, tmp_path), "--loss", "dpo", "--beta", "0.1", "--no_remove_unused_columns"]
    done = _run(script, argv, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "out"
    trained = AutoModelForCausalLM.from_pretrained(out).state_dict()
    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "model").state_dict()
    assert any((trained[k] - base[k]).abs().max() > 0 for k in base)  # it trained
    assert "Training completed" in done.stdout and "Model saved" in done.stdout  # TRL's own messages
    logged = [line for line in done.stdout.splitlines() if "rewards/margins" in line]
    assert len(logged) == 3, done.stdout[-2000:]  # logging_steps=1, max_steps=3


def test_quantization_config_goes_to_from_pretrained_or_is_refused(tiny_dir, tmp_path):
    """TRL's ``quantization_config=``: with a model name it is passed to ``from_pretrained`` (here without
    bitsandbytes, whose absence from_pretrained then reports in one line); with a loaded model it is refused."""
    args = PreferenceConfig(output_dir=str(tmp_path / "out"), ref_cache_dir=str(tmp_path / "cache"), max_length=64)
    rows = read_jsonl(tiny_dir / "train.jsonl")
    quant = BitsAndBytesConfig(load_in_4bit=True)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="cannot load model .*bitsandbytes"):
            PreferenceTrainer(model=str(tiny_dir / "model"), args=args, train_dataset=rows, quantization_config=quant)
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    with pytest.raises(ConfigError, match="quantization_config applies when the model is given by name"):
        PreferenceTrainer(model=model, args=args, train_dataset=rows, quantization_config=quant)
    bad = PreferenceConfig(output_dir=str(tmp_path / "out"), model_init_kwargs={"dtype": "float17"})
    with pytest.raises(ConfigError, match="dtype must be 'auto' or a torch dtype name, got 'float17'"):
        PreferenceTrainer(model=str(tiny_dir / "model"), args=bad, train_dataset=rows)


def test_model_init_kwargs_reach_from_pretrained(tiny_dir, tmp_path):
    """A model given by name is loaded with ``model_init_kwargs`` (as TRL's DPOConfig.model_init_kwargs): here
    dtype bfloat16, read from the JSON string the command line gives."""
    args = PreferenceConfig(output_dir=str(tmp_path / "out"), ref_cache_dir=str(tmp_path / "cache"), max_length=64,
                            model_init_kwargs='{"dtype": "bfloat16"}', max_steps=1)
    assert args.model_init_kwargs == {"dtype": "bfloat16"}
    trainer = PreferenceTrainer(model=str(tiny_dir / "model"), args=args,
                                train_dataset=read_jsonl(tiny_dir / "train.jsonl"))
    import torch

    assert next(trainer.model.parameters()).dtype == torch.bfloat16


def test_chipo_train_in_trl_key_value_style_through_the_console_script(tiny_dir, tmp_path):
    """The installed ``chipo`` command (the console script, in its own process) in TRL's ``--key value`` style, as
    the README's ``chipo train --beta 0.1 --loss chipo ...``; with values other than the defaults (beta 0.1 and
    loss chipo are PreferenceConfig's), so run_config.yaml shows that the arguments were read, not defaulted."""
    chipo = shutil.which("chipo", path=str(Path(sys.executable).parent)) or shutil.which("chipo")
    assert chipo, "the chipo console script is not installed"
    out = tmp_path / "out"
    argv = ["train", "--beta", "0.25", "--loss", "dpo", "--model", str(tiny_dir / "model"), "--dataset",
            str(tiny_dir / "train.jsonl"), "--output_dir", str(out), "--ref_cache_dir", str(tmp_path / "cache"),
            "--max_steps", "2", "--per_device_train_batch_size", "8", "--logging_steps", "1", "--save_strategy",
            "no", "--disable_tqdm", "--max_length", "64", "--learning_rate", "1e-3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([chipo, *argv], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    saved = yaml.safe_load((out / "run_config.yaml").read_text())
    assert (saved["loss"], saved["beta"], saved["max_steps"]) == ("dpo", 0.25, 2)
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r and "grad_norm" in r] == [1, 2]
    assert (out / "model.safetensors").is_file()
