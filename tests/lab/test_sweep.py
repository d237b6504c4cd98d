"""Sweep resume: finished cells are never retrained nor re-evaluated; a cut-short cell is completed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from chipo.config import ConfigError
from chipo.lab.sweep import Sweep, SweepConfig, default_eval_epochs, read_results


class FakeTrainer:
    """Stands in for run_training: writes per-epoch checkpoints (copies of pi_ref) with trainer_state.json."""

    def __init__(self, ref: Path):
        self.ref = ref
        self.calls = []

    def __call__(self, config):
        self.calls.append((config.loss, config.beta, config.seed, config.resume_from_checkpoint))
        out = Path(config.output_dir)
        for epoch in range(1, int(config.num_train_epochs) + 1):
            ckpt = out / f"checkpoint-{3 * epoch}"
            if not ckpt.exists():
                shutil.copytree(self.ref, ckpt)
                (ckpt / "trainer_state.json").write_text(json.dumps({"epoch": float(epoch), "global_step": 3 * epoch}))
        with (out / "metrics.jsonl").open("a") as f:
            for epoch in range(1, int(config.num_train_epochs) + 1):
                f.write(json.dumps({"epoch": float(epoch), "loss": 0.5, "rewards/accuracies": 0.75}) + "\n")
        return out


def _config(world: Path, out: Path, **kw) -> SweepConfig:
    values = dict(ref_model=str(world / "pi_ref"), train_prefs=str(world / "prefs.jsonl"),
                  eval_prompts=str(world / "prompts_eval.jsonl"), heldout_prefs=str(world / "prefs.jsonl"),
                  out_dir=str(out), gold=f"world:{world}", losses=["dpo", "chipo"], betas=[0.1], seeds=[0, 1],
                  epochs=2, num_samples=4, max_new_tokens=4, max_length=16)
    values.update(kw)
    return SweepConfig(**values)


def test_default_eval_epochs():
    assert default_eval_epochs(32) == [1, 2, 4, 8, 16, 32]
    assert default_eval_epochs(6) == [1, 2, 4, 6]


def test_sweep_resume_skips_finished_cells_and_completes_cut_short_ones(tiny_world, tmp_path):
    config = _config(tiny_world, tmp_path / "sweep")
    trainer = FakeTrainer(tiny_world / "pi_ref")
    sweep = Sweep(config, train_fn=trainer, progress=False)
    rows = sweep.run()
    assert sweep.train_calls == 4 and len(trainer.calls) == 4
    assert len(rows) == 1 + 4 * 2  # pi_ref + 4 cells x epochs {1, 2}
    first = read_results(tmp_path / "sweep" / "results.jsonl")
    assert len(first) == len(rows)
    row = next(r for r in first if r["loss"] == "chipo" and r["epoch"] == 2)
    assert 0 <= row["win_rate_vs_ref"] <= 1 and "exact" in row and row["train_acc"] == 0.75
    assert not list((tmp_path / "sweep" / "runs").glob("*/checkpoint-*"))  # cleaned after evaluation

    # A rerun of a finished sweep: no training, no new rows.
    again = Sweep(config, train_fn=trainer, progress=False)
    assert len(again.run()) == len(first)
    assert again.train_calls == 0 and len(trainer.calls) == 4

    # Cut one cell short: its epoch-2 row never got written. Only that cell trains again, only that row is added.
    path = tmp_path / "sweep" / "results.jsonl"
    kept = [r for r in first if not (r["loss"] == "dpo" and r["seed"] == 1 and r["epoch"] == 2)]
    path.write_text("".join(json.dumps(r) + "\n" for r in kept) + '{"torn": ')  # and a torn last line
    third = Sweep(config, train_fn=trainer, progress=False)
    final = third.run()
    assert third.train_calls == 1 and trainer.calls[-1][:3] == ("dpo", 0.1, 1)
    assert len(final) == len(first)
    assert sorted((r["loss"], r["seed"], r["epoch"]) for r in final if r["loss"] != "pi_ref") == \
        sorted((r["loss"], r["seed"], r["epoch"]) for r in first if r["loss"] != "pi_ref")


def test_checkpoints_left_by_an_interrupted_cell_are_evaluated_without_training(tiny_world, tmp_path):
    config = _config(tiny_world, tmp_path / "sweep", losses=["dpo"], seeds=[0], keep_checkpoints=True)
    trainer = FakeTrainer(tiny_world / "pi_ref")
    Sweep(config, train_fn=trainer, progress=False).run()
    path = tmp_path / "sweep" / "results.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in read_results(path) if r["epoch"] != 2))
    sweep = Sweep(config, train_fn=trainer, progress=False)
    rows = sweep.run()
    assert sweep.train_calls == 0 and len(trainer.calls) == 1
    assert {r["epoch"] for r in rows if r["loss"] == "dpo"} == {1, 2}


def test_a_sweep_directory_refuses_different_settings(tiny_world, tmp_path):
    trainer = FakeTrainer(tiny_world / "pi_ref")
    Sweep(_config(tiny_world, tmp_path / "s", losses=["dpo"], seeds=[0], epochs=1), train_fn=trainer,
          progress=False).run()
    with pytest.raises(ConfigError, match="learning_rate"):
        Sweep(_config(tiny_world, tmp_path / "s", losses=["dpo"], seeds=[0], epochs=1, learning_rate=0.5),
              train_fn=trainer, progress=False).run()


def test_sweep_config_validation(tiny_world, tmp_path):
    with pytest.raises(ConfigError, match="unknown loss"):
        _config(tiny_world, tmp_path, losses=["nope"])
    with pytest.raises(ConfigError, match="eval_epochs"):
        _config(tiny_world, tmp_path, eval_epochs=[5])


def test_variants_from_strings_a_split_command_line_list_and_a_mapping():
    from chipo.lab.configs import parse_variants

    a = parse_variants(["dpo", "rpo:dpo:sft_weight=1,reward_bound=2.5", "chipo:chipo:r_max=null"])
    assert [(v.name, v.loss, v.option_dict) for v in a] == [
        ("dpo", "dpo", {}), ("rpo", "dpo", {"sft_weight": 1, "reward_bound": 2.5}), ("chipo", "chipo",
                                                                                      {"r_max": None})]
    # key=value,key=value split apart by the comma-separated list syntax of the command line is joined back
    assert parse_variants(["rpo:dpo:sft_weight=1", "reward_bound=2.5", "x:ipo"]) == parse_variants(
        ["rpo:dpo:sft_weight=1;reward_bound=2.5", "x:ipo"])
    b = parse_variants({"rpo": {"loss": "dpo", "sft_weight": 1, "reward_bound": 2.5}, "x": {"loss": "ipo"}})
    assert b == parse_variants(["rpo:dpo:sft_weight=1,reward_bound=2.5", "x:ipo"])


@pytest.mark.parametrize("value, message", [(["a:nope"], "unknown loss"), (["a:dpo:lr=1"], "unknown option"),
                                            (["a:dpo", "a:chipo"], "duplicate"), (["a b:dpo"], "name"),
                                            ({"a": {"sft_weight": 1}}, "'loss'"), (["a:dpo:sft_weight"], "key=value")])
def test_bad_variants_are_one_line_errors(value, message):
    from chipo.lab.configs import parse_variants

    with pytest.raises(ConfigError, match=message):
        parse_variants(value)


def test_a_sweep_over_variants_trains_each_with_its_options_and_records_them(tiny_world, tmp_path):
    config = _config(tiny_world, tmp_path / "sweep", seeds=[0], epochs=1,
                     variants=["dpo:dpo", "rpo:dpo:sft_weight=1", "bounded:chipo:reward_bound=2.5"])
    seen = []

    class Recording(FakeTrainer):
        def __call__(self, config):
            seen.append((config.loss, config.sft_weight, config.reward_bound, config.drop_ties))
            return super().__call__(config)

    rows = Sweep(config, train_fn=Recording(tiny_world / "pi_ref"), progress=False).run()
    assert sorted(seen) == [("chipo", 0.0, 2.5, True), ("dpo", 0.0, None, True), ("dpo", 1.0, None, True)]
    trained = {r["method"]: r for r in rows if r["loss"] != "pi_ref"}
    assert trained["rpo"]["loss"] == "dpo" and trained["rpo"]["options"] == {"sft_weight": 1}
    for row in trained.values():  # the proxy's view and where the mass goes, per epoch
        assert 0 <= row["train_acc_exact"] <= 1 and 0 <= row["clip_frac"] <= 1
        assert sum(row["mass"].values()) == pytest.approx(1.0, abs=1e-6)
    # Renaming nothing but changing a variant's options is refused (its rows would mix).
    changed = _config(tiny_world, tmp_path / "sweep", seeds=[0], epochs=1, variants=["rpo:dpo:sft_weight=2"])
    with pytest.raises(ConfigError, match="rename the variant"):
        Sweep(changed, train_fn=FakeTrainer(tiny_world / "pi_ref"), progress=False).run()


@pytest.mark.slow
def test_a_sweep_is_deterministic_on_one_machine(tiny_world, tmp_path):
    """The same sweep (real trainer, sampling, evaluation) twice into two directories: every metric equal."""
    results = []
    for name in ("a", "b"):
        config = _config(tiny_world, tmp_path / name, losses=["chipo"], seeds=[0], epochs=1)
        rows = Sweep(config, progress=False).run()
        results.append({(r["loss"], r["epoch"]): {k: v for k, v in r.items() if not k.endswith("seconds")}
                        for r in rows})
    assert results[0] == results[1]


@pytest.mark.slow
def test_a_real_sweep_keeps_checkpoints_only_at_the_evaluated_epochs(tiny_world, tmp_path):
    """epochs=3, eval_epochs=[1, 3]: the trainer saves per epoch, the sweep's callback drops epoch 2's checkpoint
    (nothing would read it), and epochs 1 and 3 are evaluated from their own checkpoints."""
    from chipo.lab.runs import checkpoints_by_epoch

    config = _config(tiny_world, tmp_path / "sweep", losses=["dpo"], seeds=[0], epochs=3, eval_epochs=[1, 3],
                     keep_checkpoints=True)
    rows = Sweep(config, progress=False).run()
    assert sorted(r["epoch"] for r in rows if r["loss"] == "dpo") == [1, 3]
    run_dir = next((tmp_path / "sweep" / "runs").iterdir())
    assert sorted(checkpoints_by_epoch(run_dir)) == [1, 3]


def test_save_at_epochs_vetoes_only_unlisted_epochs_before_the_last():
    """The callback turns a pending epoch-end save off at epoch 2 of 4 (not listed), keeps it at 1 (listed) and at
    4 (the last), and never turns a save on."""
    from types import SimpleNamespace

    from chipo.lab.runs import save_at_epochs

    callback, args = save_at_epochs([1]), SimpleNamespace(num_train_epochs=4)
    decisions = {}
    for epoch, pending in ((1, True), (2, True), (3, False), (4, True)):
        control = SimpleNamespace(should_save=pending)
        decisions[epoch] = callback.on_epoch_end(args, SimpleNamespace(epoch=float(epoch)), control).should_save
    assert decisions == {1: True, 2: False, 3: False, 4: True}
