"""chipo.train.rundir on hand-built run directories: complete checkpoints, cleaning, metrics, lock, resume checks."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import save_file

from chipo.config import ConfigError
from chipo.train import rundir


def make_checkpoint(out, step, *, state=True, torn=None):
    """A checkpoint as Trainer writes it (weights, optimizer, rng, then trainer_state.json last), optionally with
    one file cut in half (``torn``) or without trainer_state.json (killed before it was written)."""
    path = out / f"checkpoint-{step}"
    path.mkdir(parents=True)
    save_file({"w": torch.arange(64, dtype=torch.float32)}, str(path / "model.safetensors"))
    (path / "config.json").write_text('{"model_type": "llama"}')
    torch.save({"state": torch.ones(16)}, path / "optimizer.pt")
    torch.save({"python": 1}, path / "rng_state.pth")
    if state:
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": 6}))
    if torn:
        data = (path / torn).read_bytes()
        (path / torn).write_bytes(data[: len(data) // 2])
    return path


def test_latest_complete_checkpoint_skips_partial_ones(tmp_path, caplog):
    good = make_checkpoint(tmp_path, 2)
    make_checkpoint(tmp_path, 4, state=False)
    make_checkpoint(tmp_path, 6, torn="model.safetensors")
    make_checkpoint(tmp_path, 8, torn="trainer_state.json")
    make_checkpoint(tmp_path, 10, torn="optimizer.pt")
    make_checkpoint(tmp_path, 12, torn="config.json")
    (tmp_path / "checkpoint-14").write_text("a file, not a checkpoint")
    assert rundir.latest_complete_checkpoint(tmp_path) == good
    skipped = [r.getMessage() for r in caplog.records if "partial checkpoint" in r.getMessage()]
    assert len(skipped) == 5  # five partial checkpoints
    assert rundir.checkpoint_problem(tmp_path / "checkpoint-4") == "trainer_state.json missing"
    assert rundir.checkpoint_problem(tmp_path / "checkpoint-6") == "incomplete file(s): model.safetensors"


def test_no_checkpoint_at_all(tmp_path):
    assert rundir.latest_complete_checkpoint(tmp_path) is None
    assert rundir.latest_complete_checkpoint(tmp_path / "missing") is None


def test_clean_stale_removes_only_interrupted_writes(tmp_path):
    (tmp_path / ".final-abc123").mkdir()
    (tmp_path / ".final-abc123" / "model.safetensors").write_bytes(b"half")
    (tmp_path / ".run_config.yaml.x1.tmp").write_text("half")
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "checkpoint-3").mkdir()
    assert rundir.clean_stale(tmp_path) == [".final-abc123", ".run_config.yaml.x1.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-3", "notes.txt"]


def test_clear_run_removes_the_previous_run_but_not_other_files(tmp_path):
    make_checkpoint(tmp_path, 3)
    for name in ("metrics.jsonl", "run_config.yaml", "model.safetensors", "config.json", "notes.txt", ".lock"):
        (tmp_path / name).write_text("x")
    (tmp_path / "adapter").mkdir()
    rundir.clear_run(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".lock", "notes.txt"]


def test_truncate_metrics_keeps_steps_up_to_the_checkpoint(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": s, "loss": 1.0 / s} for s in range(1, 6)] + [{"step": 3, "eval_loss": 0.5}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + '{"step": 6, "lo')  # torn by the kill
    assert rundir.truncate_metrics(path, 3) == 3  # steps 4, 5 and the torn line
    kept = [json.loads(line) for line in path.read_text().splitlines()]
    assert kept == [r for r in records if r["step"] <= 3]


def test_metrics_log_does_not_follow_a_symlink(tmp_path):
    target = tmp_path / "elsewhere.txt"
    target.write_text("precious\n")
    (tmp_path / "metrics.jsonl").symlink_to(target)
    log = rundir.MetricsLog(tmp_path / "metrics.jsonl")
    state = type("S", (), {"is_world_process_zero": True, "global_step": 1, "epoch": 0.1})()
    with pytest.raises(ConfigError, match="is a symlink; refusing"):
        log.on_log(None, state, None, logs={"loss": 1.0})
    with pytest.raises(ConfigError, match="is a symlink; refusing"):
        rundir.truncate_metrics(tmp_path / "metrics.jsonl", 0)
    assert target.read_text() == "precious\n"


def test_dangling_symlink_output_dir_is_one_line(tmp_path):
    link = tmp_path / "out"
    link.symlink_to(tmp_path / "gone")
    with pytest.raises(ConfigError) as info:
        rundir.check_output_path(link)
    assert str(info.value) == f"output_dir {link} is a symlink to {tmp_path / 'gone'}, which does not exist"


def test_second_run_on_the_same_directory_is_refused_until_the_first_releases(tmp_path):
    first = rundir.open_run(tmp_path, {}, resume=None, overwrite=False)
    with pytest.raises(ConfigError, match="is in use by another run"):
        rundir.open_run(tmp_path, {}, resume=None, overwrite=False)
    first.release()
    rundir.open_run(tmp_path, {}, resume=None, overwrite=False).release()


def _saved_run(tmp_path, **config):
    base = {"model": "m", "dataset": "d.jsonl", "loss": "chipo", "beta": 0.1, "max_steps": 6,
            "num_train_epochs": 1.0, "per_device_train_batch_size": 8, "gradient_accumulation_steps": 1}
    (tmp_path / "run_config.yaml").write_text(yaml.safe_dump({**base, **config}))
    return base


@pytest.mark.parametrize("key,value", [("beta", 0.2), ("loss", "dpo"), ("dataset", "other.jsonl"), ("model", "x")])
def test_resume_refuses_a_changed_objective_naming_the_key(tmp_path, key, value):
    base = _saved_run(tmp_path)
    make_checkpoint(tmp_path, 3)
    with pytest.raises(ConfigError) as info:
        rundir.open_run(tmp_path, {**base, key: value}, resume="latest", overwrite=False)
    assert f"the objective changed ({key} was {base[key]!r}" in str(info.value)
    # the refused run released its lock: the same settings resume
    run = rundir.open_run(tmp_path, base, resume="latest", overwrite=False)
    assert run.checkpoint == str(tmp_path / "checkpoint-3") and not run.finished
    run.release()


def test_finished_when_the_checkpoint_reached_max_steps(tmp_path):
    base = _saved_run(tmp_path)
    make_checkpoint(tmp_path, 6)
    (tmp_path / "metrics.jsonl").write_text('{"step": 6, "loss": 1.0}\n')
    run = rundir.open_run(tmp_path, base, resume="latest", overwrite=False)
    assert run.finished
    run.release()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 6, "loss": 1.0}\n'
    # a longer run (max_steps raised) continues from the same checkpoint
    run = rundir.open_run(tmp_path, {**base, "max_steps": 9}, resume="latest", overwrite=False)
    assert not run.finished
    run.release()


def test_explicit_partial_checkpoint_is_refused(tmp_path):
    partial = make_checkpoint(tmp_path, 3, state=False)
    with pytest.raises(ConfigError, match=r"not a complete checkpoint \(trainer_state.json missing\)"):
        rundir.open_run(tmp_path, {}, resume=str(partial), overwrite=False)
