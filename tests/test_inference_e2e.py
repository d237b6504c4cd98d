"""sample_with_mode and load_scorer on a tiny Llama: the lab's entry points for best-of-n vs pessimism curves."""

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import chipo.lab  # noqa: F401  (registers the lab's 'world' scorer)
from chipo.config import ConfigError
from chipo.generation import encode_prompts, generate
from chipo.inference import sample_with_mode, select
from chipo.rewards import load_scorer
from chipo.sequences import batch_sequence_logps, response_batch


def length_reward(prompts, responses):
    return [-len(r) / 10.0 for r in responses]


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(tiny_dir / "model"), AutoTokenizer.from_pretrained(tiny_dir / "model")


@pytest.mark.parametrize("mode", ["plain", "bon", "pessimism"])
def test_sample_with_mode(tiny, mode):
    model, tok = tiny
    reward = load_scorer("test_inference_e2e:length_reward")
    prompts = ["why is the cat short? ", [{"role": "user", "content": "why?"}]]
    sel = sample_with_mode(model, tok, prompts, mode=mode, n=3, reward=reward, beta=0.1, max_new_tokens=5, seed=3)
    m = {"plain": 1, "bon": 3, "pessimism": 7}[mode]
    assert sel.candidate_rewards.shape == (2, m) and len(sel.texts) == 2
    assert np.allclose(sel.proxy_rewards, sel.candidate_rewards[np.arange(2), sel.chosen])
    if mode == "bon":
        assert np.allclose(sel.proxy_rewards, sel.candidate_rewards.max(1))
    if mode == "pessimism":
        assert all(3 <= c <= 6 for c in sel.chosen) and "lambda" in sel.info[0]
    assert sel.prompts[1].startswith("<|user|>")  # conversational prompts are rendered with the chat template
    # same seed, same candidates: a pool sampled once serves every mode (what select() is for)
    again = sample_with_mode(model, tok, prompts, mode=mode, n=3, reward=reward, beta=0.1, max_new_tokens=5, seed=3)
    assert again.texts == sel.texts


def test_generation_logps_are_those_of_the_sampled_tokens(tiny):
    """Sequence log-probs of generated responses, recomputed on the padded batch, match generate's own scores."""
    model, tok = tiny
    ids, _ = encode_prompts(tok, ["the cat", "a dog sat on the mat"])
    gen = generate(model, tok, ids, 2, max_new_tokens=4, seed=0)
    assert gen.prompt_index == [0, 0, 1, 1] and all(1 <= len(r) <= 4 for r in gen.response_ids)
    batch = response_batch([ids[i] for i in gen.prompt_index], gen.response_ids, tok.pad_token_id)
    with torch.no_grad():
        logps = batch_sequence_logps(model, batch, "logits")
        one = batch_sequence_logps(model, response_batch([ids[0]], gen.response_ids[:1], tok.pad_token_id), "logits")
    assert torch.isfinite(logps).all() and (logps < 0).all()
    assert logps[0].item() == pytest.approx(one.item(), abs=1e-4)  # padding does not change a row's log-prob


def test_load_scorer_specs_and_select_pool():
    world = load_scorer("world")  # the lab's gold scorer, reused
    assert world.score(["t0 s0"], ["not a response"]).tolist() == [0.0]
    with pytest.raises(ConfigError):
        load_scorer("no_such_module:fn")
    pool = np.array([[0.0, 1.0, 2.0, 3.0, 4.0]])
    assert select("bon", pool, 5)[0].tolist() == [4] and select("bon", pool, 2)[0].tolist() == [1]
