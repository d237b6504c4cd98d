"""Fixtures of the lab tests: a miniature world (3 letters, responses of 2) with an *untrained* tiny Llama as
pi_ref, saved like a real world directory, so the lab's code paths run in seconds without SFT."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chipo.lab.world import Language, WorldSpec, build_tokenizer

TINY_SPEC = WorldSpec(seed=3, n_topics=2, n_styles=2, n_letters=3, response_length=2, branching=2, n_eval_prompts=2,
                      hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)


def save_tiny_world(root: Path, spec: WorldSpec = TINY_SPEC) -> Path:
    """language.json, pi_ref/ (random tiny Llama + word-level tokenizer), prompt files with references."""
    from chipo.toy import build_tiny_llama

    language = Language.generate(spec)
    root.mkdir(parents=True, exist_ok=True)
    (root / "language.json").write_text(json.dumps(language.to_json()))
    tokenizer = build_tokenizer(language)
    model = build_tiny_llama(len(tokenizer), hidden_size=spec.hidden_size, num_layers=spec.num_layers,
                             num_heads=spec.num_heads, intermediate_size=spec.intermediate_size,
                             max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                             bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, seed=0)
    model.save_pretrained(root / "pi_ref")
    tokenizer.save_pretrained(root / "pi_ref")
    import numpy as np

    rng = np.random.Generator(np.random.PCG64(0))
    with (root / "prompts_eval.jsonl").open("w") as f:
        for topic, style in language.all_prompts():
            f.write(json.dumps({"prompt": language.prompt_text(topic, style),
                                "reference": language.sample_responses(topic, style, 1, rng)[0]}) + "\n")
    with (root / "prefs.jsonl").open("w") as f:
        for i, (topic, style) in enumerate(language.all_prompts() * 4):
            a, b = language.sample_responses(topic, style, 2, rng)
            f.write(json.dumps({"prompt": language.prompt_text(topic, style), "chosen": a,
                                "rejected": b if b != a else "c c" if i % 2 else "a"}) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_world(tmp_path_factory) -> Path:
    return save_tiny_world(tmp_path_factory.mktemp("tiny_world"))


@pytest.fixture(scope="session")
def tiny_reward_model(tmp_path_factory, tiny_world) -> Path:
    """A locally built LlamaForSequenceClassification (num_labels=1) saved with its tokenizer: a gold RM by path."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_world / "pi_ref")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=32, max_position_embeddings=64, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForSequenceClassification(config)
    root = tmp_path_factory.mktemp("reward_model")
    model.save_pretrained(root)
    tokenizer.save_pretrained(root)
    return root
