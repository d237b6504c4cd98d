"""Per-token and per-sequence response log-probs without a full B x T x V fp32 log-softmax.

Two exact implementations of log pi(y_t | x, y_<t) for the response tokens of a batch:

* ``logprobs_from_logits``: given the model's logits [N, T, V] (any dtype), computes the log-softmax in
  row chunks, each upcast to fp32, so the fp32 working set is ``chunk_rows x T x V`` instead of ``N x T x V``.
* ``logprobs_from_hidden``: given the final hidden states [N, T, H] and the LM head weight [V, H], computes
  logits only for response positions and only ``chunk_tokens`` at a time, inside a custom autograd function
  that recomputes each chunk in backward (the "fused linear cross-entropy" trick of Liger / Cut Cross-Entropy).
  No logits tensor for the batch is ever stored: memory is O(chunk_tokens x V) instead of O(N x T x V), which
  is what dominates memory at large vocabularies (Liger kernel's motivation).

Convention (shapes in brackets): ``input_ids`` [N, T]; ``response_mask`` [N, T] is True where the token at that
position is a response token whose probability counts. Token t is predicted by the output at t - 1, so the
first position can never be a response token (it has no context).
"""

from __future__ import annotations

import torch
from torch import Tensor


def _shifted(input_ids: Tensor, response_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Targets and mask aligned with outputs at positions 0..T-2 (output t predicts token t + 1)."""
    if response_mask[:, 0].any():
        raise ValueError("response_mask marks position 0, which has no context to predict it")
    return input_ids[:, 1:], response_mask[:, 1:]


def logprobs_from_logits(logits: Tensor, input_ids: Tensor, response_mask: Tensor, chunk_rows: int = 4) -> Tensor:
    """Per-token response log-probs [N, T] (fp32; 0 outside the response) from logits [N, T, V].

    log p(token) = logit[token] - logsumexp(logits), evaluated for ``chunk_rows`` rows at a time in fp32.
    """
    targets, mask = _shifted(input_ids, response_mask)
    pieces = []
    for start in range(0, logits.shape[0], chunk_rows):
        chunk = logits[start:start + chunk_rows, :-1].float()
        tgt = targets[start:start + chunk_rows]
        token_logit = chunk.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        pieces.append(token_logit - torch.logsumexp(chunk, dim=-1))
    per_token = torch.cat(pieces, dim=0) * mask
    # Place log p(token at t) at position t, matching response_mask (position 0 is never a response token).
    return torch.cat([torch.zeros_like(per_token[:, :1]), per_token], dim=1)


class _LinearLogProbs(torch.autograd.Function):
    """log softmax(h W^T + b)[target] for rows of h, chunked over rows, recomputed in backward.

    Forward per chunk: z = h W^T (+ b) in fp32, lp = z[target] - logsumexp(z). Only h, W, targets and the
    logsumexp per row are saved. Backward per chunk: d lp / d z = onehot(target) - softmax(z), so with
    upstream g: dz = g * (onehot - softmax), dh = dz W, dW += dz^T h, db += sum dz.
    """

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, chunk: int) -> Tensor:
        n = hidden.shape[0]
        logp = torch.empty(n, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(n, dtype=torch.float32, device=hidden.device)
        w32 = weight.float()
        b32 = bias.float() if bias is not None else None
        for s in range(0, n, chunk):
            z = hidden[s:s + chunk].float() @ w32.T
            if b32 is not None:
                z = z + b32
            lse[s:s + chunk] = torch.logsumexp(z, dim=-1)
            logp[s:s + chunk] = z.gather(-1, targets[s:s + chunk].unsqueeze(-1)).squeeze(-1) - lse[s:s + chunk]
        ctx.save_for_backward(hidden, weight, bias if bias is not None else torch.empty(0), targets, lse)
        ctx.has_bias = bias is not None
        ctx.chunk = chunk
        return logp

    @staticmethod
    def backward(ctx, grad_logp: Tensor):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        chunk = ctx.chunk
        w32 = weight.float()
        b32 = bias.float() if ctx.has_bias else None
        grad_hidden = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_weight = torch.zeros_like(w32) if ctx.needs_input_grad[1] else None
        grad_bias = torch.zeros_like(b32) if ctx.has_bias and ctx.needs_input_grad[2] else None
        for s in range(0, hidden.shape[0], chunk):
            h = hidden[s:s + chunk].float()
            z = h @ w32.T
            if b32 is not None:
                z = z + b32
            g = grad_logp[s:s + chunk].float().unsqueeze(-1)
            dz = -torch.exp(z - lse[s:s + chunk].unsqueeze(-1)) * g  # -softmax * g
            dz.scatter_add_(-1, targets[s:s + chunk].unsqueeze(-1), g)  # + onehot * g
            if grad_hidden is not None:
                grad_hidden[s:s + chunk] = (dz @ w32).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight.addmm_(dz.T, h)
            if grad_bias is not None:
                grad_bias += dz.sum(0)
        if grad_weight is not None:
            grad_weight = grad_weight.to(weight.dtype)
        if grad_bias is not None:
            grad_bias = grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None


def logprobs_from_hidden(
    hidden: Tensor,
    weight: Tensor,
    input_ids: Tensor,
    response_mask: Tensor,
    bias: Tensor | None = None,
    chunk_tokens: int = 1024,
) -> Tensor:
    """Per-token response log-probs [N, T] (fp32; 0 outside the response) from final hidden states [N, T, H].

    Logits are computed only at the positions that predict response tokens, ``chunk_tokens`` at a time,
    with gradients for ``hidden``, ``weight`` and ``bias`` (see ``_LinearLogProbs``).
    """
    targets, mask = _shifted(input_ids, response_mask)
    rows, cols = mask.nonzero(as_tuple=True)  # output positions (rows, cols) predict tokens at (rows, cols + 1)
    token_logp = _LinearLogProbs.apply(hidden[rows, cols], weight, bias, targets[rows, cols], chunk_tokens)
    out = torch.zeros(input_ids.shape, dtype=torch.float32, device=hidden.device)
    return out.index_put((rows, cols + 1), token_logp)


def sequence_logprobs(per_token: Tensor, response_mask: Tensor) -> Tensor:
    """Sum over response tokens [N] (the whole-sequence log pi(y|x) of the preference losses)."""
    return (per_token * response_mask).sum(-1)


def packed_sequence_logprobs(per_token: Tensor, response_mask: Tensor, sequence: Tensor, num_sequences: int
                             ) -> Tensor:
    """Per-sequence sums [num_sequences] of per-token log-probs [R, L] of packed rows.

    In a packed row several sequences lie side by side; ``sequence`` [R, L] names the sequence (0 ..
    num_sequences - 1) each position belongs to (-1 on padding). Both per-token paths above work unchanged on
    packed rows: output t predicts token t + 1, which crosses into the next sequence only at a sequence's first
    token, and that is a prompt token, never in ``response_mask``. So the sums are those of the padded layout.
    """
    keep = response_mask.bool()
    if (sequence[keep] < 0).any():
        raise ValueError("response_mask marks a packed position that belongs to no sequence")
    out = torch.zeros(num_sequences, dtype=per_token.dtype, device=per_token.device)
    return out.index_add(0, sequence[keep], per_token[keep])
