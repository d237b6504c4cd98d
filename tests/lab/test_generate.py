"""Preference data by the paper's process: Bradley-Terry labels and the written rows."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from chipo.generation import SamplingSettings, sample_responses
from chipo.io import write_jsonl
from chipo.lab.generate import bradley_terry_labels, bradley_terry_probability, generate_preferences
from chipo.rewards import load_scorer


@pytest.mark.parametrize("gap, scale", [(0.0, 5.0), (0.1, 5.0), (0.4, 5.0), (-1.0, 2.0), (3.0, 1.0)])
def test_bradley_terry_label_frequency_matches_the_formula(gap, scale):
    """On n = 200k draws the frequency of "y1 preferred" is sigmoid(scale * gap) within 5 binomial s.d."""
    n = 200_000
    rng = np.random.Generator(np.random.PCG64(int(1000 * (gap + 10) + scale)))
    r1 = rng.uniform(0, 1, n)
    labels = bradley_terry_labels(r1, r1 - gap, scale, rng)
    p = 1.0 / (1.0 + math.exp(-scale * gap))
    sd = math.sqrt(p * (1 - p) / n)
    assert abs(labels.mean() - p) <= 5 * sd + 1e-12


def test_bradley_terry_frequency_with_mixed_rewards():
    """Many distinct reward pairs at once: the mean label equals the mean BT probability (CLT bound)."""
    n = 100_000
    rng = np.random.Generator(np.random.PCG64(7))
    r1, r2 = rng.uniform(0, 1, n), rng.uniform(0, 1, n)
    p = bradley_terry_probability(r1, r2, 5.0)
    labels = bradley_terry_labels(r1, r2, 5.0, rng)
    assert abs(labels.mean() - p.mean()) <= 5 * math.sqrt((p * (1 - p)).sum()) / n
    # Equal-probability bins: each bin's frequency tracks its probability.
    for lo in np.arange(0.0, 1.0, 0.2):
        sel = (p >= lo) & (p < lo + 0.2)
        assert abs(labels[sel].mean() - p[sel].mean()) <= 5 * math.sqrt((p[sel] * (1 - p[sel])).sum()) / sel.sum()


def test_bradley_terry_probability_is_stable_and_symmetric():
    assert bradley_terry_probability(np.array([1000.0]), np.array([0.0]), 1.0)[0] == 1.0
    assert bradley_terry_probability(np.array([0.0]), np.array([1000.0]), 1.0)[0] == 0.0
    r1, r2 = np.array([0.3, 0.9]), np.array([0.7, 0.1])
    np.testing.assert_allclose(bradley_terry_probability(r1, r2, 5) + bradley_terry_probability(r2, r1, 5), 1.0)


def test_generate_preferences_writes_standard_rows_chipo_train_reads(tiny_world, tmp_path):
    from chipo.data import load_preference_dataset, prepare_preference_dataset

    model = AutoModelForCausalLM.from_pretrained(tiny_world / "pi_ref")
    tokenizer = AutoTokenizer.from_pretrained(tiny_world / "pi_ref")
    gold = load_scorer(f"world:{tiny_world}")
    prompts = [json.loads(line)["prompt"] for line in open(tiny_world / "prompts_eval.jsonl")]
    settings = SamplingSettings(max_new_tokens=4, seed=3)
    rows, stats = generate_preferences(model, tokenizer, prompts, gold, pairs_per_prompt=8, scale=5.0,
                                       settings=settings, progress=False)
    assert stats.pairs + stats.dropped_empty == 8 * len(prompts)
    assert stats.settings["sampling"]["top_k"] == 0 and stats.settings["scale"] == 5.0
    for row in rows:
        assert row["chosen"].strip() and row["rejected"].strip()
        # the recorded label probability is the BT formula on the recorded gold rewards
        assert row["p_label"] == pytest.approx(1 / (1 + math.exp(-5.0 * (row["gold_chosen"] - row["gold_rejected"]))))
        assert row["gold_chosen"] == pytest.approx(gold.score([row["prompt"]], [row["chosen"]])[0])
    path = tmp_path / "prefs.jsonl"
    write_jsonl(path, rows)
    dataset = load_preference_dataset(str(path))
    prepared, prep = prepare_preference_dataset(dataset, tokenizer, source=str(path), max_length=16)
    assert prep.rows == len(rows) and prep.format == "standard"

    # Same seed, same samples: generation is reproducible and leaves the global RNG alone.
    again, _ = generate_preferences(model, tokenizer, prompts, gold, pairs_per_prompt=8, scale=5.0,
                                    settings=settings, progress=False)
    assert [r["chosen"] for r in again] == [r["chosen"] for r in rows]


def test_sampled_token_ids_end_at_eos_and_match_text(tiny_world):
    model = AutoModelForCausalLM.from_pretrained(tiny_world / "pi_ref")
    tokenizer = AutoTokenizer.from_pretrained(tiny_world / "pi_ref")
    samples = sample_responses(model, tokenizer, ["t0 s1", "t1 s0"], 20, SamplingSettings(max_new_tokens=5, seed=1),
                               progress=False)
    assert len(samples.texts) == 40 and samples.prompt_index[:20] == [0] * 20
    for ids, done, text in zip(samples.response_ids, samples.finished, samples.texts):
        assert (ids[-1] == tokenizer.eos_token_id) == done
        assert tokenizer.eos_token_id not in ids[:-1]
        assert len(ids) <= 5
        assert len(text.split()) == len(ids) - int(done)
