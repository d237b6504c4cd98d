"""chipo reward: Bradley-Terry loss values, end-to-end training on separable toy data, bad inputs."""

import json
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from chipo.cli.reward import main as reward_main
from chipo.data import PreferenceCollator, load_preference_dataset, prepare_preference_dataset
from chipo.io import read_jsonl as read_metrics
from chipo.rewards import RewardModelScorer, load_scorer
from chipo.train.reward import bradley_terry_loss


def test_bradley_terry_loss_values_margin_and_centering():
    chosen, rejected = torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 0.0, 3.0])
    losses, metrics = bradley_terry_loss(chosen, rejected)
    assert torch.allclose(losses, torch.tensor([math.log1p(math.exp(-1)), math.log(2), math.log1p(math.e)]))
    assert metrics["rewards/accuracies"].tolist() == [1.0, 0.5, 0.0]
    assert metrics["rewards/margins"].tolist() == [1.0, 0.0, -1.0]
    with_margin, _ = bradley_terry_loss(chosen, rejected, margin=torch.tensor([1.0, 0.0, 0.0]))
    assert with_margin[0].item() == pytest.approx(math.log(2))  # r+ - r- - m = 0
    centered, _ = bradley_terry_loss(chosen, rejected, center_coefficient=0.5)
    assert torch.allclose(centered - losses, 0.5 * (chosen + rejected) ** 2)


def _reward(tiny_dir, out, *overrides):
    return reward_main([f"model={tiny_dir / 'model'}", f"dataset={tiny_dir / 'train.jsonl'}", f"output_dir={out}",
                        "per_device_train_batch_size=8", "learning_rate=3e-3", "logging_steps=1",
                        "disable_tqdm=true", "save_strategy=no", *overrides])


def test_reward_cli_trains_separable_data_and_saves_hf_model(tiny_dir, tmp_path):
    out = tmp_path / "rm"
    code = _reward(tiny_dir, out, f"eval_dataset={tiny_dir / 'test.jsonl'}", "eval_split=train",
                   "num_train_epochs=3", "center_rewards_coefficient=0.01")
    assert code == 0
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.num_labels == 1 and model.config.pad_token_id is not None
    records = read_metrics(out / "metrics.jsonl")
    train = [r for r in records if "rewards/accuracies" in r]
    evals = [r for r in records if "eval_rewards/accuracies" in r]
    assert train and evals
    assert train[-1]["loss"] < train[0]["loss"]
    assert evals[-1]["eval_rewards/accuracies"] > 0.9 and evals[-1]["eval_rewards/margins"] > 0.5
    assert "eval_rewards/mean" in evals[-1]
    # the saved model scores new text through the inference interface, chosen-like text above rejected-like
    scorer = load_scorer(str(out))
    assert isinstance(scorer, RewardModelScorer)
    good, bad = scorer.score(["why is the cat short? "] * 2, ["good helpful answer.", "bad bad harmless."])
    assert good > bad
    # scores match the trainer's view of the same pairs: chipo.data's tokenization and collation, pooled token
    rows = [json.loads(line) for line in open(tiny_dir / "test.jsonl")][:4]
    direct = scorer.score([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    prepared, _ = prepare_preference_dataset(load_preference_dataset(str(tiny_dir / "test.jsonl"), max_rows=4),
                                             scorer.tokenizer, source="test.jsonl", max_length=512)
    batch = PreferenceCollator(scorer.tokenizer.pad_token_id)([prepared[i] for i in range(4)])
    with torch.no_grad():
        trained_view = scorer.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:4, 0]
    torch.testing.assert_close(torch.from_numpy(direct).float(), trained_view, rtol=1e-4, atol=1e-5)


def test_reward_margin_column(tiny_dir, tmp_path):
    rows = [json.loads(line) for line in open(tiny_dir / "train.jsonl")][:8]
    data = tmp_path / "margins.jsonl"
    data.write_text("".join(json.dumps({**r, "margin": 0.5}) + "\n" for r in rows))
    assert _reward(tiny_dir, tmp_path / "m", f"dataset={data}", "margin_column=margin", "max_steps=1") == 0
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({**r, "margin": "big"}) + "\n" for r in rows))
    assert _reward(tiny_dir, tmp_path / "b", f"dataset={bad}", "margin_column=margin", "max_steps=1") == 2
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("override, message", [
    ("center_rewards_coefficient=-1", "center_rewards_coefficient"),
    ("margin_column=nope", "margin_column 'nope' not found"),
    ("dataset=/no/such.jsonl", "file not found"),
    ("learnin_rate=1", "did you mean 'learning_rate'"),
])
def test_reward_bad_inputs_one_line_exit_2_no_output(tiny_dir, tmp_path, capsys, override, message):
    out = tmp_path / "never"
    assert _reward(tiny_dir, out, override, "max_steps=1") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_seed_fixes_the_new_score_head(tiny_dir, tmp_path):
    """The score head is initialised under ``seed``: two runs with one seed are the same run from step 1 (same
    losses, same weights), another seed starts from another head (a different step-1 loss)."""
    runs = {}
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        out = tmp_path / name
        assert _reward(tiny_dir, out, "max_steps=2", f"seed={seed}") == 0
        runs[name] = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert runs["a"] == runs["b"] and runs["a"][0] != runs["c"][0]
    wa = AutoModelForSequenceClassification.from_pretrained(tmp_path / "a").state_dict()
    wb = AutoModelForSequenceClassification.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
