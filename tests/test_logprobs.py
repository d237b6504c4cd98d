"""Chunked and fused log-probs equal the naive full log-softmax, values and gradients."""

import pytest
import torch

from chipo.logprobs import logprobs_from_hidden, logprobs_from_logits, sequence_logprobs


def _naive(logits, input_ids, mask):
    lp = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.cat([torch.zeros_like(lp[:, :1]), lp], 1) * mask


def _batch(n=5, t=9, v=37, h=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(v, (n, t), generator=g)
    mask = torch.zeros(n, t, dtype=torch.bool)
    for i in range(n):  # prompt of 1..3 tokens, response of varying length, then padding
        p = 1 + i % 3
        mask[i, p:p + 2 + i] = True
    hidden = torch.randn(n, t, h, generator=g, dtype=torch.float64)
    weight = torch.randn(v, h, generator=g, dtype=torch.float64)
    bias = torch.randn(v, generator=g, dtype=torch.float64)
    return ids, mask, hidden, weight, bias


@pytest.mark.parametrize("chunk_rows", [1, 2, 7])
def test_logits_path_matches_naive(chunk_rows):
    ids, mask, hidden, weight, bias = _batch()
    logits = hidden.float() @ weight.float().T
    got = logprobs_from_logits(logits, ids, mask, chunk_rows=chunk_rows)
    torch.testing.assert_close(got, _naive(logits, ids, mask))
    assert got[~mask].abs().max() == 0


@pytest.mark.parametrize("chunk", [1, 3, 1000])
@pytest.mark.parametrize("with_bias", [False, True])
def test_fused_path_values_and_gradients(chunk, with_bias):
    ids, mask, hidden, weight, bias = _batch()
    b = bias.clone().requires_grad_() if with_bias else None
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    got = logprobs_from_hidden(h1, w1, ids, mask, bias=b, chunk_tokens=chunk)
    coeff = torch.randn(ids.shape[0], dtype=torch.float64)
    (sequence_logprobs(got, mask) * coeff).sum().backward()

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    b2 = bias.clone().requires_grad_() if with_bias else None
    logits = h2 @ w2.T + (b2 if with_bias else 0)
    want = _naive(logits, ids, mask)
    (sequence_logprobs(want, mask) * coeff).sum().backward()
    # fp32 compute inside the fused op: tolerance of fp32 rounding on O(1) values.
    torch.testing.assert_close(got, want.float(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(h1.grad, h2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(w1.grad, w2.grad, atol=1e-5, rtol=1e-5)
    if with_bias:
        torch.testing.assert_close(b.grad, b2.grad, atol=1e-5, rtol=1e-5)


def test_first_position_cannot_be_response():
    ids, mask, *_ = _batch()
    mask[0, 0] = True
    with pytest.raises(ValueError, match="position 0"):
        logprobs_from_logits(torch.zeros(*ids.shape, 37), ids, mask)
