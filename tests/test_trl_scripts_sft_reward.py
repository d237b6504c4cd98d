"""TRL's way of running SFT and reward modelling works with chipo's classes, as ``tests/test_trl_scripts.py`` shows
for DPO: ``TrlParser((ScriptArguments, SFTConfig, ModelConfig))`` with ``--key value`` arguments, a model given by
name, ``peft_config`` / ``quantization_config`` from TRL's helpers, TRL's shipped ``trl/scripts/sft.py`` and
``reward.py`` with their two imports swapped, and the trainers' TRL keywords in process; on a tiny local model."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import trl
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    BitsAndBytesConfig,
    TrainingArguments,
)

from chipo.config import ConfigError
from chipo.io import read_jsonl, write_jsonl
from chipo.train import RewardConfig, RewardTrainer, SFTConfig, SFTTrainer
from chipo.train.reward import run_reward_training

SCRIPT = '''
import json, sys
from datasets import load_dataset
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from chipo.train import {config}, {trainer}  # was: from trl import {config}, {trainer}

parser = TrlParser((ScriptArguments, {config}, ModelConfig))
script_args, training_args, model_args = parser.parse_args_and_config()
dataset = load_dataset(script_args.dataset_name)
trainer = {trainer}(model=model_args.model_name_or_path, args=training_args,
                    train_dataset=dataset[script_args.dataset_train_split],
                    peft_config=get_peft_config(model_args), quantization_config=get_quantization_config(model_args))
trainer.train()
trainer.save_model(training_args.output_dir)
print(json.dumps({{"args": type(training_args).__name__, "max_length": training_args.max_length,
                  "peft": hasattr(trainer.model, "peft_config"), "history": trainer.state.log_history}}))
'''

WORDS = "cat dog model policy reward summary post answer".split()


def _sft_rows(n: int) -> list[dict]:
    """prompt/completion rows (TRL's standard SFT format) in the toy tokenizer's words."""
    return [{"prompt": f"the {WORDS[i % 8]} sat on the mat. TL;DR:", "completion": f" {WORDS[i % 8]} sat."}
            for i in range(n)]


def _data_dir(root: Path, train: list[dict], test: list[dict]) -> Path:
    """A dataset directory as `load_dataset(dir)` reads it: train.jsonl and test.jsonl become two splits."""
    root.mkdir()
    write_jsonl(root / "train.jsonl", train)
    write_jsonl(root / "test.jsonl", test)
    return root


def _sft_data(tmp_path) -> Path:
    return _data_dir(tmp_path / "sft-data", _sft_rows(16), _sft_rows(4))


def _pref_data(tiny_dir, tmp_path) -> Path:
    return _data_dir(tmp_path / "pref-data", read_jsonl(tiny_dir / "train.jsonl"), read_jsonl(tiny_dir / "test.jsonl"))


def _run(script: Path, argv: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(script), *argv], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600)


def _common_args(tiny_dir, data: Path, out: Path) -> list[str]:
    return ["--model_name_or_path", str(tiny_dir / "model"), "--dataset_name", str(data), "--output_dir", str(out),
            "--per_device_train_batch_size", "8", "--max_steps", "3", "--learning_rate", "5e-3",
            "--logging_steps", "1", "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
            "--max_length", "64"]


def _lora_b_norm(out: Path) -> float:
    """Sum of |B| over the saved LoRA B matrices: peft initialises B to zero, so > 0 means the adapters trained."""
    weights = load_file(out / "adapter_model.safetensors")
    return sum(float(w.abs().sum()) for k, w in weights.items() if "lora_B" in k)


def test_trl_style_sft_script_trains_lora_by_model_name(tiny_dir, tmp_path):
    """TrlParser((ScriptArguments, SFTConfig, ModelConfig)): ``--max_length 64`` reaches chipo's SFTConfig, the model
    is given by name, ``--use_peft`` gives TRL's LoraConfig; three steps are logged and the adapters moved."""
    script = tmp_path / "sft_chipo.py"
    script.write_text(SCRIPT.format(config="SFTConfig", trainer="SFTTrainer"))
    out = tmp_path / "out"
    argv = [*_common_args(tiny_dir, _sft_data(tmp_path), out), "--use_peft", "--lora_r", "4",
            "--lora_target_modules", "q_proj", "v_proj"]
    done = _run(script, argv, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["args"], result["max_length"], result["peft"]) == ("SFTConfig", 64, True)
    assert [h["step"] for h in result["history"] if "loss" in h] == [1, 2, 3]
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert _lora_b_norm(out) > 0


def test_trl_style_reward_script_trains_lora_and_score_head(tiny_dir, tmp_path):
    """The same with RewardConfig / RewardTrainer and ``--lora_task_type SEQ_CLS`` (TRL's advice for reward models:
    peft then also trains and saves the fresh score head); the Bradley-Terry metrics are logged at each step."""
    script = tmp_path / "reward_chipo.py"
    script.write_text(SCRIPT.format(config="RewardConfig", trainer="RewardTrainer"))
    out = tmp_path / "out"
    argv = [*_common_args(tiny_dir, _pref_data(tiny_dir, tmp_path), out), "--use_peft", "--lora_r", "4",
            "--lora_target_modules", "q_proj", "v_proj", "--lora_task_type", "SEQ_CLS"]
    done = _run(script, argv, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert (result["args"], result["peft"]) == ("RewardConfig", True)
    logged = [h for h in result["history"] if "rewards/accuracies" in h]
    assert [h["step"] for h in logged] == [1, 2, 3]
    assert all(0 <= h["rewards/accuracies"] <= 1 for h in logged)
    assert _lora_b_norm(out) > 0
    assert any("score" in k for k in load_file(out / "adapter_model.safetensors"))  # the head is saved with it


def _swap_imports(name: str, swaps: dict[str, str], tmp_path) -> Path:
    source = (Path(trl.__file__).parent / "scripts" / name).read_text()
    for old, new in swaps.items():
        assert source.count(old) == 1, f"TRL's {name} changed: {old!r} not found once"
        source = source.replace(old, new)
    script = tmp_path / name
    script.write_text(source)
    return script


def _changed(out: Path, base: dict) -> bool:
    trained = load_file(out / "model.safetensors")
    return any((trained[k] - base[k]).abs().max() > 0 for k in base if k in trained)


def test_trl_sft_script_with_two_imports_swapped(tiny_dir, tmp_path):
    """TRL's shipped ``trl/scripts/sft.py``, unchanged except ``SFTConfig`` and ``SFTTrainer`` imported from
    chipo, with TRL's documented ``--key value`` arguments: it trains (weights move) and prints TRL's messages."""
    script = _swap_imports("sft.py", {
        "from trl import SFTTrainer, ": "from chipo.train import SFTTrainer\n    from trl import ",
        "from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, SFTConfig, TrlParser":
            "from chipo.train import SFTConfig\n    from trl import DatasetMixtureConfig, ModelConfig, "
            "ScriptArguments, TrlParser"}, tmp_path)
    out = tmp_path / "out"
    done = _run(script, _common_args(tiny_dir, _sft_data(tmp_path), out), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "model").state_dict()
    assert _changed(out, base)
    assert "Training completed" in done.stdout and "Model saved" in done.stdout  # TRL's own messages
    assert AutoTokenizer.from_pretrained(out).pad_token_id is not None  # the model's own tokenizer, saved with it


def test_trl_reward_script_with_two_imports_swapped(tiny_dir, tmp_path):
    """TRL's shipped ``trl/scripts/reward.py`` with ``RewardConfig`` / ``RewardTrainer`` from chipo: a one-output
    sequence classifier is saved, with the tokenizer's pad id in its config (HF pools the score there)."""
    script = _swap_imports("reward.py", {
        "from trl import RewardTrainer, ": "from chipo.train import RewardTrainer\n    from trl import ",
        "from trl import DatasetMixtureConfig, ModelConfig, RewardConfig, ScriptArguments, TrlParser":
            "from chipo.train import RewardConfig\n    from trl import DatasetMixtureConfig, ModelConfig, "
            "ScriptArguments, TrlParser"}, tmp_path)
    out = tmp_path / "out"
    done = _run(script, _common_args(tiny_dir, _pref_data(tiny_dir, tmp_path), out), tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Training completed" in done.stdout and "Model saved" in done.stdout
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1
    assert model.config.pad_token_id == AutoTokenizer.from_pretrained(tiny_dir / "model").pad_token_id
    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "model").model.state_dict()
    assert _changed(out, {f"model.{k}": v for k, v in base.items()})  # the backbone trained, not only the head


def _args(tmp_path, cls=SFTConfig, **overrides):
    return cls(output_dir=str(tmp_path / "out"), max_length=64, per_device_train_batch_size=8, max_steps=2,
               learning_rate=5e-3, logging_steps=1, save_strategy="no", disable_tqdm=True, **overrides)


@pytest.mark.parametrize("trainer_cls", [SFTTrainer, RewardTrainer], ids=["sft", "reward"])
def test_quantization_config_goes_to_from_pretrained_or_is_refused(trainer_cls, tiny_dir, tmp_path):
    """TRL's ``quantization_config=``: with a model name it is passed to ``from_pretrained`` (here without
    bitsandbytes, whose absence from_pretrained reports in one line); with a loaded model it is refused in one line
    (TRL's DPOTrainer refuses too; its SFTTrainer and RewardTrainer warn and ignore it); set both as an argument and
    in model_init_kwargs it is refused as in TRL."""
    quant = BitsAndBytesConfig(load_in_4bit=True)
    cls = SFTConfig if trainer_cls is SFTTrainer else RewardConfig
    rows = _sft_rows(8) if trainer_cls is SFTTrainer else read_jsonl(tiny_dir / "train.jsonl")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="cannot load model .*bitsandbytes"):
            trainer_cls(model=str(tiny_dir / "model"), args=_args(tmp_path, cls), train_dataset=rows,
                        quantization_config=quant)
    loaded = (AutoModelForCausalLM if trainer_cls is SFTTrainer else AutoModelForSequenceClassification
              ).from_pretrained(tiny_dir / "model", num_labels=1)
    with pytest.raises(ConfigError, match="quantization_config applies when the model is given by name") as error:
        trainer_cls(model=loaded, args=_args(tmp_path, cls), train_dataset=rows, quantization_config=quant)
    assert "\n" not in str(error.value)
    both = _args(tmp_path, cls, model_init_kwargs={"quantization_config": {"load_in_4bit": True}})
    with pytest.raises(ConfigError, match="set both as a trainer argument and in model_init_kwargs"):
        trainer_cls(model=str(tiny_dir / "model"), args=both, train_dataset=rows, quantization_config=quant)


def test_sft_trainer_takes_trl_keywords(tiny_dir, tmp_path):
    """SFTTrainer(model=<name>, args=<plain TrainingArguments>, train_dataset=<list of rows>): the arguments become
    an SFTConfig with their values, the processing class is the model's own tokenizer, ``model_init_kwargs`` reach
    from_pretrained (dtype by name, as TRL), raw prompt/completion and messages rows are tokenized, and it trains;
    TRL's formatting_func, which chipo does not apply, is refused in one line instead of failing inside Trainer."""
    args = TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=2,
                             learning_rate=5e-3, logging_steps=1, save_strategy="no", report_to="none",
                             disable_tqdm=True, use_cpu=True)
    messages = [{"messages": [{"role": "user", "content": r["prompt"]}, {"role": "assistant",
                                                                         "content": r["completion"]}]}
                for r in _sft_rows(4)]
    trainer = SFTTrainer(model=str(tiny_dir / "model"), args=args, train_dataset=_sft_rows(16), eval_dataset=messages)
    assert isinstance(trainer.args, SFTConfig) and trainer.args.learning_rate == 5e-3 and trainer.args.packing
    assert trainer.processing_class.name_or_path == str(tiny_dir / "model")
    assert trainer.train_dataset.num_rows == 16 and "completion_input_ids" in trainer.eval_dataset.column_names
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    assert [h["step"] for h in trainer.state.log_history if "loss" in h] == [1, 2]
    assert trainer.evaluate()["eval_loss"] < before
    bf16 = SFTTrainer(model=str(tiny_dir / "model"), args=_args(tmp_path, model_init_kwargs={"dtype": "bfloat16"}),
                      train_dataset=_sft_rows(8))
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    with pytest.raises(ConfigError, match="^formatting_func is not supported: give rows with prompt and completion"):
        SFTTrainer(model=str(tiny_dir / "model"), args=args, train_dataset=_sft_rows(8), formatting_func=str)
    assert SFTConfig.from_args(None, str(tiny_dir / "model"), "SFT").output_dir == "model-SFT"  # TRL's default name


def test_reward_trainer_by_name_is_the_chipo_reward_run(tiny_dir, tmp_path):
    """One setup for the CLI path and the Python path: ``chipo reward``'s run (``run_reward_training``) and
    ``RewardTrainer(model=<name>, train_dataset=<raw rows>)`` with the same config load the same model (the fresh
    score head drawn under the seed), tokenize the same rows and train to the same weights (bit for bit: same
    seed, same batches, one thread)."""
    data = tmp_path / "train.jsonl"
    write_jsonl(data, read_jsonl(tiny_dir / "train.jsonl"))
    config = _args(tmp_path, RewardConfig, model=str(tiny_dir / "model"), dataset=str(data), seed=3)
    run_reward_training(config)
    cli = load_file(tmp_path / "out" / "model.safetensors")
    python = RewardTrainer(model=str(tiny_dir / "model"), args=_args(tmp_path / "py", RewardConfig, seed=3),
                           train_dataset=read_jsonl(data))
    python.train()
    state = python.model.state_dict()
    assert python.model.config.pad_token_id == python.processing_class.pad_token_id
    assert set(cli) == set(state)
    for k in cli:
        torch.testing.assert_close(cli[k], state[k], atol=0, rtol=0, msg=k)


def test_reward_trainer_refuses_a_loaded_model_with_several_outputs(tiny_dir, tmp_path):
    """A reward model has one output: a loaded classifier with two is refused in one line (TRL refuses it too)."""
    two = AutoModelForSequenceClassification.from_pretrained(tiny_dir / "model", num_labels=2)
    with pytest.raises(ConfigError, match="model has 2 outputs; a reward model has exactly one"):
        RewardTrainer(model=two, args=_args(tmp_path, RewardConfig), train_dataset=read_jsonl(tiny_dir / "train.jsonl"))


@pytest.mark.parametrize("trainer_cls", [SFTTrainer, RewardTrainer], ids=["sft", "reward"])
def test_peft_adapters_are_drawn_under_the_seed(trainer_cls, tiny_dir, tmp_path):
    """LoRA's A matrices start random: drawn under ``args.seed`` (TRL seeds before it creates the PEFT model), two
    trainers with one seed start from the same adapters although the global generator moved in between, and
    another seed starts from other adapters."""
    from peft import LoraConfig

    cls = SFTConfig if trainer_cls is SFTTrainer else RewardConfig
    rows = _sft_rows(8) if trainer_cls is SFTTrainer else read_jsonl(tiny_dir / "train.jsonl")

    def adapters(seed: int) -> dict:
        lora = LoraConfig(r=4, target_modules=["q_proj"], task_type="CAUSAL_LM" if cls is SFTConfig else "SEQ_CLS")
        trainer = trainer_cls(model=str(tiny_dir / "model"), args=_args(tmp_path, cls, seed=seed), train_dataset=rows,
                              peft_config=lora)
        return {k: v.clone() for k, v in trainer.model.state_dict().items() if "lora_A" in k}

    first, again, other = adapters(5), adapters(5), adapters(6)
    assert first and set(first) == set(again) == set(other)
    assert all(torch.equal(first[k], again[k]) for k in first)
    assert not any(torch.equal(first[k], other[k]) for k in first)


def test_a_plain_training_arguments_key_the_trainer_would_ignore_is_refused(tiny_dir, tmp_path):
    """A plain TrainingArguments becomes a RewardConfig, whose checks run: ``label_smoothing_factor`` (Trainer's label
    smoother, which the Bradley-Terry loss replaces) would be ignored, so it is refused in one line naming it."""
    args = TrainingArguments(output_dir=str(tmp_path / "out"), label_smoothing_factor=0.1, report_to="none")
    with pytest.raises(ConfigError, match=r"^label_smoothing_factor=0.1: chipo reward does not support") as error:
        RewardTrainer(model=str(tiny_dir / "model"), args=args, train_dataset=read_jsonl(tiny_dir / "train.jsonl"))
    assert "\n" not in str(error.value)
