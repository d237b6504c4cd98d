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
