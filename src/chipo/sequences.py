"""Per-sequence response log-probs log pi(y|x) of a (possibly wrapped) causal LM: the one model-level path.

Every command computes sequence log-probs here: the trainers on collated batches (``batch_sequence_logps``), the
RL and online trainers, the lab and the recipes on token-id lists (``sequence_logps``). Batches follow the layout of
``chipo.data.collator.right_pad``: prompt + response from column 0, right padding, a boolean response mask.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from chipo.data.collator import pack_rows, right_pad
from chipo.logprobs import logprobs_from_hidden, logprobs_from_logits, packed_sequence_logprobs, sequence_logprobs

LOGPROB_IMPLS = ("auto", "fused", "logits")
"""Ways to compute sequence log-probs (``batch_sequence_logps``); 'auto' picks per model (``choose_logprobs_impl``)."""


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


def single_row_attention(model: nn.Module) -> bool:
    # Transformers' flash-attention path finds packed sequences from position_ids only when the batch is ONE row
    # (``_is_packed_sequence``: batch_size == 1); with several rows it would attend across sequences. The mask-based
    # implementations (sdpa, eager, flex_attention) confine attention per sequence in any number of rows.
    config = getattr(_unwrap(model), "config", None)
    return "flash" in str(getattr(config, "_attn_implementation", "") or "")


def pack_batch(batch: dict[str, Tensor], max_tokens: int | None = None, single_row: bool = False
               ) -> dict[str, Tensor]:
    """Padding-free layout of a right-padded ``batch``: its sequences side by side in a few rows.

    Returns ``input_ids``, ``position_ids``, ``response_mask`` and ``sequence`` [R, L]: each sequence's tokens
    lie contiguously with ``position_ids`` 0, 1, ..., its length - 1, and ``sequence`` holds the index of its
    row in ``batch`` (-1 on the padding that ends a row short of L). Rows hold at most ``max_tokens`` tokens
    (default: the longest sequence, so the packed rows never hold more positions than the padded batch, and
    attention, quadratic in the row width, never costs more); ``single_row``: all sequences in one row.
    Padding at a row's end gets positions 0, 1, ... of its own, so it is a separate (ignored) sequence to
    transformers' packed-sequence detection (``masking_utils.find_packed_sequence_indices``).
    """
    lengths = batch["attention_mask"].sum(-1).tolist()
    capacity = sum(lengths) if single_row else max(max_tokens or 0, max(lengths))
    rows = pack_rows(lengths, capacity)
    fill = [sum(lengths[i] for i in row) for row in rows]
    width = max(fill)
    device = batch["input_ids"].device
    # Token-level index arrays in one go (numpy), not a tensor per sequence: sequences in placement order, each
    # sequence's tokens at its row's running offset.
    order = np.fromiter((i for row in rows for i in row), dtype=np.int64, count=len(lengths))
    seq_lengths = np.asarray(lengths, dtype=np.int64)[order]
    seq_row = np.repeat(np.arange(len(rows)), [len(row) for row in rows])
    seq_start = np.cumsum(seq_lengths) - seq_lengths  # where each sequence starts in the flat token list
    row_start = np.cumsum(np.asarray(fill)) - np.asarray(fill)  # where each row starts in the flat token list
    token_col = np.arange(int(seq_lengths.sum())) - np.repeat(seq_start, seq_lengths)  # position in its sequence
    offset = np.repeat(seq_start - row_start[seq_row], seq_lengths)  # sequence's offset within its row
    # Flat (linear) indices, index_select / index_copy: 0.7 ms for 64 sequences where 2-D index_put and tensor[idx]
    # took 35 ms on CPU (per training step, in the data path of every packed forward).
    padded_width = batch["input_ids"].shape[1]
    src_sequence = np.repeat(order, seq_lengths)
    src = torch.from_numpy(src_sequence * padded_width + token_col).to(device)
    dst = torch.from_numpy(np.repeat(seq_row, seq_lengths) * width + token_col + offset).to(device)
    shape = (len(rows), width)

    def scatter(base: Tensor, values: Tensor) -> Tensor:
        return base.reshape(-1).index_copy(0, dst, values).view(shape)

    # Padding first: positions restart at each row's fill, counting 0, 1, ... to the row's end.
    position_ids = (torch.arange(width, device=device)[None] - torch.tensor(fill, device=device)[:, None]).clamp(0)
    position_ids = scatter(position_ids, torch.from_numpy(token_col).to(device))
    # Any token id will do on the padding: it is a sequence of its own whose outputs nothing reads.
    input_ids = scatter(torch.zeros(shape, dtype=torch.long, device=device),
                        batch["input_ids"].reshape(-1).index_select(0, src))
    response_mask = scatter(torch.zeros(shape, dtype=torch.bool, device=device),
                            batch["response_mask"].reshape(-1).index_select(0, src))
    sequence = scatter(torch.full(shape, -1, dtype=torch.long, device=device),
                       torch.from_numpy(src_sequence).to(device))
    return {"input_ids": input_ids, "position_ids": position_ids, "response_mask": response_mask,
            "sequence": sequence}


def _packed_logps(model: nn.Module, batch: dict[str, Tensor], impl: str, chunk_tokens: int,
                  max_tokens: int | None) -> Tensor:
    packed = pack_batch(batch, max_tokens, single_row=single_row_attention(model))
    ids, mask = packed["input_ids"], packed["response_mask"]
    # attention_mask=None and no cache: transformers then derives the per-sequence (block-diagonal causal) mask
    # from the restarting position_ids; RoPE sees each sequence's own positions, as in the padded layout.
    kwargs = {"input_ids": ids, "position_ids": packed["position_ids"], "attention_mask": None, "use_cache": False}
    if impl == "fused":
        out = model(**kwargs, output_hidden_states=True, logits_to_keep=1)
        head = _unwrap(model).get_output_embeddings()
        per_token = logprobs_from_hidden(out.hidden_states[-1], head.weight, ids, mask,
                                         bias=getattr(head, "bias", None), chunk_tokens=chunk_tokens)
    else:
        per_token = logprobs_from_logits(model(**kwargs).logits, ids, mask)
    return packed_sequence_logprobs(per_token, mask, packed["sequence"], batch["input_ids"].shape[0])


def batch_sequence_logps(model: nn.Module, batch: dict[str, Tensor], impl: str = "fused",
                         chunk_tokens: int = 1024, max_buckets: int = 1, packed: bool = False,
                         pack_tokens: int | None = None) -> Tensor:
    """Summed response log-probs [2B] for ``batch`` (chosen rows first, then rejected; see the collator).

    ``fused`` calls the (wrapped) model -- so DDP/accelerate hooks run -- asking for hidden states and a single
    logit column, then applies the LM head only at response positions (``chipo.logprobs.logprobs_from_hidden``).
    ``logits`` materialises the model's logits and takes a chunked fp32 log-softmax.

    ``packed``: one forward over the padding-free layout of ``pack_batch`` (rows of up to ``pack_tokens``
    tokens; one row under flash attention, whose variable-length kernel then runs). Needs a model that takes
    ``position_ids`` and builds its attention mask from them (transformers' Llama-style models with sdpa, eager,
    flex or flash attention); ``packing_matches`` checks a model. One forward, so valid under DDP too.

    ``max_buckets > 1`` (when not packed) runs the rows in up to that many length groups (``length_buckets``),
    each trimmed to its longest row, so short rows stop paying for the batch's longest (in preference data
    typically over half of a padded batch is padding). Rows are right-padded and attention is causal, so trimming
    trailing padding changes no real token's output: the results equal the single forward up to float round-off.
    Only for unwrapped models: DDP/FSDP expect exactly one forward per backward.
    """
    if packed:
        return _packed_logps(model, batch, impl, chunk_tokens, pack_tokens)
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


def layouts_agree(model: nn.Module, padded: Callable[[], Tensor], packed: Callable[[], Tensor], differ: str,
                  errors: tuple[type[Exception], ...] = (TypeError, ValueError, RuntimeError)) -> bool:
    """Whether ``packed()`` reproduces ``padded()`` (per-sequence values [N] of the same sequences, e.g. log-probs,
    rewards, losses) for ``model``: the one check behind every trainer's packing (log-probs, SFT, reward models).

    Both run once, under no_grad, in eval mode (dropout off) and in the weights' own precision (autocast off): in
    fp32 they agree to float round-off. A failure warns once (``differ`` says what differs, e.g. "different
    log-probs") and returns False, as does one of ``errors`` raised by a model that cannot take packed rows.
    """
    parameter = next(model.parameters(), None)
    device_type = parameter.device.type if parameter is not None else "cpu"
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.autocast(device_type=device_type, enabled=False):
            plain, together = padded(), packed()
    except errors as e:
        warnings.warn(f"packed sequences unavailable for this model ({e}); using padded rows", stacklevel=3)
        return False
    finally:
        model.train(was_training)
    # Per sequence: |packed - padded| <= tol x (1 + |value|). fp32 round-off over a sequence is ~1e-7 relative
    # per token (measured: 1.5e-4 on log-prob sums of -100 to -1000), while attending across sequences moves a
    # trained model's log-probs by tens of percent and even a random tiny model's by ~1e-3 (tests/test_packing.py);
    # half or bf16 weights round each logit to ~3 digits, hence the looser bound there.
    full_precision = parameter is None or parameter.dtype in (torch.float32, torch.float64)
    tol = 1e-4 if full_precision else 1e-2
    # NaN in the same rows of both layouts (e.g. non-finite weights) is agreement: the trainer's own non-finite
    # check then stops the run, instead of a misleading fallback here.
    if not torch.allclose(together, plain, rtol=tol, atol=tol, equal_nan=True):
        warnings.warn(f"packed sequences give {differ} for this model (its attention does not follow "
                      "position_ids); using padded rows", stacklevel=3)
        return False
    return True


def packing_matches(model: nn.Module, batch: dict[str, Tensor], impl: str = "fused", rows: int = 4) -> bool:
    """Whether the packed layout reproduces the padded one on the first ``rows`` rows of ``batch``
    (``layouts_agree``). An architecture that ignores ``position_ids`` when masking (it would attend across packed
    sequences) or that does not take them fails this.
    """
    small = {k: batch[k][:rows] for k in ("input_ids", "attention_mask", "response_mask")}
    # All rows in ONE packed row: with rows no wider than the longest sequence, sequences of similar lengths would
    # each get a row of their own and a model that attends across sequences would pass unnoticed.
    one_row = int(small["attention_mask"].sum())
    return layouts_agree(model, lambda: batch_sequence_logps(model, small, impl),
                         lambda: batch_sequence_logps(model, small, impl, packed=True, pack_tokens=one_row),
                         "different log-probs")


_PACKING_SUPPORT: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""Model object -> {(impl, attention implementation): packing_matches result}; weak keys, so models still free."""


def packing_supported(model: nn.Module, batch: dict[str, Tensor], impl: str = "fused") -> bool:
    """``packing_matches`` for the (unwrapped) ``model`` on ``batch``, run once per model object and remembered.

    Whether packing reproduces the padded layout is a property of the architecture and its attention
    implementation, not of the weights, so one check per (model object, ``impl``, attention implementation)
    serves every later batch, training step and evaluation. The memo holds the model weakly (no leak).
    """
    base = _unwrap(model)
    attention = str(getattr(getattr(base, "config", None), "_attn_implementation", "") or "")
    known = _PACKING_SUPPORT.setdefault(base, {})
    if (impl, attention) not in known:
        known[(impl, attention)] = packing_matches(base, batch, impl)
    return known[(impl, attention)]


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


def response_batch(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]], pad_token_id: int
                   ) -> dict[str, Tensor]:
    """``input_ids`` / ``attention_mask`` / ``response_mask`` [N, T] of (prompt, response) token-id rows."""
    input_ids, attention_mask, response_mask = right_pad(prompt_ids, response_ids, pad_token_id)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}


def sequence_logps(model: nn.Module, prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                   pad_token_id: int, *, batch_size: int = 512, impl: str = "logits", chunk_tokens: int = 1024,
                   grad: bool = False, packed: bool = True) -> Tensor:
    """log pi(response | prompt) [N] (fp32, on the model's device) summed over the given response token ids.

    Rows are scored ``batch_size`` at a time. ``packed`` (default): each batch runs as padding-free packed rows
    (``pack_batch``) when the model supports them -- ``packing_supported`` checks that once per model object on
    the first batch, else padded rows are used, with one warning; the numbers equal the padded layout's up to
    float round-off. ``packed=False``: right-padded rows, each batch trimmed to its longest row. With
    ``grad=False`` (the default) no graph is kept; the caller decides the model's mode (evaluation code puts it
    in eval mode so dropout is off: log-probs of a policy are those of the deterministic network).
    """
    device = next(model.parameters()).device
    out = []
    with torch.set_grad_enabled(grad):
        for start in range(0, len(prompt_ids), batch_size):
            batch = response_batch(prompt_ids[start:start + batch_size], response_ids[start:start + batch_size],
                                   pad_token_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            pack = packed and packing_supported(model, batch, impl)
            out.append(batch_sequence_logps(model, batch, impl, chunk_tokens, packed=pack).float())
    return torch.cat(out) if out else torch.zeros(0, device=device)
