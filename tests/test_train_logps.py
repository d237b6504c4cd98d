"""Sequence log-probs of a real (tiny) Llama: fused == logits path; length buckets == one padded forward."""

import pytest
import torch

from chipo.data import PreferenceCollator
from chipo.sequences import batch_sequence_logps, length_buckets
from chipo.toy import tiny_model_and_tokenizer


def _batch(tokenizer, n=6):
    g = torch.Generator().manual_seed(0)
    features = []
    for i in range(n):  # very different lengths, so buckets matter
        prompt = torch.randint(5, 300, (2 + i,), generator=g).tolist()
        chosen = torch.randint(5, 300, (1 + 7 * i,), generator=g).tolist()
        rejected = torch.randint(5, 300, (3 + (5 * i) % 11,), generator=g).tolist()
        features.append({"prompt_input_ids": prompt, "chosen_input_ids": chosen, "rejected_input_ids": rejected,
                         "row": i})
    return PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(features)


def test_length_buckets_partition_and_choice():
    lengths = [5, 100, 6, 98, 7, 99, 5, 97]
    groups = length_buckets(lengths, 4)
    assert sorted(i for g in groups for i in g) == list(range(8))
    assert len(groups) == 2 and {lengths[i] for i in groups[0]} == {5, 6, 7}
    assert length_buckets([50] * 8, 4) == [list(range(8))]  # nothing to gain: one forward
    assert length_buckets(lengths, 1) == [sorted(range(8), key=lengths.__getitem__)]


@pytest.mark.parametrize("impl", ["fused", "logits"])
def test_buckets_equal_single_forward_values_and_grads(impl):
    model, tokenizer = tiny_model_and_tokenizer()
    batch = _batch(tokenizer)
    one = batch_sequence_logps(model, batch, impl, max_buckets=1)
    one.sum().backward()
    grads_one = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    many = batch_sequence_logps(model, batch, impl, max_buckets=4)
    many.sum().backward()
    torch.testing.assert_close(many, one, atol=1e-4, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads_one[n], atol=1e-4, rtol=1e-4)


def test_fused_equals_logits_path():
    model, tokenizer = tiny_model_and_tokenizer()
    batch = _batch(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(batch_sequence_logps(model, batch, "fused"),
                                   batch_sequence_logps(model, batch, "logits"), atol=1e-4, rtol=1e-5)
