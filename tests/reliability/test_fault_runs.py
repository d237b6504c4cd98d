"""Fault injection on whole ``chipo train`` runs: kill -9 and resume, reruns, two runs on one output_dir.

The reference run trains 6 optimizer steps (32 rows, batch 8: 4 steps per epoch, so step 3 and the finish at
step 6 are both mid-epoch), checkpointing every 3 steps, logging every step. A killed run resumed with
``resume_from_checkpoint=latest`` must log the same per-step losses as the uninterrupted run (Trainer restores
weights, optimizer, scheduler, RNG and data position; abs 1e-6 allows fp32 round-off) and end on the same weights.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chipo.cli.main import main

pytestmark = pytest.mark.slow
KILLER = Path(__file__).with_name("_kill_at.py")


def _args(tiny_dir, out, *overrides):
    return ["train", f"model={tiny_dir / 'model'}", f"dataset={tiny_dir / 'train.jsonl'}", f"output_dir={out}",
            f"ref_cache_dir={tiny_dir / 'cache'}", "per_device_train_batch_size=8", "learning_rate=2e-3",
            "loss=chipo", "max_steps=6", "save_strategy=steps", "save_steps=3", "logging_steps=1",
            "disable_tqdm=true", *overrides]


def _killed(tiny_dir, out, spec):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, str(KILLER), spec, *_args(tiny_dir, out)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]  # died by SIGKILL at the injected point, not otherwise


def _steps(out):
    """{step: (loss, grad_norm)} of the training records; a repeated step would be a resume bug."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r and "grad_norm" in r]
    steps = [r["step"] for r in train]
    assert len(steps) == len(set(steps)), f"repeated steps in metrics.jsonl: {steps}"
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in train}


def _assert_same_run(a, b):
    sa, sb = _steps(a), _steps(b)
    assert sorted(sa) == sorted(sb) == list(range(1, 7))
    for step in sa:
        assert sa[step] == pytest.approx(sb[step], abs=1e-6), step
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def reference_run(tiny_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "uninterrupted"
    assert main(_args(tiny_dir, out)) == 0
    return out


def test_kill_9_then_resume_latest_matches_the_uninterrupted_run(tiny_dir, tmp_path, reference_run, caplog):
    """A real SIGKILL as step 5 begins (steps 1-4 logged, checkpoint-3 saved), plus what a kill inside the save of
    checkpoint-6 leaves (its weights written, no optimizer state, no trainer_state.json: Trainer writes that
    last). Resume must skip the partial checkpoint-6, resume checkpoint-3, cut metrics.jsonl back to step 3 and
    train steps 4-6 again, exactly as the uninterrupted run did."""
    out = tmp_path / "killed"
    _killed(tiny_dir, out, "step:5")
    assert (out / "checkpoint-3" / "trainer_state.json").is_file() and sorted(_steps(out)) == [1, 2, 3, 4]
    partial = out / "checkpoint-6"
    partial.mkdir()
    for name in ("model.safetensors", "config.json", "generation_config.json"):
        shutil.copy(reference_run / "checkpoint-6" / name, partial / name)
    with caplog.at_level(logging.INFO):
        assert main(_args(tiny_dir, out, "resume_from_checkpoint=latest")) == 0
    assert "skipping partial checkpoint" in caplog.text and "metrics.jsonl cut back to step 3" in caplog.text
    assert (partial / "trainer_state.json").is_file()  # saved again, whole, by the resumed run
    _assert_same_run(reference_run, out)


def test_finished_run_resumed_again_has_nothing_to_do(tiny_dir, tmp_path, reference_run, caplog):
    """max_steps=6 ends mid-epoch 2; Trainer alone would resume checkpoint-6 and train a 7th step."""
    out = tmp_path / "again"
    shutil.copytree(reference_run, out)
    before = (out / "metrics.jsonl").read_bytes()
    with caplog.at_level(logging.INFO):
        assert main(_args(tiny_dir, out, "resume_from_checkpoint=latest")) == 0
    assert "nothing to do" in caplog.text
    assert (out / "metrics.jsonl").read_bytes() == before and not (out / "checkpoint-7").exists()


def test_kill_during_the_final_save_is_completed_on_rerun(tiny_dir, tmp_path, reference_run):
    """What a kill while the final model is being saved leaves: the whole run up to checkpoint-6, the final model
    in a hidden .final-* folder (it is built there and moved into place) and none in output_dir. The rerun
    removes the leftovers and writes the final model from checkpoint-6 without training."""
    out = tmp_path / "final"
    shutil.copytree(reference_run, out)
    hidden = out / ".final-k1ll3d"
    hidden.mkdir()
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", ".run-complete.json"):
        if (out / name).exists():
            os.replace(out / name, hidden / name)
    before = (out / "metrics.jsonl").read_bytes()
    assert main(_args(tiny_dir, out, "resume_from_checkpoint=latest")) == 0
    assert not hidden.exists() and (out / "metrics.jsonl").read_bytes() == before
    _assert_same_run(reference_run, out)


def test_overwrite_clears_the_old_run(tiny_dir, tmp_path, reference_run):
    out = tmp_path / "over"
    shutil.copytree(reference_run, out)
    assert main(_args(tiny_dir, out, "overwrite_output_dir=true", "max_steps=2", "save_steps=2")) == 0
    assert sorted(_steps(out)) == [1, 2]
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


@pytest.mark.parametrize("change,needle", [("beta=0.3", "beta was 0.1"), ("loss=dpo", "loss was 'chipo'")])
def test_resume_with_another_objective_is_refused(tiny_dir, tmp_path, reference_run, capsys, change, needle):
    out = tmp_path / "changed"
    shutil.copytree(reference_run, out)
    assert main(_args(tiny_dir, out, "resume_from_checkpoint=latest", "max_steps=9", change)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("chipo: error: resume_from_checkpoint") and needle in err[-1]


def test_symlinked_metrics_and_dangling_output_dir_are_one_line_errors(tiny_dir, tmp_path, capsys):
    out = tmp_path / "linked"
    out.mkdir()
    target = tmp_path / "precious.txt"
    target.write_text("keep\n")
    (out / "metrics.jsonl").symlink_to(target)
    assert main(_args(tiny_dir, out, "overwrite_output_dir=true")) == 2
    assert "metrics.jsonl is a symlink" in capsys.readouterr().err and target.read_text() == "keep\n"
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere")
    assert main(_args(tiny_dir, dangling)) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"chipo: error: output_dir {dangling} is a symlink to {tmp_path / 'nowhere'}, which does not exist")


def test_eval_split_the_file_lacks_is_a_one_line_error(tiny_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    assert main(_args(tiny_dir, out, "eval_split=validation")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"chipo: error: {tiny_dir / 'train.jsonl'}: unknown split 'validation'; available splits: train"
    assert not out.exists()


def test_ctrl_c_is_one_line_naming_the_checkpoint_and_the_resume_command(tiny_dir, tmp_path):
    """SIGINT as step 5 begins (checkpoint-3 saved): exit 130, and the last stderr line names checkpoint-3 and the
    exact command that resumes; no traceback."""
    out = tmp_path / "interrupted"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, str(KILLER), "sigint:5", *_args(tiny_dir, out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("chipo: interrupted; last checkpoint: ") and "checkpoint-3" in last, last
    assert last.endswith("resume_from_checkpoint=latest") and "chipo train " in last
    assert "Traceback" not in proc.stderr


def test_kill_9_during_reference_precompute_then_rerun_matches(tiny_dir, tmp_path, reference_run):
    """SIGKILL right after the reference cache entry's temporary file is written, before it is renamed into place:
    no entry exists, so the rerun recomputes the reference log-probs and trains exactly the uninterrupted run."""
    out, cache = tmp_path / "killed-in-precompute", tmp_path / "fresh-cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, str(KILLER), "precompute", *_args(tiny_dir, out), f"ref_cache_dir={cache}"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not list(cache.rglob("*.safetensors"))  # only the temporary file was written
    assert main([*_args(tiny_dir, out), f"ref_cache_dir={cache}", "resume_from_checkpoint=latest"]) == 0
    _assert_same_run(out, reference_run)


def test_kill_9_during_a_checkpoint_save_then_resume_latest_matches(tiny_dir, tmp_path, reference_run):
    """A real SIGKILL inside the save of checkpoint-6 (weights written, optimizer and trainer_state not): resume must
    skip that partial checkpoint, resume checkpoint-3 and end exactly as the uninterrupted run."""
    out = tmp_path / "killed-in-save"
    _killed(tiny_dir, out, "save:6")
    partial = out / "checkpoint-6"
    assert partial.is_dir() and not (partial / "trainer_state.json").exists()
    assert main([*_args(tiny_dir, out), "resume_from_checkpoint=latest"]) == 0
    _assert_same_run(out, reference_run)
