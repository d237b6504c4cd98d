"""Sampling for ``chipo online``: the token-level geometric mixture pi^(1-m) pi_ref^m with a KV cache per model, and
counter-based randomness so that every response has a random stream of its own.

Not ``chipo.generation.generate``: HF ``generate`` samples one model, and its random draws depend on the batch a
row lands in. Here the next token of row i at position t is argmax_v (log q(v) / temperature + g_v) with Gumbel
noise g = -log(-log u), u a 53-bit uniform hashed (splitmix64) from (the row's key, t, v): the Gumbel-max trick
gives an exact draw from softmax(log q / temperature), and the draw does not depend on which other rows share the
batch or the process (``tests/test_online_sampler.py`` checks the distribution, the cache against a full recompute,
and batch independence).
"""

from __future__ import annotations

import torch

from chipo.generation import left_pad
from chipo.losses.online import mixture_logits
from chipo.models import forward_with_cache

__all__ = ["sample", "splitmix", "stream_key", "uniforms"]

# ------------------------------------------------------------------------- counter-based randomness (splitmix64)
_MASK = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_M1, _M2 = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB


def as_int64(c: int) -> int:
    """A 64-bit key (0 <= c < 2**64) as the signed int64 torch stores."""
    return c - (1 << 64) if c >= 1 << 63 else c


def splitmix(x: int) -> int:
    """splitmix64's finaliser on a Python int (mod 2**64): a well-mixed 64-bit hash."""
    z = (x + _GOLDEN) & _MASK
    z = ((z ^ (z >> 30)) * _M1) & _MASK
    z = ((z ^ (z >> 27)) * _M2) & _MASK
    return z ^ (z >> 31)


def stream_key(*parts: int) -> int:
    """A 64-bit key from (seed, step, position, stream, ...): one independent random stream per tuple."""
    key = 0
    for part in parts:
        key = splitmix(key ^ (int(part) & _MASK))
    return key


def _lsr(x: torch.Tensor, k: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (x >> k) & ((1 << (64 - k)) - 1)


def _mix(x: torch.Tensor) -> torch.Tensor:
    """splitmix64's finaliser on int64 tensors (two's-complement wrap-around = arithmetic mod 2**64)."""
    x = x + as_int64(_GOLDEN)
    x = (x ^ _lsr(x, 30)) * as_int64(_M1)
    x = (x ^ _lsr(x, 27)) * as_int64(_M2)
    return x ^ _lsr(x, 31)


def uniforms(keys: torch.Tensor, counter: int, size: int) -> torch.Tensor:
    """U(0, 1) float64 [len(keys), size]: entry (i, v) is a hash of (keys[i], counter, v), 53 random bits."""
    base = _mix(keys.to(torch.int64) ^ as_int64(splitmix(counter)))
    cols = torch.arange(size, device=keys.device, dtype=torch.int64) * as_int64(_GOLDEN)
    bits = _lsr(_mix(base[:, None] ^ cols[None, :]), 11)
    return (bits.to(torch.float64) + 0.5) * 2.0**-53


# ------------------------------------------------------------------------------------------------- sampling


def _forward(model, ids, attention, positions, cache):
    out, cache = forward_with_cache(model, cache, input_ids=ids, attention_mask=attention, position_ids=positions,
                                    logits_to_keep=1)
    return out.logits[:, -1].float(), cache


@torch.no_grad()
def sample(policy, ref, prompt_ids: list[list[int]], keys: list[int], *, mixture_coef: float = 0.0,
           max_new_tokens: int, temperature: float = 1.0, eos_token_id: int, pad_token_id: int
           ) -> list[tuple[list[int], bool]]:
    """One response per prompt from pi^(1-m) pi_ref^m per token (m = ``mixture_coef``; 0: pi alone, ``ref`` unused).

    Ancestral sampling with a KV cache per model: the next token of row i at position t is
    argmax_v (log q(v) / temperature + g), g Gumbel noise from ``uniforms(keys[i], t, V)`` (Gumbel-max: an exact
    draw from softmax(log q / temperature)). Returns (token ids, finished) per row, EOS included when finished.
    """
    models = [policy] + ([ref] if mixture_coef > 0 else [])
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    device = next(policy.parameters()).device
    try:
        ids, attention = (t.to(device) for t in left_pad(prompt_ids, pad_token_id))
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        key_t = torch.tensor([as_int64(k) for k in keys], dtype=torch.int64, device=device)
        caches = [None] * len(models)
        out = torch.full((len(prompt_ids), max_new_tokens), pad_token_id, dtype=torch.long, device=device)
        # The attention mask grows one column per step: views of one preallocated mask, not a copy per step.
        width = attention.shape[1]
        attention = torch.cat([attention, attention.new_ones((len(prompt_ids), max_new_tokens))], 1)
        done = torch.zeros(len(prompt_ids), dtype=torch.bool, device=device)
        steps = 0
        for t in range(max_new_tokens):
            logits = []
            for j, model in enumerate(models):
                step_logits, caches[j] = _forward(model, ids, attention[:, :width + t], positions, caches[j])
                logits.append(step_logits)
            log_q = mixture_logits(logits[0], logits[-1], mixture_coef) / temperature
            noise = -torch.log(-torch.log(uniforms(key_t, t, log_q.shape[-1])))
            token = torch.argmax(log_q.double() + noise, -1)
            token = torch.where(done, torch.full_like(token, pad_token_id), token)
            out[:, t] = token
            steps = t + 1
            done = done | (token == eos_token_id)
            if bool(done.all()):
                break
            ids, positions = token[:, None], positions[:, -1:] + 1
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    rows = []
    for row in out[:, :steps].tolist():
        finished = eos_token_id in row
        rows.append((row[:row.index(eos_token_id) + 1] if finished else row, finished))
    return rows
