"""The monitor's default alarm on the embedded world: it fires on a run built to overoptimize (DPO at beta 0.005,
a high constant learning rate: the lab's runs lose gold within two epochs this way) and stays quiet on a run that
barely moves from pi_ref (the same run at a learning rate 1000 times smaller). Deterministic: fixed data seeds,
fixed training seed, the monitor's fixed sampling seed."""

from __future__ import annotations

import json

import pytest

from chipo.monitor import DEFAULT_RULES


@pytest.fixture(scope="module")
def world_data(tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chipo.data.prompts import load_prompts
    from chipo.generation import SamplingSettings
    from chipo.io import write_jsonl
    from chipo.lab.generate import generate_preferences
    from chipo.lab.world import load_or_build_world

    world = load_or_build_world(quiet=True)
    tokenizer = AutoTokenizer.from_pretrained(world.pi_ref)
    ref = AutoModelForCausalLM.from_pretrained(world.pi_ref).eval()
    gold = world.scorer()
    root = tmp_path_factory.mktemp("monitor_world")
    for name, path, pairs, seed in (("train", world.train_prompts_path, 4, 1000),
                                    ("heldout", world.eval_prompts_path, 4, 999)):
        rows, _ = generate_preferences(ref, tokenizer, load_prompts(path, text_only=True).prompts, gold,
                                       pairs_per_prompt=pairs, scale=5.0, progress=False,
                                       settings=SamplingSettings(max_new_tokens=8, seed=seed))
        write_jsonl(root / f"{name}.jsonl", rows)
    return world, root


def _train(world, root, out, learning_rate):
    from chipo.config import build_config
    from chipo.train.config import PreferenceConfig
    from chipo.train.run import run_training

    config = build_config(PreferenceConfig, dict(
        model=world.pi_ref, dataset=str(root / "train.jsonl"), eval_dataset=str(root / "heldout.jsonl"),
        eval_split="train", output_dir=str(out), ref_cache_dir=str(root / "cache"), loss="dpo", beta=0.005,
        learning_rate=learning_rate, lr_scheduler_type="constant", per_device_train_batch_size=32, max_steps=30,
        eval_strategy="steps", eval_steps=6, save_strategy="no", logging_steps=6, drop_ties=True, seed=0,
        max_length=32, monitor="warn", monitor_max_new_tokens=8, report_to="none", disable_tqdm=True))
    return json.loads((run_training(config) / "monitor.json").read_text())


def test_default_alarm_fires_when_overoptimizing_and_not_otherwise(world_data, tmp_path):
    world, root = world_data
    loud = _train(world, root, tmp_path / "loud", 3e-3)
    assert loud["alarm"] is not None, loud
    assert any(rule.signal in loud["alarm"]["reason"] for rule in DEFAULT_RULES)
    quiet = _train(world, root, tmp_path / "quiet", 3e-6)
    assert quiet["alarm"] is None, quiet
    assert quiet["evaluations"] == 5
