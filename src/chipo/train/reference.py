"""Reference log-probs computed once and cached on disk, keyed by what determines them.

pi_ref is frozen, so log pi_ref(y|x) for every training pair is a fixed number. Computing it once before training
removes the reference forward from every step (2N FLOPs per token of the 8N of a DPO step, field notes section 3)
and the reference model from memory. The cache key hashes (a) the reference weights, (b) the tokenized pairs and
(c) the settings that change the numbers (log-prob implementation is exact either way, so it is not part of it),
so a sweep over losses, beta, epochs and seeds computes them once, and any change recomputes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from chipo.sequences import batch_sequence_logps

_TOKEN_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")


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
                            desc: str = "reference log-probs", progress: bool = True) -> tuple[Tensor, Tensor]:
    """(chosen [N], rejected [N]) summed response log-probs of ``model`` for every row, in dataset order."""
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
            logps = batch_sequence_logps(model, batch, impl, chunk_tokens, max_buckets=4).float().cpu()
            c, r = logps.chunk(2)
            chosen.append(c)
            rejected.append(r)
    model.train(was_training)
    return torch.cat(chosen), torch.cat(rejected)


def cached_reference_logps(model: nn.Module, dataset, collator, cache_dir: str | os.PathLike, settings: dict,
                           **compute_kwargs) -> tuple[Tensor, Tensor, bool]:
    """Load the cached reference log-probs for (model, dataset, settings) or compute and store them.

    Returns (chosen [N], rejected [N], hit). The file is written to a temporary name and renamed into place,
    so an interrupted run never leaves a truncated cache entry.
    """
    key = cache_key(fingerprint_model(model), fingerprint_rows(dataset), settings)
    directory = Path(cache_dir).expanduser()
    path = directory / f"{key}.safetensors"
    if path.is_file():
        tensors = load_file(str(path))
        if tensors["chosen"].shape[0] == len(dataset):
            return tensors["chosen"], tensors["rejected"], True
    chosen, rejected = compute_reference_logps(model, dataset, collator, **compute_kwargs)
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, suffix=".tmp")
    os.close(fd)
    try:
        save_file({"chosen": chosen.contiguous(), "rejected": rejected.contiguous()}, tmp,
                  metadata={"rows": str(len(dataset)), "settings": json.dumps(settings, sort_keys=True)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return chosen, rejected, False
