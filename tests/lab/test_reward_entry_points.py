"""One reward model, every entry point, identical numbers.

``chipo judge --judge reward-model``, ``chipo lab generate-prefs gold=RM`` (and so ``chipo lab evaluate`` and
sweeps, which score with the same gold scorer), ``chipo rl reward=RM`` and best-of-n all score through
``chipo.rewards.load_scorer``. Each is checked here against ``by_hand``: the documented rule written out
independently -- the prompt tokenized with the tokenizer's special tokens, the response without them, then EOS;
one row at a time (no padding); the score is the model's single logit at the last token.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from chipo.cli.main import main as chipo

RM_PATH: list[str] = []  # set by the tests; read by by_hand when chipo imports it as module:function


def by_hand(prompts, responses):
    path = RM_PATH[0]
    tokenizer, model = AutoTokenizer.from_pretrained(path), AutoModelForSequenceClassification.from_pretrained(path)
    out = []
    with torch.no_grad():
        for p, r in zip(prompts, responses, strict=True):
            ids = (tokenizer(p, add_special_tokens=True)["input_ids"]
                   + tokenizer(r, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                   + [tokenizer.eos_token_id])
            out.append(model.eval()(input_ids=torch.tensor([ids])).logits[0, 0].item())
    return out


@pytest.fixture
def rm(tiny_reward_model):
    RM_PATH[:] = [str(tiny_reward_model)]
    return tiny_reward_model


def test_load_scorer_and_the_judge_score_as_the_rule_says(rm, tiny_world, tmp_path):
    from chipo.rewards import load_scorer

    prompts = [json.loads(line)["prompt"] for line in open(tiny_world / "prompts_eval.jsonl")][:4]
    a, b = ["a b c d", "b", "c a", "d d"], ["b c", "a b c d e", "x", "a"]
    expected_a, expected_b = by_hand(prompts, a), by_hand(prompts, b)
    np.testing.assert_allclose(load_scorer(str(rm)).score(prompts, a), expected_a, rtol=1e-5, atol=1e-6)

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "a": x, "b": y}) + "\n" for p, x, y in zip(prompts, a, b)))
    details = tmp_path / "details.jsonl"
    assert chipo(["judge", "--pairs", str(pairs), "--judge", "reward-model", f"model={rm}", "--output",
                  str(tmp_path / "out.json"), "--details", str(details)]) == 0
    raw = [json.loads(line)["raw"].split() for line in details.read_text().splitlines()]
    np.testing.assert_allclose([float(x) for x, _ in raw], expected_a, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose([float(y) for _, y in raw], expected_b, rtol=1e-5, atol=1e-6)


def test_lab_gold_rl_reward_and_best_of_n_score_as_the_rule_says(rm, tiny_world, tmp_path):
    prefs = tmp_path / "prefs.jsonl"
    assert chipo(["lab", "generate-prefs", f"policy={tiny_world / 'pi_ref'}",
                  f"prompts={tiny_world / 'prompts_eval.jsonl'}", f"gold={rm}", "pairs_per_prompt=2",
                  "max_new_tokens=4", f"out={prefs}"]) == 0
    rows = [json.loads(line) for line in prefs.read_text().splitlines()]
    assert rows
    np.testing.assert_allclose([r["gold_chosen"] for r in rows],
                               by_hand([r["prompt"] for r in rows], [r["chosen"] for r in rows]), rtol=1e-5, atol=1e-6)

    # chipo rl: the evaluation at step 0 scores the same samples with reward=RM and with gold=by_hand.
    out = tmp_path / "rl"
    assert chipo(["rl", f"policy={tiny_world / 'pi_ref'}", f"prompts={tiny_world / 'prompts_eval.jsonl'}",
                  f"reward={rm}", "gold=test_reward_entry_points:by_hand", "k=2", "prompts_per_step=2",
                  "max_steps=1", "eval_steps=1", "max_eval_prompts=4", "max_new_tokens=4", f"output_dir={out}",
                  "disable_tqdm=true"]) == 0
    evals = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if "eval_reward" in line]
    assert evals
    for record in evals:
        assert record["eval_reward"] == pytest.approx(record["eval_gold"], rel=1e-5, abs=1e-6)

    # best-of-n: the proxy rewards it selects on are the rule's scores of the candidates it drew.
    from chipo.inference import sample_with_mode
    from chipo.models import load_causal_lm, load_tokenizer
    from chipo.rewards import load_scorer

    prompts = [r["prompt"] for r in rows[:3]]
    policy, tokenizer = load_causal_lm(str(tiny_world / "pi_ref"), eval_mode=True), load_tokenizer(
        str(tiny_world / "pi_ref"))
    selection = sample_with_mode(policy, tokenizer, prompts, mode="bon", n=3, reward=load_scorer(str(rm)),
                                 max_new_tokens=4, seed=0)
    np.testing.assert_allclose(selection.proxy_rewards, by_hand(prompts, selection.texts), rtol=1e-5, atol=1e-6)


def test_world_judge_on_prompts_outside_the_world_is_one_line(tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "hello there", "a": "x y", "b": "z"}) + "\n")
    out = tmp_path / "out.json"
    assert chipo(["judge", "--pairs", str(pairs), "--judge", "reward-model", "model=world", "--output",
                  str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("chipo: error: scorer 'world' scores only the embedded world's")
    assert not out.exists()
