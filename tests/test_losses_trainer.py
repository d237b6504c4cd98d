"""PreferenceTrainer's once-per-run warning when a whole logging window was clipped (no preference gradient)."""

import logging

import pytest
import torch
from transformers import TrainingArguments

from chipo.toy import tiny_model_and_tokenizer
from chipo.train import PreferenceTrainer

NEEDLE = "every pair in the logging window"


@pytest.fixture()
def trainer(tmp_path):
    model, _ = tiny_model_and_tokenizer()
    args = TrainingArguments(output_dir=str(tmp_path), report_to="none", use_cpu=True, disable_tqdm=True)
    return PreferenceTrainer(model=model, args=args, loss_name="chipo", beta=0.1)


def _window(trainer, clipped):
    """Record one micro-batch of metrics with the given per-pair ``clipped`` flags (others arbitrary)."""
    n = len(clipped)
    metrics = {name: torch.zeros(n) for name in trainer.mean_metrics}
    metrics["clipped"] = torch.tensor(clipped)
    trainer._record(metrics, "train")


def _warnings(caplog):
    return [r for r in caplog.records if r.levelno == logging.WARNING and NEEDLE in r.getMessage()]


def test_warns_once_when_every_pair_of_a_window_is_clipped(trainer, caplog):
    """Two micro-batches, all 3 pairs clipped: the window's mean clipped = 1 -> one warning naming the step.
    A second fully clipped window does not repeat it (once per run)."""
    with caplog.at_level(logging.WARNING, logger="chipo"):
        _window(trainer, [1.0, 1.0])
        _window(trainer, [1.0])
        logs = {"loss": 4.5e-5}
        trainer.log(logs)
        assert logs["clipped"] == 1.0
        assert len(_warnings(caplog)) == 1
        assert "step 0" in _warnings(caplog)[0].getMessage()
        _window(trainer, [1.0, 1.0])
        trainer.log({"loss": 4.5e-5})
    assert len(_warnings(caplog)) == 1


def test_no_warning_while_some_pair_has_gradient(trainer, caplog):
    """Mean clipped 5/6 < 1 (one pair inside the band): no warning; eval windows never warn."""
    with caplog.at_level(logging.WARNING, logger="chipo"):
        _window(trainer, [1.0, 1.0, 1.0])
        _window(trainer, [1.0, 0.0, 1.0])
        logs = {"loss": 0.3}
        trainer.log(logs)
        assert logs["clipped"] == pytest.approx(5 / 6)
        trainer._record({**{n: torch.zeros(2) for n in trainer.mean_metrics}, "clipped": torch.ones(2)}, "eval")
        trainer.log({"eval_loss": 0.1})
    assert _warnings(caplog) == []


def test_train_config_passes_new_loss_options():
    """PreferenceConfig fields length_normalize / sft_weight / reward_bound reach preference_loss only when set, and
    bad values are one-line ConfigErrors naming the key."""
    from chipo.config import ConfigError, load_config
    from chipo.train.config import PreferenceConfig

    base = ["model=m", "dataset=d"]
    assert set(load_config(PreferenceConfig, None, base).loss_options()) == {"alpha"}
    opts = load_config(PreferenceConfig, None, [*base, "loss=ipo", "length_normalize=false", "sft_weight=0.2",
                                           "reward_bound=3"]).loss_options()
    assert opts == {"alpha": 0.5, "length_normalize": False, "sft_weight": 0.2, "reward_bound": 3.0}
    with pytest.raises(ConfigError, match="reward_bound must be positive"):
        load_config(PreferenceConfig, None, [*base, "reward_bound=0"])
    with pytest.raises(ConfigError, match="sft_weight must be a finite number >= 0"):
        load_config(PreferenceConfig, None, [*base, "sft_weight=-1"])
