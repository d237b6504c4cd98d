"""Reference log-prob cache: computed once, hit on reuse, invalidated by any change of weights, data or settings."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from chipo.data import PreferenceCollator, load_preference_dataset, prepare_preference_dataset
from chipo.train.config import PreferenceConfig
from chipo.train.reference import cached_reference_logps, compute_reference_logps, default_cache_dir


def _setup(tiny_dir, max_length=128):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "model")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    source = str(tiny_dir / "train.jsonl")
    data, _ = prepare_preference_dataset(load_preference_dataset(source), tokenizer, source=source,
                                         max_length=max_length)
    return model, data, PreferenceCollator(pad_token_id=tokenizer.pad_token_id)


def test_cache_hit_and_invalidation(tiny_dir, tmp_path):
    model, data, collator = _setup(tiny_dir)
    settings = {"max_length": 128}
    c1, r1, hit1 = cached_reference_logps(model, data, collator, tmp_path, settings, batch_size=5)
    c2, r2, hit2 = cached_reference_logps(model, data, collator, tmp_path, settings, batch_size=8)
    assert (hit1, hit2) == (False, True)
    torch.testing.assert_close(c1, c2)
    assert len(list(tmp_path.glob("*.safetensors"))) == 1 and not list(tmp_path.glob("*.tmp"))
    # batch size does not change the numbers: padding is masked out
    c3, _ = compute_reference_logps(model, data, collator, batch_size=1)
    torch.testing.assert_close(c1, c3, atol=1e-4, rtol=1e-5)

    _, _, hit_settings = cached_reference_logps(model, data, collator, tmp_path, {"max_length": 64}, batch_size=8)
    _, _, hit_data = cached_reference_logps(model, data.select(range(10)), collator, tmp_path, settings)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1.0
    _, _, hit_weights = cached_reference_logps(model, data, collator, tmp_path, settings, batch_size=8)
    assert (hit_settings, hit_data, hit_weights) == (False, False, False)
    assert len(list(tmp_path.glob("*.safetensors"))) == 4


def test_reference_logps_equal_per_row_sums(tiny_dir):
    """Row i's chosen log-prob equals a direct full-softmax sum over its response tokens."""
    model, data, collator = _setup(tiny_dir)
    chosen, rejected = compute_reference_logps(model, data.select(range(3)), collator, batch_size=3)
    row = data[1]
    ids = torch.tensor([row["prompt_input_ids"] + row["chosen_input_ids"]])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    start = len(row["prompt_input_ids"])
    want = sum(logp[t - 1, ids[0, t]].item() for t in range(start, ids.shape[1]))
    assert chosen[1].item() == pytest.approx(want, abs=1e-4)


def test_default_cache_dir_honours_chipo_cache(tiny_dir, tmp_path, monkeypatch):
    """ref_cache_dir=null means $CHIPO_CACHE/ref_logps, CHIPO_CACHE defaulting to ~/.cache/chipo."""
    assert PreferenceConfig(model="m", dataset="d").ref_cache_dir is None
    monkeypatch.delenv("CHIPO_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_cache_dir() == tmp_path / "home" / ".cache" / "chipo" / "ref_logps"
    monkeypatch.setenv("CHIPO_CACHE", str(tmp_path / "shared"))
    assert default_cache_dir() == tmp_path / "shared" / "ref_logps"
    model, data, collator = _setup(tiny_dir)
    data = data.select(range(3))
    _, _, hit = cached_reference_logps(model, data, collator, None, {"max_length": 128}, progress=False)
    assert not hit and len(list((tmp_path / "shared" / "ref_logps").glob("*.safetensors"))) == 1
    assert cached_reference_logps(model, data, collator, None, {"max_length": 128}, progress=False)[2]
    assert not (tmp_path / "home").exists()
