"""Reference log-probs computed once and cached on disk, keyed by what determines them.

pi_ref is frozen, so log pi_ref(y|x) for every training pair is a fixed number. Computing it once before training
removes the reference forward from every step (2N FLOPs per token of the 8N of a DPO step)
and the reference model from memory. The cache key hashes (a) the reference weights, (b) the tokenized pairs and
(c) the settings that change the numbers (log-prob implementation is exact either way, so it is not part of it),
so a sweep over losses, beta, epochs and seeds computes them once, and any change recomputes them. The batch
layout (padded, length buckets or padding-free packed rows, ``compute_reference_logps``) is not part of the key
either: it only moves tokens, so the values agree to float round-off (tested to 1e-5) and entries written with
one layout stay valid for the others.

A cache entry is trusted only after it verifies (dtype, shape, row count, checksum, key); anything else is a miss
and is recomputed, so a damaged cache costs time, never wrong numbers or a crash. The default cache root is
``$CHIPO_CACHE`` (``~/.cache/chipo`` when unset).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from chipo.sequences import batch_sequence_logps, packing_supported

_TOKEN_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
_FORMAT = "chipo-ref-logps-v2"  # bump when the entry layout changes: older entries then miss

logger = logging.getLogger(__name__)


def fingerprint_model(model: nn.Module) -> str:
    """blake2b of every parameter and buffer (name, dtype, shape, bytes): any weight change changes it."""
    h = hashlib.blake2b(digest_size=16)
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint_rows(dataset) -> str:
    """blake2b of the tokenized prompt/chosen/rejected ids, in row order."""
    h = hashlib.blake2b(digest_size=16)
    for column in _TOKEN_COLUMNS:
        for ids in dataset[column]:
            h.update(len(ids).to_bytes(4, "little"))
            h.update(torch.tensor(ids, dtype=torch.int64).numpy().tobytes())
    return h.hexdigest()


def cache_key(model_fp: str, data_fp: str, settings: dict) -> str:
    payload = json.dumps({"model": model_fp, "data": data_fp, **settings}, sort_keys=True)
    return hashlib.blake2b(payload.encode(), digest_size=16).hexdigest()


@torch.no_grad()
def compute_reference_logps(model: nn.Module, dataset, collator, batch_size: int = 8, impl: str = "fused",
                            chunk_tokens: int = 1024, disable_adapter: bool = False,
                            desc: str = "reference log-probs", progress: bool = True, packing: bool = True
                            ) -> tuple[Tensor, Tensor]:
    """(chosen [N], rejected [N]) summed response log-probs of ``model`` for every row, in dataset order.

    ``packing``: batches run as padding-free packed rows when the model reproduces the padded layout
    (``chipo.sequences.packing_supported``, checked on the first batch); otherwise (or ``packing=False``) as up
    to 4 length buckets of right-padded rows. Either way the values agree to float round-off.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    chosen, rejected = [], []
    adapter_off = model.disable_adapter() if disable_adapter else contextlib.nullcontext()
    columns = [c for c in dataset.column_names if c in (*_TOKEN_COLUMNS, "row")]
    with adapter_off:
        for start in tqdm(range(0, len(dataset), batch_size), desc=desc, unit="batch", leave=False,
                          disable=not progress):
            rows = dataset.select_columns(columns)[start:start + batch_size]
            features = [dict(zip(rows, values)) for values in zip(*rows.values())]
            batch = {k: v.to(device) for k, v in collator(features).items()}
            packed = packing and packing_supported(model, batch, impl)
            logps = batch_sequence_logps(model, batch, impl, chunk_tokens, max_buckets=4, packed=packed).float().cpu()
            c, r = logps.chunk(2)
            chosen.append(c)
            rejected.append(r)
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def default_cache_dir() -> Path:
    """``$CHIPO_CACHE/ref_logps``, with ``CHIPO_CACHE`` defaulting to ``~/.cache/chipo``."""
    return Path(os.environ.get("CHIPO_CACHE") or "~/.cache/chipo").expanduser() / "ref_logps"


def resolve_cache_dir(cache_dir: str | os.PathLike | None) -> Path:
    """The cache directory to use: ``cache_dir`` (``~`` expanded) or, when None, ``default_cache_dir()``."""
    return default_cache_dir() if cache_dir is None else Path(cache_dir).expanduser()


def _checksum(chosen: Tensor, rejected: Tensor) -> str:
    h = hashlib.blake2b(digest_size=16)
    for t in (chosen, rejected):
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _entry_metadata(key: str, chosen: Tensor, rejected: Tensor, settings: dict) -> dict[str, str]:
    return {"format": _FORMAT, "key": key, "rows": str(chosen.shape[0]), "dtype": str(chosen.dtype),
            "shape": json.dumps(list(chosen.shape)), "checksum": _checksum(chosen, rejected),
            "settings": json.dumps(settings, sort_keys=True)}


def load_cache_entry(path: Path, key: str, rows: int) -> tuple[Tensor, Tensor] | str:
    """The verified (chosen, rejected) of a cache entry, or why it cannot be used.

    An entry is used only if it loads, names ``key``, and its tensors have the recorded dtype (float32), shape
    ([rows]), row count and blake2b checksum, so a flipped byte, a truncated or foreign file is a miss.
    """
    if not path.is_file():
        return "not a regular file"
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for bad headers and short files
        return f"unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})"
    if set(tensors) != {"chosen", "rejected"}:
        return f"holds tensors {sorted(tensors)}, expected chosen and rejected"
    chosen, rejected = tensors["chosen"], tensors["rejected"]
    for name, t in tensors.items():
        if t.dtype != torch.float32 or tuple(t.shape) != (rows,):
            return f"{name} is {t.dtype} of shape {tuple(t.shape)}, expected torch.float32 of shape ({rows},)"
    expected = _entry_metadata(key, chosen, rejected, {})
    for field in ("format", "key", "rows", "dtype", "shape", "checksum"):
        if meta.get(field) != expected[field]:
            return f"metadata {field!r} is {meta.get(field)!r}, expected {expected[field]!r}"
    return chosen, rejected


def _store(path: Path, chosen: Tensor, rejected: Tensor, metadata: dict[str, str]) -> None:
    """Write the entry to a temporary file and rename it into place (a kill never leaves a half-written entry)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)  # a directory squatting on the entry's name would make os.replace fail forever
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        save_file({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def cached_reference_logps(model: nn.Module, dataset, collator, cache_dir: str | os.PathLike | None, settings: dict,
                           **compute_kwargs) -> tuple[Tensor, Tensor, bool]:
    """Load the cached reference log-probs for (model, dataset, settings) or compute and store them.

    Returns (chosen [N], rejected [N], hit). ``cache_dir`` None means ``default_cache_dir()``. An entry that fails
    to load or verify (see ``load_cache_entry``) is a miss: it is recomputed and rewritten, with one warning. A
    cache directory that cannot be written (read-only, full) leaves training uncached, with one warning.
    """
    key = cache_key(fingerprint_model(model), fingerprint_rows(dataset), settings)
    directory = resolve_cache_dir(cache_dir)
    path = directory / f"{key}.safetensors"
    if os.path.lexists(path):
        found = load_cache_entry(path, key, len(dataset))
        if not isinstance(found, str):
            return found[0], found[1], True
        logger.warning("reference cache entry %s is unusable (%s); recomputing it", path, found)
    chosen, rejected = compute_reference_logps(model, dataset, collator, **compute_kwargs)
    chosen, rejected = chosen.float().contiguous(), rejected.float().contiguous()
    try:
        _store(path, chosen, rejected, _entry_metadata(key, chosen, rejected, settings))
    except OSError as exc:
        logger.warning("cannot write the reference cache in %s (%s); training without caching", directory,
                       exc.strerror or exc)
    return chosen, rejected, False
