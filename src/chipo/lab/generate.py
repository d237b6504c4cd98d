"""Preference data by the data process of Huang et al. 2024 (arXiv 2407.13399, section 2), and text log-probs.

The process:

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

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from chipo.data.tokenize import encode_text_pairs
from chipo.generation import SamplingSettings, sample_responses
from chipo.io import write_jsonl
from chipo.models import pad_id
from chipo.sequences import sequence_logps


def response_logps(model, tokenizer, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 512
                   ) -> torch.Tensor:
    """log pi(y | x) [N] of text pairs, tokenized as standard preference rows are (``encode_text_pairs``)."""
    prompt_ids, response_ids = encode_text_pairs(tokenizer, list(prompts), list(responses))
    pad = pad_id(tokenizer)
    model.eval()
    return sequence_logps(model, prompt_ids, response_ids, pad, batch_size=batch_size).cpu()


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
    """Preference rows by the paper's data process: two samples of ``model`` (pi_ref) per pair, BT-labelled by ``gold``.

    Pairs with an empty response are dropped (a preference row needs two non-empty responses) and counted. Rows
    carry the sampled token ids (``prompt_token_ids``, ``chosen_token_ids``, ``rejected_token_ids``; a response
    has its EOS only when it finished), which ``chipo.data`` trains on instead of re-tokenizing the text.
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
        # The sampled token ids travel with the text, so training uses exactly the tokens pi_ref drew.
        rows.append({"prompt": samples.prompts[samples.prompt_index[i]], "chosen": samples.texts[c],
                     "rejected": samples.texts[r], "gold_chosen": float(rewards[c]),
                     "gold_rejected": float(rewards[r]), "p_label": float(p if first_wins else 1.0 - p),
                     "prompt_token_ids": samples.prompt_ids[samples.prompt_index[i]],
                     "chosen_token_ids": samples.response_ids[c], "rejected_token_ids": samples.response_ids[r]})
    stats = PreferenceStats(
        pairs=len(rows), dropped_empty=dropped, identical_pairs=int(identical),
        label_agrees_with_gold=agree / max(len(rows), 1),
        mean_label_probability=float(np.mean([row["p_label"] for row in rows])) if rows else math.nan,
        settings={"sampling": settings.as_dict(), "scale": scale, "pairs_per_prompt": pairs_per_prompt,
                  "gold": getattr(gold, "name", type(gold).__name__), "prompts": len(prompts)},
    )
    return rows, stats


TRAIN_DATA_SEED = 1000
"""Sampling seed of seed s's training pairs: ``TRAIN_DATA_SEED + s`` (every lab experiment on the embedded world)."""
HELDOUT_DATA_SEED = 999
"""Sampling seed of the held-out pairs, shared by all seeds."""


def seed_datasets(world, data_dir: str | Path, *, seeds: int, pairs_per_prompt: int, heldout_pairs_per_prompt: int,
                  scale: float, max_new_tokens: int, reuse: bool = True
                  ) -> tuple[dict[str, dict], list[str], list[str]]:
    """The lab's preference data on a world (``chipo.lab.world.World``: pi_ref samples, Bradley-Terry labels from
    its gold reward), one draw per seed: ``train_seed{s}.jsonl`` on the training prompts for s < ``seeds``
    (sampling seed ``TRAIN_DATA_SEED + s``) and ``heldout.jsonl`` on the evaluation prompts
    (``HELDOUT_DATA_SEED``), in ``data_dir``. A seed is its own data draw, so experiments with the same seeds and
    sizes (the demo, the method table, the monitor's validation) train on the same pairs. With ``reuse``, a file
    already there is kept (and pi_ref is not loaded when every file is). Returns the ``PreferenceStats`` (as dicts)
    of the files written, by name, and the (training, evaluation) prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chipo.data.prompts import load_prompts

    train_prompts = load_prompts(world.train_prompts_path, text_only=True).prompts
    eval_prompts = load_prompts(world.eval_prompts_path, text_only=True).prompts
    data_dir = Path(data_dir)
    jobs = [(f"train_seed{s}", train_prompts, pairs_per_prompt, TRAIN_DATA_SEED + s) for s in range(seeds)]
    jobs.append(("heldout", eval_prompts, heldout_pairs_per_prompt, HELDOUT_DATA_SEED))
    jobs = [job for job in jobs if not (reuse and (data_dir / f"{job[0]}.jsonl").is_file())]
    written = {}
    if jobs:
        tokenizer = AutoTokenizer.from_pretrained(world.pi_ref)
        model = AutoModelForCausalLM.from_pretrained(world.pi_ref).eval()
        gold = world.scorer()
    for name, prompts, pairs, seed in jobs:
        rows, stats = generate_preferences(model, tokenizer, prompts, gold, pairs_per_prompt=pairs, scale=scale,
                                           settings=SamplingSettings(max_new_tokens=max_new_tokens, seed=seed),
                                           progress=False)
        write_jsonl(data_dir / f"{name}.jsonl", rows)
        written[name] = asdict(stats)
    return written, train_prompts, eval_prompts
