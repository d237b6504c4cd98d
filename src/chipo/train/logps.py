"""Per-sequence response log-probs of a (possibly wrapped) causal LM on a collated preference batch."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from chipo.logprobs import logprobs_from_hidden, logprobs_from_logits, sequence_logprobs


def _unwrap(model: nn.Module) -> nn.Module:
    while hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / accelerate wrappers
        model = model.module
    return model


def length_buckets(lengths: list[int], max_buckets: int, overhead: float = 0.05) -> list[list[int]]:
    """Split rows into <= ``max_buckets`` groups of similar length, to run one forward per group.

    Rows are sorted by length and cut into k groups of equal count, k = 1..max_buckets; the k minimising the
    padded area sum_g |g| * max_len(g), plus ``overhead`` x (the unbucketed area) per extra forward pass (kernel
    launches, Python), wins. Returns the row indices of each group (k = 1: one group of all rows).
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    full_area = len(lengths) * max(lengths, default=0)
    best, best_cost = [order], float(full_area)
    for k in range(2, max_buckets + 1):
        groups = [g for g in (order[i * len(order) // k:(i + 1) * len(order) // k] for i in range(k)) if g]
        cost = sum(len(g) * lengths[g[-1]] for g in groups) + overhead * full_area * (len(groups) - 1)
        if cost < best_cost:
            best, best_cost = groups, cost
    return best


def batch_sequence_logps(model: nn.Module, batch: dict[str, Tensor], impl: str = "fused",
                         chunk_tokens: int = 1024, max_buckets: int = 1) -> Tensor:
    """Summed response log-probs [2B] for ``batch`` (chosen rows first, then rejected; see the collator).

    ``fused`` calls the (wrapped) model -- so DDP/accelerate hooks run -- asking for hidden states and a single
    logit column, then applies the LM head only at response positions (``chipo.logprobs.logprobs_from_hidden``).
    ``logits`` materialises the model's logits and takes a chunked fp32 log-softmax.

    ``max_buckets > 1`` runs the rows in up to that many length groups (``length_buckets``), each trimmed to its
    longest row, so short rows stop paying for the batch's longest (in preference data typically over half of a
    padded batch is padding). Rows are right-padded and attention is causal, so trimming trailing padding changes
    no real token's output: the results equal the single forward up to float round-off. Only for unwrapped models:
    DDP/FSDP expect exactly one forward per backward.
    """
    if max_buckets > 1 and _unwrap(model) is model:
        lengths = batch["attention_mask"].sum(-1).tolist()
        groups = length_buckets(lengths, max_buckets)
        if len(groups) > 1:
            device = batch["input_ids"].device
            parts = []
            for group in groups:
                rows = torch.tensor(group, device=device)
                width = max(lengths[i] for i in group)
                sub = {k: batch[k][rows, :width] for k in ("input_ids", "attention_mask", "response_mask")}
                parts.append(batch_sequence_logps(model, sub, impl, chunk_tokens))
            permutation = torch.tensor([i for group in groups for i in group], device=device)
            return torch.cat(parts)[torch.argsort(permutation)]
    ids, attn, mask = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
    if impl == "fused":
        out = model(input_ids=ids, attention_mask=attn, output_hidden_states=True, logits_to_keep=1, use_cache=False)
        head = _unwrap(model).get_output_embeddings()
        per_token = logprobs_from_hidden(out.hidden_states[-1], head.weight, ids, mask,
                                         bias=getattr(head, "bias", None), chunk_tokens=chunk_tokens)
    else:
        logits = model(input_ids=ids, attention_mask=attn, use_cache=False).logits
        per_token = logprobs_from_logits(logits, ids, mask)
    return sequence_logprobs(per_token, mask)


def choose_logprobs_impl(model: nn.Module, batch: dict[str, Tensor], requested: str = "auto") -> str:
    """Pick the fused path when it reproduces the model's own logits on ``batch``, else ``logits``.

    The fused path assumes logits = lm_head(last hidden state) with a plain linear head; architectures that
    scale or soft-cap logits (e.g. Gemma 2) break that, so 'auto' checks it once, under no_grad.
    """
    if requested != "auto":
        return requested
    head = _unwrap(model).get_output_embeddings()
    if not isinstance(head, nn.Linear):
        return "logits"
    small = {k: v[:2] for k, v in batch.items() if isinstance(v, Tensor) and v.dim() == 2}
    with torch.no_grad():
        try:
            fused = batch_sequence_logps(model, small, "fused")
        except (TypeError, AttributeError, ValueError) as e:  # model lacks logits_to_keep / hidden states
            warnings.warn(f"fused log-probs unavailable ({e}); using the logits path", stacklevel=2)
            return "logits"
        plain = batch_sequence_logps(model, small, "logits")
    if not torch.allclose(fused, plain, rtol=1e-3, atol=1e-3 * max(1.0, plain.abs().max().item())):
        warnings.warn("fused log-probs disagree with the model's logits; using the logits path", stacklevel=2)
        return "logits"
    return "fused"
