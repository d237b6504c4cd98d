"""Padding-free packing in the log-prob passes outside preference training: ``sequence_logps`` (evaluation),
one ``chipo rl`` step, one ``chipo online`` step and the reference precompute all equal their padded versions.

Packing only moves tokens: each sequence keeps its own positions (position_ids restart at 0) and attends only
to itself, so every per-sequence log-prob, loss and gradient is the padded one up to float round-off (fp32: we
check 1e-5, relative plus absolute).
"""

import copy
import gc

import pytest
import torch
from accelerate import Accelerator

import chipo.sequences as sequences
import chipo.train.online as online
import chipo.train.rl as rl
from chipo.config import load_config
from chipo.data import PreferenceCollator, load_preference_dataset, prepare_preference_dataset
from chipo.rewards import CallableScorer
from chipo.sequences import batch_sequence_logps, pack_batch, packing_supported, response_batch, sequence_logps
from chipo.toy import tiny_model_and_tokenizer
from chipo.train.online_config import OnlineConfig
from chipo.train.reference import compute_reference_logps
from chipo.train.rl_config import RLConfig
from chipo.train.rl_run import _accelerator

TOL = {"atol": 1e-5, "rtol": 1e-5}


def length_reward(prompts, responses):
    """A module:function reward/judge: longer responses score higher (0.1 per character)."""
    return [0.1 * len(r) for r in responses]


def _rows(n, seed=0):
    """n (prompt, response) id lists with lengths 1..~40, so packed rows hold several sequences each."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(5, 300, (1 + (3 * i) % 13,), generator=g).tolist() for i in range(n)]
    responses = [torch.randint(5, 300, (1 + (7 * i) % 29,), generator=g).tolist() for i in range(n)]
    return prompts, responses


class _IgnoresPositions(torch.nn.Module):
    """A causal LM that drops position_ids: packed, it would attend across sequences (packing must refuse it)."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.config = inner, inner.config

    def forward(self, position_ids=None, **kwargs):
        return self.inner(**kwargs)

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()


@pytest.mark.parametrize("impl", ["logits", "fused"])
def test_sequence_logps_packed_equals_padded(impl, monkeypatch):
    """Three batches of 7 (batch_size=7, 20 rows): packed == padded to 1e-5; the packing check runs once."""
    model, tokenizer = tiny_model_and_tokenizer()
    model.eval()
    prompts, responses = _rows(20)
    checks, packed_calls = [], []
    real_check, real_logps = sequences.packing_matches, sequences.batch_sequence_logps

    def check(*args, **kwargs):
        checks.append(1)
        monkeypatch.setattr(sequences, "batch_sequence_logps", real_logps)  # the check's own forwards: not counted
        try:
            return real_check(*args, **kwargs)
        finally:
            monkeypatch.setattr(sequences, "batch_sequence_logps", recording)

    def recording(*args, **kwargs):
        packed_calls.append(kwargs["packed"])
        return real_logps(*args, **kwargs)

    monkeypatch.setattr(sequences, "packing_matches", check)
    monkeypatch.setattr(sequences, "batch_sequence_logps", recording)
    padded = sequence_logps(model, prompts, responses, tokenizer.pad_token_id, batch_size=7, impl=impl, packed=False)
    packed = sequence_logps(model, prompts, responses, tokenizer.pad_token_id, batch_size=7, impl=impl)
    assert packed_calls == [False] * 3 + [True] * 3
    assert len(checks) == 1  # remembered for the model object: later batches and calls do not re-check
    sequence_logps(model, prompts[:3], responses[:3], tokenizer.pad_token_id, impl=impl)
    assert len(checks) == 1
    torch.testing.assert_close(packed, padded, **TOL)
    assert padded.shape == (20,) and (padded < 0).all()


def test_sequence_logps_falls_back_for_models_that_ignore_positions():
    """Rows of 8, 2, 2, 2, 2, 2 tokens pack as [8], [2, 2, 2, 2] (capacity 8, first-fit decreasing): without
    position_ids the 2nd-4th short sequences would see their predecessors and shifted positions. On this random
    model that moves their log-probs by ~0.06-0.15 nats, over packing_matches' 1e-3 x max |log-prob| (~0.012),
    so sequence_logps must warn and score padded rows (== the unwrapped model's padded values)."""
    model, tokenizer = tiny_model_and_tokenizer()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (6, 1, 1, 1, 1, 1)]
    responses = [torch.randint(5, 300, (n,), generator=g).tolist() for n in (2, 1, 1, 1, 1, 1)]
    broken = _IgnoresPositions(model)
    with pytest.warns(UserWarning, match="different log-probs"):
        out = sequence_logps(broken, prompts, responses, tokenizer.pad_token_id)
    torch.testing.assert_close(out, sequence_logps(model, prompts, responses, tokenizer.pad_token_id, packed=False),
                               **TOL)


def test_packing_memo_holds_models_weakly():
    model, tokenizer = tiny_model_and_tokenizer()
    batch = response_batch(*_rows(4), tokenizer.pad_token_id)
    assert packing_supported(model, batch, "logits")
    assert model in sequences._PACKING_SUPPORT
    gc.collect()  # models of earlier tests still waiting for the cycle collector would leave with this one
    before = len(sequences._PACKING_SUPPORT)
    del model
    gc.collect()
    assert len(sequences._PACKING_SUPPORT) == before - 1


# ------------------------------------------------------------------------------------------------ chipo rl


def _capture_grads(trainer, model):
    """Wrap the optimizer's step to record the gradients it is about to apply (after clipping)."""
    grads, step = {}, trainer.optimizer.step

    def recording(*args, **kwargs):
        grads.update({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    trainer.optimizer.step = recording
    return grads


# Prompts of 34, 15, 6, 2 and 1 tokens: with <= 6 response tokens, each micro-batch of 2 prompts x 3 samples that
# holds the long prompt packs several short sequences into one row (capacity = the longest sequence).
LONG = ("the cat sat on the mat and the dog is a good dog this is a long post about the model policy reward "
        "preference chosen rejected prompt response")
TEXTS = [LONG, "a dog sat on the mat and the cat sat on a mat", "how good is this short answer", "the cat", "why",
         LONG]


def _rl_step(model, tokenizer, tmp_path, packing, monkeypatch):
    config = load_config(RLConfig, None, ["policy=x", "reward=x", "prompts=x", f"output_dir={tmp_path}", "k=3",
                                          "prompts_per_step=6", "gradient_accumulation_steps=3", "max_new_tokens=6",
                                          "max_grad_norm=0", "logprobs_impl=fused", f"packing={packing}".lower()])
    prompts = rl.PromptSet(tokenizer, TEXTS, "test", None)
    policy, ref = copy.deepcopy(model), copy.deepcopy(model)
    scorer = CallableScorer(length_reward, "length")
    trainer = rl.RLTrainer(config, _accelerator(config), policy, ref, tokenizer, scorer, prompts, tmp_path,
                           impl="fused")
    layouts = []
    real = rl.batch_sequence_logps

    def recording(model, batch, *args, **kwargs):  # (packed?, rows of the padding-free layout < sequences?)
        layouts.append((kwargs["packed"], len(pack_batch(batch)["input_ids"]) < len(batch["input_ids"])))
        return real(model, batch, *args, **kwargs)

    monkeypatch.setattr(rl, "batch_sequence_logps", recording)
    grads = _capture_grads(trainer, policy)
    record = trainer.train_step(0)
    monkeypatch.setattr(rl, "batch_sequence_logps", real)
    return record, grads, layouts


def test_rl_step_packed_equals_padded(tmp_path, monkeypatch):
    """One RLOO step (6 prompts x 3 samples, 3 micro-batches): the same samples (seeded), so the loss, every
    logged metric and every parameter gradient of the packed step equal the padded step's to 1e-5."""
    model, tokenizer = tiny_model_and_tokenizer()
    padded, grads_padded, layouts_padded = _rl_step(model, tokenizer, tmp_path / "a", False, monkeypatch)
    packed, grads_packed, layouts_packed = _rl_step(model, tokenizer, tmp_path / "b", True, monkeypatch)
    # (ref, policy) x 3 micro-batches; the two holding the long prompt share rows between sequences
    assert [packed for packed, _ in layouts_padded] == [False] * 6
    assert [packed for packed, _ in layouts_packed] == [True] * 6
    assert sum(shared for _, shared in layouts_packed) >= 2
    assert set(packed) == set(padded)
    for key in padded:
        assert packed[key] == pytest.approx(padded[key], rel=1e-5, abs=1e-5), key
    assert set(grads_packed) == set(grads_padded) and len(grads_padded) > 0
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_packed[name], grad, **TOL, msg=name)
    assert any(g.abs().max() > 0 for g in grads_padded.values())


# ------------------------------------------------------------------------------------------------ chipo online


def _online_step(model, tokenizer, tmp_path, packing, monkeypatch, extra=()):
    config = load_config(OnlineConfig, None, ["policy=x", "prompts=x", "judge=test_packing_passes:length_reward",
                                              "prompts_per_step=4", "max_new_tokens=10", "loss=chipo",
                                              "max_grad_norm=0", f"packing={packing}".lower(), *extra])
    texts = ["the cat", "a dog sat on the mat and the cat sat", "why", "how good is this"]
    prompt_ids = [tokenizer(t)["input_ids"] for t in texts]
    policy, ref = copy.deepcopy(model), copy.deepcopy(model)
    trainer = online.OnlineTrainer(config, Accelerator(cpu=True), policy, ref, tokenizer,
                                   online.PreferenceOracle(config), prompt_ids, texts, tmp_path)
    trainer.impl = "fused"
    layouts = []
    real = online.batch_sequence_logps
    monkeypatch.setattr(online, "batch_sequence_logps",
                        lambda *a, **k: layouts.append(k["packed"]) or real(*a, **k))
    grads = _capture_grads(trainer, policy)
    record = trainer.train_step(0)
    monkeypatch.setattr(online, "batch_sequence_logps", real)
    return record, grads, layouts


@pytest.mark.parametrize("extra", [(), ("exploration=xpo", "xpo_alpha=0.1")])
def test_online_step_packed_equals_padded(tmp_path, monkeypatch, extra):
    """One online chiPO step (and XPO, whose bonus reads pi on the pi_ref samples): same samples and labels
    (hash-seeded), so the packed step's metrics and gradients equal the padded step's to 1e-5."""
    model, tokenizer = tiny_model_and_tokenizer()
    padded, grads_padded, layouts_padded = _online_step(model, tokenizer, tmp_path / "a", False, monkeypatch, extra)
    packed, grads_packed, layouts_packed = _online_step(model, tokenizer, tmp_path / "b", True, monkeypatch, extra)
    assert layouts_padded == [False, False] and layouts_packed == [True, True]  # policy, then reference
    for key in padded:
        assert packed[key] == pytest.approx(padded[key], rel=1e-5, abs=1e-5, nan_ok=True), key
    assert len(grads_padded) > 0 and any(g.abs().max() > 0 for g in grads_padded.values())
    for name, grad in grads_padded.items():
        torch.testing.assert_close(grads_packed[name], grad, **TOL, msg=name)


# ------------------------------------------------------------------------------------------------ reference cache


def test_reference_precompute_packed_equals_padded(tiny_dir, monkeypatch):
    """compute_reference_logps: packed rows (default) == padded length buckets (packing=False) to 1e-5, and the
    packed run really packs (every batch after the one check)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import chipo.train.reference as reference

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "model")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    source = str(tiny_dir / "train.jsonl")
    data, _ = prepare_preference_dataset(load_preference_dataset(source), tokenizer, source=source, max_length=128)
    collator = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)
    layouts = []
    monkeypatch.setattr(reference, "batch_sequence_logps",
                        lambda *a, **k: layouts.append(k["packed"]) or batch_sequence_logps(*a, **k))
    padded = compute_reference_logps(model, data, collator, batch_size=8, packing=False, progress=False)
    packed = compute_reference_logps(model, data, collator, batch_size=8, progress=False)
    batches = -(-len(data) // 8)
    assert layouts == [False] * batches + [True] * batches
    for a, b in zip(packed, padded):
        torch.testing.assert_close(a, b, **TOL)


def test_packing_check_treats_matching_nans_as_agreement(recwarn):
    """A NaN in the LM head makes every log-prob NaN in both layouts: that is agreement (the trainers' non-finite
    checks then stop the run), not a 'different log-probs' fallback."""
    model, tokenizer = tiny_model_and_tokenizer()
    with torch.no_grad():
        model.lm_head.weight[0, 0] = float("nan")
    batch = response_batch(*_rows(4), tokenizer.pad_token_id)
    assert sequences.packing_matches(model, batch, "logits")
    assert not [w for w in recwarn if "different log-probs" in str(w.message)]
