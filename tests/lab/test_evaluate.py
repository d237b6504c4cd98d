"""Estimators of the lab on small discrete cases where the exact value is computable."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from chipo.divergences import CHI2, KL, clamped_exp
from chipo.lab.evaluate import Baseline, ExactSpace, exact_metrics, win_indicator, win_probability

PI = np.array([0.4, 0.3, 0.2, 0.1])
REF = np.array([0.25, 0.25, 0.25, 0.25])
EXACT_KL = float((PI * np.log(PI / REF)).sum())  # = 0.1064...
EXACT_CHI2 = float(0.5 * ((PI / REF - 1) ** 2 * REF).sum())  # seed convention 1/2 E_ref[(z - 1)^2] = 0.1


def _log_ratios_from_pi(n: int, seed: int) -> torch.Tensor:
    rng = np.random.Generator(np.random.PCG64(seed))
    y = rng.choice(len(PI), size=n, p=PI)
    return torch.tensor(np.log(PI[y] / REF[y]), dtype=torch.float64)


def test_exact_values_of_the_case():
    # Hand computation: KL = 0.4 ln 1.6 + 0.3 ln 1.2 + 0.2 ln 0.8 + 0.1 ln 0.4; chi2 = 2 * sum (pi - ref)^2 = 0.1.
    assert EXACT_KL == pytest.approx(0.4 * math.log(1.6) + 0.3 * math.log(1.2) + 0.2 * math.log(0.8)
                                     + 0.1 * math.log(0.4))
    assert EXACT_CHI2 == pytest.approx(0.1)


def test_monte_carlo_kl_and_chi2_from_policy_samples_match_exact_values():
    """k1 (mean log-ratio), k3 (KL.estimate_from_policy) and CHI2.estimate_from_policy within 5 s.e."""
    L = _log_ratios_from_pi(200_000, 0)
    w = clamped_exp(-L)
    k1_terms, k3_terms, chi_terms = L, KL.f(L) * w, CHI2.f(L) * w
    for estimate, terms, exact in ((L.mean(), k1_terms, EXACT_KL),
                                   (KL.estimate_from_policy(L), k3_terms, EXACT_KL),
                                   (CHI2.estimate_from_policy(L), chi_terms, EXACT_CHI2)):
        se = float(terms.std() / math.sqrt(len(L)))
        assert abs(float(estimate) - exact) < 5 * se


def test_k3_terms_are_nonnegative_and_k1_terms_are_not():
    L = _log_ratios_from_pi(1000, 1)
    assert (KL.f(L) * clamped_exp(-L) >= 0).all()
    assert (L < 0).any()


def test_exact_metrics_on_a_hand_made_partition():
    """Cells with rewards; pi, pi_ref as above: exact J, KL, chi2 and win rates by hand."""
    rewards = np.array([[1.0, 0.5, 0.5, 0.0]])
    baseline = Baseline(prompts=["x"], references=["r"], reference_rewards=np.array([0.5]), ref_samples=None,
                        ref_rewards=np.zeros(0),
                        exact=ExactSpace(np.log(REF)[None], rewards, np.array([[True, True, True, False]])))
    out = exact_metrics(np.log(PI)[None], baseline)
    assert out["gold"] == pytest.approx(0.4 * 1 + 0.5 * 0.5)
    assert out["kl"] == pytest.approx(EXACT_KL)
    assert out["chi2"] == pytest.approx(EXACT_CHI2)
    assert out["mass_malformed"] == pytest.approx(0.1)
    brute = sum(PI[i] * REF[j] * win_indicator(rewards[0, i], rewards[0, j]) for i in range(4) for j in range(4))
    assert out["win_rate_vs_ref"] == pytest.approx(brute)
    assert out["win_rate_vs_reference"] == pytest.approx(0.4 + 0.5 * 0.5)


def test_win_probability_by_sorting_matches_brute_force():
    rng = np.random.Generator(np.random.PCG64(5))
    r = rng.integers(0, 4, 50).astype(float)  # many ties
    p, q = rng.dirichlet(np.ones(50)), rng.dirichlet(np.ones(50))
    brute = p @ win_indicator(r[:, None], r[None, :]) @ q
    assert win_probability(p, q, r) == pytest.approx(brute)
    assert win_probability(q, q, r) == pytest.approx(0.5)  # any policy against itself


def test_data_mass_parts_sum_to_one_and_agree_with_the_exact_partition(tiny_world):
    """Two independent computations of the in-language mass: the sum of pi(y|x) over the enumerated in-language
    responses (``data_mass``) and the well-formed cells of the world's exact partition of all sequences."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chipo.lab.evaluate import data_mass, language_responses
    from chipo.rewards import load_scorer

    model = AutoModelForCausalLM.from_pretrained(tiny_world / "pi_ref").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_world / "pi_ref")
    gold = load_scorer(f"world:{tiny_world}")
    pairs = [json.loads(line) for line in open(tiny_world / "prefs.jsonl")]
    language = language_responses(gold, [r["prompt"] for r in pairs])
    mass = data_mass(model, tokenizer, pairs, language)
    assert sum(mass.values()) == pytest.approx(1.0, abs=1e-9)
    assert all(v >= 0 for v in mass.values())
    prompts = list(dict.fromkeys(r["prompt"] for r in pairs))
    logp, _, well_formed = gold.exact_partition(model, tokenizer, prompts)
    formed = (np.exp(logp) * well_formed).sum(1).mean()
    formed_data = 0.0  # chosen / rejected responses that are in the language, per prompt, averaged
    for x in prompts:
        texts = {r[side] for r in pairs if r["prompt"] == x for side in ("chosen", "rejected")} & set(language[x])
        if texts:
            from chipo.lab.generate import response_logps
            formed_data += float(np.exp(response_logps(model, tokenizer, [x] * len(texts), sorted(texts))).sum())
    formed_data /= len(prompts)
    assert mass["mass_other_language"] + formed_data == pytest.approx(formed, abs=1e-6)


def test_implicit_reward_accuracy_passes_lengths_so_ipo_works(tiny_world):
    """IPO normalises by response length by default; at pi = pi_ref every margin is 0: accuracy exactly 1/2."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chipo.lab.evaluate import pair_metrics, with_ref_logps

    model = AutoModelForCausalLM.from_pretrained(tiny_world / "pi_ref").eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_world / "pi_ref")
    pairs = with_ref_logps(model, tokenizer, [json.loads(line) for line in open(tiny_world / "prefs.jsonl")])
    assert all(r["chosen"] != r["rejected"] and r["chosen_length"] >= 1 for r in pairs)
    for loss in ("ipo", "dpo", "chipo"):
        out = pair_metrics(model, tokenizer, pairs, loss, 0.1)
        assert out["acc"] == pytest.approx(0.5) and out["clip_frac"] == 0.0


def test_exact_metrics_refuse_sampling_that_is_not_the_policy_itself():
    """The world's responses are L letters + EOS, so a sampler needs L + 1 new tokens (the default world: L = 4,
    need 5); with 4 a cut sample 'a b c d' reads as well-formed while the exact partition counts pi's real
    continuation. Temperature, top-p and top-k change the sampled distribution away from pi. Scorers without an
    exact partition (reward models) are never refused."""
    from chipo.generation import SamplingSettings
    from chipo.lab.evaluate import exact_sampling_problem
    from chipo.lab.world import world_scorer

    gold = world_scorer()
    assert gold.exact_min_new_tokens == gold.language.spec.response_length + 1 == 5
    assert exact_sampling_problem(gold, SamplingSettings(max_new_tokens=5)) is None
    assert "max_new_tokens=4" in exact_sampling_problem(gold, SamplingSettings(max_new_tokens=4))
    for bad in (dict(temperature=0.7), dict(top_p=0.9), dict(top_k=3)):
        problem = exact_sampling_problem(gold, SamplingSettings(max_new_tokens=8, **bad))
        assert problem is not None and "exact=false" in problem and "\n" not in problem

    class NoPartition:
        def score(self, prompts, responses):
            return [0.0] * len(prompts)

    assert exact_sampling_problem(NoPartition(), SamplingSettings(max_new_tokens=1, temperature=0.5)) is None


def test_a_sweep_with_cut_responses_is_one_line_exit_2_and_writes_nothing(tiny_world, tmp_path, capsys):
    """The tiny world's responses are 2 letters + EOS: max_new_tokens=2 cuts them. `chipo lab sweep` stops
    before training with one line naming the setting, exit code 2, and no output directory."""
    from chipo.cli.lab import main

    out = tmp_path / "sweep"
    code = main(["sweep", f"ref_model={tiny_world / 'pi_ref'}", f"train_prefs={tiny_world / 'prefs.jsonl'}",
                 f"eval_prompts={tiny_world / 'prompts_eval.jsonl'}", f"gold=world:{tiny_world}", "losses=dpo",
                 "betas=0.1", "seeds=0", "epochs=1", "num_samples=2", "max_new_tokens=2", "max_length=16",
                 f"out_dir={out}"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "max_new_tokens=2" in err and ">=3" in err
    assert not out.exists()
