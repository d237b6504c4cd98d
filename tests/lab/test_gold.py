"""Scorers through ``chipo.rewards.load_scorer``: a reward model by path, a module:function callable, the world's
judge (registered by ``chipo.lab``); and the world itself."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from chipo.config import ConfigError
from chipo.lab.generate import response_logps
from chipo.lab.world import Language, WorldScorer, WorldSpec, default_language, gold_reward
from chipo.rewards import CallableScorer, RewardModelScorer, load_scorer


def test_reward_model_by_path_scores_as_chipo_reward_trains(tiny_reward_model):
    """The one tokenization rule: prompt with special tokens, response without them + EOS, tokenized separately;
    batched right-padded scoring equals scoring each such row alone (the logit at its last token, EOS)."""
    scorer = load_scorer(str(tiny_reward_model))
    assert isinstance(scorer, RewardModelScorer)
    prompts, responses = ["t0 s1", "t1 s0", "t0 s0"], ["a b", "b", "c a"]
    scores = scorer.score(prompts, responses)
    assert scores.shape == (3,) and np.isfinite(scores).all()
    model = AutoModelForSequenceClassification.from_pretrained(tiny_reward_model).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_reward_model)
    with torch.no_grad():
        single = []
        for p, r in zip(prompts, responses):
            ids = (tokenizer(p, add_special_tokens=True)["input_ids"]
                   + tokenizer(r, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
            single.append(model(input_ids=torch.tensor([ids])).logits[0, 0].item())
    np.testing.assert_allclose(scores, single, rtol=1e-4, atol=1e-5)
    # A template is the opt-in for hub models trained on another text format: the formatted text, no EOS added.
    templated = load_scorer(str(tiny_reward_model), template="{prompt}{response}").score(prompts, responses)
    with torch.no_grad():
        plain = [model(**tokenizer(p + r, return_tensors="pt")).logits[0, 0].item() for p, r in zip(prompts, responses)]
    np.testing.assert_allclose(templated, plain, rtol=1e-4, atol=1e-5)
    assert not np.allclose(templated, scores)


def test_callable_scorer_from_module_function():
    scorer = load_scorer("chipo.lab.world:gold_reward")
    assert isinstance(scorer, CallableScorer)
    language = default_language()
    prompt = language.prompt_text(0, 0)
    well = next(r for r in language.response_space() if language.gold_text(prompt, r) > 0)
    expected = gold_reward([prompt, prompt], [well, "zz"])
    np.testing.assert_allclose(scorer.score([prompt, prompt], [well, "zz"]), expected)


@pytest.mark.parametrize("spec", ["no_such_module_xyz:fn", "chipo.lab.world:no_such_fn", "world:/nonexistent/dir"])
def test_bad_gold_specs_raise_config_errors(spec):
    with pytest.raises(ConfigError):
        load_scorer(spec)


def test_world_spec_is_registered_by_the_lab(tiny_world):
    assert isinstance(load_scorer("world"), WorldScorer)
    saved = load_scorer(f"world:{tiny_world}")
    assert isinstance(saved, WorldScorer) and saved.language.spec == Language.from_json(
        json.loads((tiny_world / "language.json").read_text())).spec


def test_world_gold_is_zero_outside_the_language_and_in_unit_interval_inside():
    language = Language.generate(WorldSpec())
    scorer = WorldScorer(language)
    prompt = language.prompt_text(1, 2)
    space = language.response_space()
    rewards = scorer.score([prompt] * len(space), space)
    well = np.array([language._well_formed(1, language.parse_response(r)) for r in space])
    assert well.sum() == WorldSpec().branching ** WorldSpec().response_length
    assert (rewards[~well] == 0).all() and ((rewards[well] > 0) & (rewards[well] < 1)).all()
    for bad in ["", "a b c", "a b c d e", "t1 a b c", "<|pad|> a b c"]:
        assert scorer.score([prompt], [bad])[0] == 0.0


def _exact_partition_by_full_strings(language, model, tokenizer, prompt: str) -> np.ndarray:
    """Reference for ``exact_partition``'s log-probs, without a KV cache: one forward over every full letter
    string prompt + u (|u| = L); the logits at position P - 1 + k give the next-token distribution after u's first
    k letters. Cell order as documented: for k = 0..L, the K^k prefixes in lexicographic order (EOS cells, then
    the lumped "other" cells), then the K^(L+1) cells u + letter."""
    k_letters, length = language.spec.n_letters, language.spec.response_length
    letter_ids = tokenizer.convert_tokens_to_ids(language.letters)
    strings = np.array(list(itertools.product(range(k_letters), repeat=length)))
    prompt_ids = tokenizer(prompt)["input_ids"]
    ids = torch.tensor([prompt_ids + [letter_ids[a] for a in s] for s in strings])
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[:, len(prompt_ids) - 1:].double(), -1).numpy()
    cells = []
    for k in range(length + 1):
        rows = np.arange(0, len(strings), k_letters ** (length - k))  # one full string per prefix of length k
        prefix = sum((lp[rows, j, np.asarray(letter_ids)[strings[rows, j]]] for j in range(k)),
                     np.zeros(len(rows)))
        eos = lp[rows, k, tokenizer.eos_token_id]
        covered = np.logaddexp(np.logaddexp.reduce(lp[rows, k][:, letter_ids], axis=-1), eos)
        cells += [prefix + eos, prefix + np.log(-np.expm1(covered))]
        if k == length:
            cells.append((prefix[:, None] + lp[rows, k][:, letter_ids]).reshape(-1))
    return np.concatenate(cells)


def test_exact_partition_equals_the_full_string_forward(tiny_world):
    """The trie walk with a KV cache computes the same cell log-probs as full forwards (float round-off only),
    and its vectorised rewards / well-formedness equal ``gold`` / ``_well_formed`` string by string."""
    language = Language.from_json(json.loads((tiny_world / "language.json").read_text()))
    model = AutoModelForCausalLM.from_pretrained(tiny_world / "pi_ref").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_world / "pi_ref")
    prompts = [language.prompt_text(*p) for p in language.all_prompts()[:3]]
    logp, rewards, well = language.exact_partition(model, tokenizer, prompts)
    for i, prompt in enumerate(prompts):
        np.testing.assert_allclose(logp[i], _exact_partition_by_full_strings(language, model, tokenizer, prompt),
                                   rtol=1e-5, atol=1e-5)
    k, length = language.spec.n_letters, language.spec.response_length
    offset = sum(2 * k ** j for j in range(length))
    strings = list(itertools.product(range(k), repeat=length))
    for i, prompt in enumerate(prompts):
        topic, style = language.parse_prompt(prompt)
        expected_well = [language._well_formed(topic, list(s)) for s in strings]
        np.testing.assert_array_equal(well[i, offset:offset + k ** length], expected_well)
        np.testing.assert_allclose(rewards[i, offset:offset + k ** length],
                                   [language.gold(topic, style, list(s)) for s in strings], rtol=1e-12, atol=0)
    assert logp.shape[1] == sum(2 * k ** j for j in range(length + 1)) + k ** (length + 1)


def test_exact_partition_sums_to_one_and_matches_direct_log_probs(tiny_world):
    language = Language.from_json(json.loads((tiny_world / "language.json").read_text()))
    model = AutoModelForCausalLM.from_pretrained(tiny_world / "pi_ref")
    tokenizer = AutoTokenizer.from_pretrained(tiny_world / "pi_ref")
    prompts = [language.prompt_text(*p) for p in language.all_prompts()]
    logp, rewards, well = language.exact_partition(model, tokenizer, prompts)
    np.testing.assert_allclose(np.exp(logp).sum(1), 1.0, atol=1e-9)
    k, length = language.spec.n_letters, language.spec.response_length
    offset = sum(2 * k ** j for j in range(length))  # cells "u + EOS" for |u| = L start here
    space = language.response_space()
    direct = response_logps(model, tokenizer, [prompts[0]] * len(space), space).double().numpy()
    np.testing.assert_allclose(logp[0, offset:offset + k ** length], direct, atol=1e-4)
    np.testing.assert_allclose(rewards[0, offset:offset + k ** length],
                               [language.gold_text(prompts[0], r) for r in space])
    assert rewards[:, :offset].max() == 0 and rewards[:, offset + k ** length:].max() == 0
    assert (well.sum(1) == language.spec.branching ** length).all()
