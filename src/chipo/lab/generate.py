"""Sampling from a causal LM, response log-probs, and preference data by the seed's process.

The seed's data process (arXiv 2407.13399, section 2; the blog post beside the field notes):

    x ~ D_x,   y1, y2 ~ pi_ref(. | x) independently,
    P[y1 preferred] = exp(r*(x, y1)) / (exp(r*(x, y1)) + exp(r*(x, y2))) = sigmoid(s * (r*(x, y1) - r*(x, y2)))

where the gold reward r* is scaled by ``s`` (``scale``: the judge's confidence per unit of gold reward; the
Bradley-Terry reward is s * r*). The pair is written as a standard preference row ``{prompt, chosen, rejected}``
(plus the gold rewards and the label probability, which ``chipo train`` ignores), so ``chipo train`` reads it.
The trained policy sees the gold scorer only through these labels.

Sampling is plain ancestral sampling (``do_sample=True``, temperature 1, no top-k/top-p by default) so that
samples come from pi itself: the Monte-Carlo divergence estimates of ``chipo.lab.evaluate`` assume it. Every
setting is recorded with the samples (``SamplingSettings.as_dict``).
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from chipo.logprobs import logprobs_from_logits, sequence_logprobs


@dataclass(frozen=True)
class SamplingSettings:
    """How responses are sampled; recorded next to every number computed from samples."""

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    batch_size: int = 256

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class Samples:
    """Responses sampled for a list of prompts: row i answers ``prompts[prompt_index[i]]``."""

    prompts: list[str]
    prompt_index: list[int]
    texts: list[str]
    token_ids: list[list[int]]  # response tokens as sampled, including the EOS when the response finished
    finished: list[bool]
    settings: dict = field(default_factory=dict)

    def lengths(self) -> np.ndarray:
        """Response length in tokens, EOS excluded."""
        return np.array([len(ids) - int(done) for ids, done in zip(self.token_ids, self.finished)], dtype=float)

    def prompt_texts(self) -> list[str]:
        return [self.prompts[i] for i in self.prompt_index]


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Prompt token ids exactly as ``chipo.data`` tokenizes standard-format prompts (with special tokens)."""
    return tokenizer(list(prompts), add_special_tokens=True)["input_ids"]


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: Sequence[str], num_per_prompt: int, settings: SamplingSettings,
                     desc: str = "sampling", progress: bool = True) -> Samples:
    """``num_per_prompt`` responses per prompt from ``model`` (batched, left-padded HF ``generate``)."""
    model.eval()
    device = next(model.parameters()).device
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id if tokenizer.pad_token_id is not None \
        else tokenizer.eos_token_id
    encoded = encode_prompts(tokenizer, prompts)
    jobs = [i for i in range(len(prompts)) for _ in range(num_per_prompt)]
    texts, ids_out, finished = [], [], []
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(settings.seed)
    try:
        batches = range(0, len(jobs), settings.batch_size)
        for start in tqdm(batches, desc=desc, unit="batch", leave=False, disable=not progress):
            rows = [encoded[i] for i in jobs[start:start + settings.batch_size]]
            width = max(len(r) for r in rows)
            input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
            attention = torch.zeros((len(rows), width), dtype=torch.long)
            for j, r in enumerate(rows):  # left padding: generation continues right after each prompt
                input_ids[j, width - len(r):] = torch.tensor(r)
                attention[j, width - len(r):] = 1
            out = model.generate(
                input_ids=input_ids.to(device), attention_mask=attention.to(device), do_sample=True,
                temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
                max_new_tokens=settings.max_new_tokens, pad_token_id=pad, eos_token_id=eos,
            )[:, width:].cpu()
            for row in out.tolist():
                done = eos in row
                row = row[:row.index(eos) + 1] if done else row
                texts.append(decode_response(tokenizer, row[:-1] if done else row))
                ids_out.append(row)
                finished.append(done)
    finally:
        torch.random.set_rng_state(generator_state)
    return Samples(list(prompts), jobs, texts, ids_out, finished, settings.as_dict())


def decode_response(tokenizer, ids: list[int]) -> str:
    """Response text of sampled ids (EOS removed); special tokens the model emitted mid-response are kept."""
    return tokenizer.decode(ids, skip_special_tokens=False).strip()


# ---------------------------------------------------------------------------------------------------- log-probs


@torch.no_grad()
def token_logps(model, prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]], pad_token_id: int,
                batch_size: int = 512) -> torch.Tensor:
    """log pi(response | prompt) [N] summed over the given response token ids (fp32), right-padded batches."""
    model.eval()
    device = next(model.parameters()).device
    out = torch.empty(len(prompt_ids), dtype=torch.float32)
    for start in range(0, len(prompt_ids), batch_size):
        prompts = prompt_ids[start:start + batch_size]
        responses = response_ids[start:start + batch_size]
        width = max(len(p) + len(r) for p, r in zip(prompts, responses))
        ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
        attention = torch.zeros_like(ids)
        mask = torch.zeros((len(prompts), width), dtype=torch.bool)
        for j, (p, r) in enumerate(zip(prompts, responses)):
            ids[j, :len(p) + len(r)] = torch.tensor(list(p) + list(r))
            attention[j, :len(p) + len(r)] = 1
            mask[j, len(p):len(p) + len(r)] = True
        ids, attention, mask = ids.to(device), attention.to(device), mask.to(device)
        logits = model(input_ids=ids, attention_mask=attention, use_cache=False).logits
        out[start:start + len(prompts)] = sequence_logprobs(logprobs_from_logits(logits, ids, mask), mask).cpu()
    return out


def response_logps(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 512,
                   add_eos: bool = True) -> torch.Tensor:
    """log pi(y | x) [N] for text pairs, tokenized as ``chipo.data`` does for standard rows (response + EOS)."""
    prompt_ids = encode_prompts(tokenizer, prompts)
    resp = tokenizer(list(responses), add_special_tokens=False)["input_ids"]
    if add_eos:
        resp = [r + [tokenizer.eos_token_id] for r in resp]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return token_logps(model, prompt_ids, resp, pad, batch_size=batch_size)


# ---------------------------------------------------------------------------------------------------- preferences


def bradley_terry_probability(r1: np.ndarray, r2: np.ndarray, scale: float) -> np.ndarray:
    """P[y1 preferred over y2] = sigmoid(scale * (r1 - r2)) (computed stably)."""
    d = scale * (np.asarray(r1, dtype=float) - np.asarray(r2, dtype=float))
    return np.where(d >= 0, 1.0 / (1.0 + np.exp(-np.abs(d))), np.exp(-np.abs(d)) / (1.0 + np.exp(-np.abs(d))))


def bradley_terry_labels(r1: np.ndarray, r2: np.ndarray, scale: float, rng: np.random.Generator) -> np.ndarray:
    """Boolean labels: True where y1 is preferred, drawn from the Bradley-Terry model with gold rewards."""
    p = bradley_terry_probability(r1, r2, scale)
    return rng.random(p.shape) < p


@dataclass
class PreferenceStats:
    pairs: int
    dropped_empty: int
    identical_pairs: int
    label_agrees_with_gold: float  # fraction of pairs whose chosen has the higher gold reward (ties: 1/2)
    mean_label_probability: float
    settings: dict


def generate_preferences(model, tokenizer, prompts: Sequence[str], gold, *, pairs_per_prompt: int, scale: float,
                         settings: SamplingSettings, progress: bool = True,
                         desc: str = "sampling preference pairs") -> tuple[list[dict], PreferenceStats]:
    """Preference rows by the seed's process: two samples of ``model`` (pi_ref) per pair, BT-labelled by ``gold``.

    Pairs with an empty response are dropped (a preference row needs two non-empty responses) and counted.
    """
    samples = sample_responses(model, tokenizer, prompts, 2 * pairs_per_prompt, settings, desc=desc,
                               progress=progress)
    rewards = np.asarray(gold.score(samples.prompt_texts(), samples.texts), dtype=float)
    rng = np.random.Generator(np.random.PCG64(settings.seed + 7919))
    first, second = np.arange(0, len(samples.texts), 2), np.arange(1, len(samples.texts), 2)
    labels = bradley_terry_labels(rewards[first], rewards[second], scale, rng)
    probs = bradley_terry_probability(rewards[first], rewards[second], scale)
    rows, dropped, identical, agree = [], 0, 0, 0.0
    for i, j, first_wins, p in zip(first, second, labels, probs):
        if not samples.texts[i].strip() or not samples.texts[j].strip():
            dropped += 1
            continue
        c, r = (i, j) if first_wins else (j, i)
        identical += samples.texts[c] == samples.texts[r]
        agree += 1.0 if rewards[c] > rewards[r] else 0.5 if rewards[c] == rewards[r] else 0.0
        rows.append({"prompt": samples.prompts[samples.prompt_index[i]], "chosen": samples.texts[c],
                     "rejected": samples.texts[r], "gold_chosen": float(rewards[c]),
                     "gold_rejected": float(rewards[r]), "p_label": float(p if first_wins else 1.0 - p)})
    stats = PreferenceStats(
        pairs=len(rows), dropped_empty=dropped, identical_pairs=int(identical),
        label_agrees_with_gold=agree / max(len(rows), 1),
        mean_label_probability=float(np.mean([row["p_label"] for row in rows])) if rows else math.nan,
        settings={"sampling": settings.as_dict(), "scale": scale, "pairs_per_prompt": pairs_per_prompt,
                  "gold": getattr(gold, "name", type(gold).__name__), "prompts": len(prompts)},
    )
    return rows, stats


def write_jsonl(path: str | os.PathLike, rows: Sequence[dict]) -> None:
    """Write rows as JSON lines to a temporary file and rename it into place (never a half-written file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, data) -> None:
    """Atomic JSON write (temporary file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, default=_json_default)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _json_default(obj):
    if isinstance(obj, (np.floating, np.integer)):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
