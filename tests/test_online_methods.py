"""``chipo.train.online_methods``: the registry of online methods that ``chipo online`` runs, and that a new method
is one entry (no branch in the trainer or the config)."""

import pytest
import torch
from safetensors.torch import load_file

from chipo.config import ConfigError
from chipo.train.online_config import OnlineConfig
from chipo.train.online_methods import (
    EXPLORATION,
    OWN_LOSS,
    JudgedBatch,
    OnlineMethod,
    check_pairwise,
    method_for,
    pairwise_loss,
)
from test_online_cli import data, run  # noqa: F401 -- the module's prompts fixture and CLI runner

JUDGE = "judge=test_online_cli:length_reward"


def config(**keys) -> OnlineConfig:
    return OnlineConfig(policy="p", prompts="p.jsonl", judge="j", output_dir="/tmp/unused", **keys)


def test_keys_select_the_method():
    assert config().method is EXPLORATION["none"] and config().method.opponent == "policy"
    assert config(exploration="xpo").method is EXPLORATION["xpo"]
    assert config(loss="nash-md").method is OWN_LOSS["nash-md"]
    assert method_for(config(loss="chipo")).policy_rows(3) == 6  # both samples of a pair come from pi
    assert method_for(config(exploration="xpo")).policy_rows(3) == 3  # y_b ~ pi_ref
    with pytest.raises(ConfigError, match="exploration must be one of none, xpo, got 'bogus'"):
        config(exploration="bogus")
    with pytest.raises(ConfigError, match="nash-md samples its own opponent"):
        config(loss="nash-md", exploration="xpo")
    with pytest.raises(ValueError, match="opponent must be one of"):
        OnlineMethod("x", "x", opponent="nobody", pairwise=True, loss=pairwise_loss)


def test_terms_are_added_in_order_and_logged():
    """A method's loss is its base loss plus each term that is on; a term returning None adds nothing.

    By hand: base losses [1, 2]; term one adds [10, 20] (logged 'one'); term two is off -> [11, 22]."""
    batch = JudgedBatch(*(torch.zeros(2),) * 5, n=2, policy_rows=2)
    method = OnlineMethod("t", "test", opponent="policy", pairwise=True,
                          loss=lambda cfg, b: (torch.tensor([1.0, 2.0]), torch.tensor([True, True]), {}),
                          terms=(lambda cfg, b: ("one", torch.tensor([10.0, 20.0])), lambda cfg, b: None))
    losses, kept, columns = method.losses(None, batch)
    assert losses.tolist() == [11.0, 22.0] and kept.all() and list(columns) == ["one"]


def test_a_new_method_is_one_registry_entry(tiny_dir, data, tmp_path, monkeypatch):  # noqa: F811
    """Register 'ref' (y_b ~ pi_ref, the plain pairwise loss, no term) and run it through the real CLI. With the
    same seed it must train exactly like XPO with alpha = 0 (same samples, same labels, bonus 0 * ... = 0; loss=dpo
    has no on-policy penalty): the trainer needs no branch for it."""
    monkeypatch.setitem(EXPLORATION, "ref", OnlineMethod("ref", "y_b from pi_ref", opponent="ref", pairwise=True,
                                                         loss=pairwise_loss, check=check_pairwise))
    new, xpo = tmp_path / "ref", tmp_path / "xpo"
    assert run(tiny_dir, data, new, JUDGE, "loss=dpo", "exploration=ref") == 0
    assert run(tiny_dir, data, xpo, JUDGE, "loss=dpo", "exploration=xpo", "xpo_alpha=0") == 0
    a, b = load_file(new / "model.safetensors"), load_file(xpo / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    start = load_file(tiny_dir / "model" / "model.safetensors")
    assert any(not torch.equal(a[k], start[k]) for k in a)  # it did train
