"""chipo online's sampler: counter-based noise, Gumbel-max draws from the right distribution, the KV-cached loop
against a full recompute, batch independence, and the geometric mixture's end points."""

import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chipo.losses.online import mixture_logits
from chipo.train.online_sampling import _MASK, _mix, as_int64, sample, splitmix, stream_key, uniforms


def test_tensor_hash_matches_python_splitmix():
    """The int64 tensor finaliser wraps mod 2**64 exactly like the Python one (logical shifts, wrapped products)."""
    rng = random.Random(0)
    xs = [rng.getrandbits(64) for _ in range(200)] + [0, _MASK, 1 << 63]
    ours = _mix(torch.tensor([as_int64(x) for x in xs], dtype=torch.int64)).tolist()
    assert [o & _MASK for o in ours] == [splitmix(x) for x in xs]


def test_uniforms_are_uniform_and_independent_of_batching():
    keys = torch.tensor([as_int64(stream_key(0, 1, i)) for i in range(64)])
    u = uniforms(keys, 3, 1000)
    assert 0 < u.min() and u.max() < 1
    assert u.mean().item() == pytest.approx(0.5, abs=0.01)  # 64000 draws: sd of the mean 0.0011
    assert torch.equal(uniforms(keys[5:6], 3, 1000), u[5:6])
    assert not torch.equal(uniforms(keys, 4, 1000), u)


def test_gumbel_max_draws_follow_softmax():
    """argmax(log q + Gumbel) over 20000 independent keys: frequencies match softmax(log q) within 5 sd."""
    log_q = torch.log_softmax(torch.tensor([1.0, 0.0, -1.0, 2.0, 0.5], dtype=torch.float64), -1)
    keys = torch.tensor([as_int64(stream_key(7, i)) for i in range(20_000)])
    noise = -torch.log(-torch.log(uniforms(keys, 0, 5)))
    counts = torch.bincount(torch.argmax(log_q + noise, -1), minlength=5).double()
    p = log_q.exp()
    sd = torch.sqrt(20_000 * p * (1 - p))
    assert ((counts - 20_000 * p).abs() < 5 * sd).all(), (counts / 20_000, p)


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    tok = AutoTokenizer.from_pretrained(tiny_dir / "model")
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    prompts = [tok(t)["input_ids"] for t in ["the cat sat", "a dog is on the mat", "why"]]
    return tok, policy, ref, prompts


def _reference_loop(policy, ref, prompt, key, m, steps, eos):
    """No cache, no padding: recompute both models on the whole sequence for every token."""
    ids = list(prompt)
    out = []
    for t in range(steps):
        with torch.no_grad():
            lp = policy(torch.tensor([ids])).logits[0, -1]
            lq = ref(torch.tensor([ids])).logits[0, -1]
        log_q = mixture_logits(lp, lq, m).double()
        noise = -torch.log(-torch.log(uniforms(torch.tensor([as_int64(key)]), t, log_q.shape[-1])))[0]
        token = int(torch.argmax(log_q + noise))
        out.append(token)
        ids.append(token)
        if token == eos:
            break
    return out


@pytest.mark.parametrize("m", [0.0, 0.5])
def test_cached_batched_loop_equals_full_recompute(tiny, m):
    tok, policy, ref, prompts = tiny
    keys = [stream_key(0, 0, i) for i in range(len(prompts))]
    rows = sample(policy, ref, prompts, keys, mixture_coef=m, max_new_tokens=6, eos_token_id=tok.eos_token_id,
                  pad_token_id=tok.pad_token_id)
    for prompt, key, (ids, finished) in zip(prompts, keys, rows):
        assert ids == _reference_loop(policy, ref, prompt, key, m, 6, tok.eos_token_id)
        assert finished == (ids[-1] == tok.eos_token_id)
    # one prompt alone draws the same response as in the batch
    alone = sample(policy, ref, prompts[1:2], keys[1:2], mixture_coef=m, max_new_tokens=6,
                   eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert alone[0] == rows[1]


def test_mixture_one_is_the_reference(tiny):
    tok, policy, ref, prompts = tiny
    keys = [stream_key(3, i) for i in range(len(prompts))]
    opts = dict(max_new_tokens=6, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    assert sample(policy, ref, prompts, keys, mixture_coef=1.0, **opts) == sample(ref, None, prompts, keys, **opts)
    assert sample(policy, ref, prompts, keys, mixture_coef=1.0, **opts) != sample(policy, None, prompts, keys, **opts)
