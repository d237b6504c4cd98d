"""Padding-free packing (chipo.sequences.pack_batch): layout, and packed log-probs/gradients == padded ones."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from chipo.data import PreferenceCollator
from chipo.logprobs import packed_sequence_logprobs
from chipo.sequences import batch_sequence_logps, pack_batch, pack_rows, packing_matches, single_row_attention
from chipo.toy import tiny_model_and_tokenizer


def _batch(tokenizer, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    features = []
    for i in range(n):  # very different lengths, so rows hold several sequences
        prompt = torch.randint(5, 300, (2 + i,), generator=g).tolist()
        chosen = torch.randint(5, 300, (1 + 7 * i,), generator=g).tolist()
        rejected = torch.randint(5, 300, (3 + (5 * i) % 11,), generator=g).tolist()
        features.append({"prompt_input_ids": prompt, "chosen_input_ids": chosen, "rejected_input_ids": rejected,
                         "row": i})
    return PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(features)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=30), st.integers(1, 120))
def test_pack_rows_partitions_within_capacity(lengths, capacity):
    rows = pack_rows(lengths, capacity)
    assert sorted(i for row in rows for i in row) == list(range(len(lengths)))
    for row in rows:  # a row over capacity holds exactly one (too long) sequence
        assert sum(lengths[i] for i in row) <= capacity or len(row) == 1


def test_pack_batch_layout_by_hand():
    """Prompts [7, 8] and [9]; chosen [10] and [11, 12]; rejected [13, 14, 15] and [16].

    Sequence lengths (chosen rows 0-1, rejected rows 2-3): 3, 3, 5, 2. Capacity = the longest, 5; first-fit
    decreasing places 5 -> row 0; 3 -> row 1; 3 -> row 1 (3 + 3 > 5: no) -> row 2; 2 -> row 1 (3 + 2 = 5).
    Rows: [seq 2], [seq 0, seq 3], [seq 1]; width 5; row 2 ends with 2 padding positions numbered 0, 1.
    """
    features = [{"prompt_input_ids": [7, 8], "chosen_input_ids": [10], "rejected_input_ids": [13, 14, 15], "row": 0},
                {"prompt_input_ids": [9], "chosen_input_ids": [11, 12], "rejected_input_ids": [16], "row": 1}]
    batch = PreferenceCollator(pad_token_id=0)(features)
    p = pack_batch(batch)
    assert p["input_ids"].tolist() == [[7, 8, 13, 14, 15], [7, 8, 10, 9, 16], [9, 11, 12, 0, 0]]
    assert p["position_ids"].tolist() == [[0, 1, 2, 3, 4], [0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]
    assert p["sequence"].tolist() == [[2, 2, 2, 2, 2], [0, 0, 0, 3, 3], [1, 1, 1, -1, -1]]
    assert p["response_mask"].int().tolist() == [[0, 0, 1, 1, 1], [0, 0, 1, 0, 1], [0, 1, 1, 0, 0]]
    one = pack_batch(batch, single_row=True)
    assert one["input_ids"].shape == (1, 13) and one["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2,
                                                                                   0, 1]]


def test_packed_sequence_logprobs_by_hand():
    """Two rows; sequence ids [[0, 0, 1, 1], [2, 2, -1, -1]]; response mask picks (0,1), (1,2)... by hand:
    seq 0 = -1.0 (position (0, 1)), seq 1 = -2.0 + -3.0 (positions (0, 2), (0, 3)), seq 2 = -4.0 (position (1, 1));
    the -9.0 at a masked-out position and the padding never count."""
    per_token = torch.tensor([[0.0, -1.0, -2.0, -3.0], [0.0, -4.0, -9.0, -9.0]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 0]], dtype=torch.bool)
    sequence = torch.tensor([[0, 0, 1, 1], [2, 2, -1, -1]])
    assert packed_sequence_logprobs(per_token, mask, sequence, 3).tolist() == [-1.0, -5.0, -4.0]
    with pytest.raises(ValueError, match="belongs to no sequence"):
        packed_sequence_logprobs(per_token, mask | (sequence < 0), sequence, 3)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("impl", ["fused", "logits"])
@pytest.mark.parametrize("pack_tokens", [None, 10**6])
def test_packed_equals_padded_values_and_grads(attn, impl, pack_tokens):
    """fp32: per-sequence log-probs (sums of ~10-100 token log-probs) and every parameter gradient of a random
    linear functional of them agree to 1e-5 (relative, plus 1e-5 absolute): packing only moves tokens."""
    model, tokenizer = tiny_model_and_tokenizer()
    model.config._attn_implementation = attn
    batch = _batch(tokenizer)
    coeff = torch.randn(batch["input_ids"].shape[0], generator=torch.Generator().manual_seed(1))
    padded = batch_sequence_logps(model, batch, impl)
    (padded * coeff).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    packed = batch_sequence_logps(model, batch, impl, packed=True, pack_tokens=pack_tokens)
    (packed * coeff).sum().backward()
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], atol=1e-5, rtol=1e-5, msg=n)


def test_packed_rows_do_not_attend_across_sequences():
    """Changing one sequence's tokens changes no other sequence's log-prob (attention confined per sequence)."""
    model, tokenizer = tiny_model_and_tokenizer()
    batch = _batch(tokenizer)
    with torch.no_grad():
        before = batch_sequence_logps(model, batch, packed=True, pack_tokens=10**6)
        altered = dict(batch, input_ids=batch["input_ids"].clone())
        altered["input_ids"][5, :3] += 1  # prompt tokens of chosen row 5
        after = batch_sequence_logps(model, altered, packed=True, pack_tokens=10**6)
    changed = (after - before).abs() > 1e-6
    assert changed[5] and changed.sum() == 1


def test_flash_attention_packs_one_row():
    model, _ = tiny_model_and_tokenizer()
    assert not single_row_attention(model)
    model.config._attn_implementation = "flash_attention_2"
    assert single_row_attention(model)


class _IgnoresPositions(torch.nn.Module):
    """A causal LM that drops position_ids: it would attend across packed sequences."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, position_ids=None, **kwargs):
        return self.inner(**kwargs)

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()


def test_packing_matches_detects_unsupported_models():
    model, tokenizer = tiny_model_and_tokenizer()
    batch = _batch(tokenizer)
    assert packing_matches(model, batch)
    with pytest.warns(UserWarning, match="different log-probs"):
        assert not packing_matches(_IgnoresPositions(model), batch)


class _AttendsAcrossSequences(_IgnoresPositions):
    """Keeps position_ids but attends causally over the whole packed row (an all-ones mask): the subtle failure,
    positions right, attention leaking into the previous sequences of the row."""

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs)


def test_packing_matches_detects_attention_leaking_across_sequences_even_on_a_random_model():
    """Four sequences of equal length: packed into rows no wider than the longest, each would sit alone in its row
    and a leak could not show, so the check packs its rows into one. On a random tiny model the leak then moves
    sequence log-probs by ~1e-3 relative, which the per-sequence fp32 tolerance still refuses; the faithful
    model passes."""
    model, tokenizer = tiny_model_and_tokenizer()
    g = torch.Generator().manual_seed(3)
    features = [{"prompt_input_ids": torch.randint(5, 300, (3,), generator=g).tolist(),
                 "chosen_input_ids": torch.randint(5, 300, (6,), generator=g).tolist(),
                 "rejected_input_ids": torch.randint(5, 300, (6,), generator=g).tolist(), "row": i} for i in range(4)]
    batch = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)(features)
    assert packing_matches(model, batch)
    with pytest.warns(UserWarning, match="different log-probs"):
        assert not packing_matches(_AttendsAcrossSequences(model), batch)
