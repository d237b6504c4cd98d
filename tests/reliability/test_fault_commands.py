"""The run-directory protocol (``chipo.train.rundir.open_run``) under every command that writes a run: ``chipo
train``, ``sft``, ``reward`` (``transformers.Trainer``) and ``rl``, ``online`` (``chipo.train.sampled``).

Each case is one fault a user meets: a second run on a busy output_dir, overwrite then resume, resuming a finished
run, resuming with another objective, resuming after the last checkpoint (metrics cut back), a rerun that must
repeat the run (seed), a run that fails before its first step (the same command must simply run again), Ctrl-C, a
failing reward function, a tracker that is not installed and a full disk.
Every run is tiny: 4 optimizer steps of the tiny Llama, checkpoints every 2 steps, metrics every step.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from chipo.cli.main import main
from chipo.io import read_jsonl, write_jsonl

pytestmark = pytest.mark.slow
COMMANDS = ("train", "sft", "reward", "rl", "online")
KILLER = Path(__file__).with_name("_kill_at.py")
FAIL = {"armed": False}


def length_reward(prompts, responses):
    """Longer responses score higher (``test_fault_commands:length_reward``)."""
    return [0.1 * len(r) for r in responses]


def failing_reward(prompts, responses):
    """Like ``length_reward``, but raises once ``FAIL['armed']`` is set (after the pre-flight call)."""
    if FAIL["armed"]:
        raise RuntimeError("the reward server went away")
    FAIL["armed"] = True
    return length_reward(prompts, responses)


@pytest.fixture(scope="module")
def data(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    rows = read_jsonl(tiny_dir / "train.jsonl")
    write_jsonl(root / "sft.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows])
    write_jsonl(root / "sft2.jsonl", [{"prompt": r["prompt"], "completion": r["rejected"]} for r in rows])
    write_jsonl(root / "prompts.jsonl", [{"prompt": r["prompt"]} for r in rows[:8]])
    write_jsonl(root / "prefs2.jsonl", read_jsonl(tiny_dir / "test.jsonl"))
    return root


def args(command, tiny_dir, data, out, *extra, reward="length_reward"):
    """A 4-step run of ``command`` checkpointing every 2 steps."""
    common = [f"output_dir={out}", "max_steps=4", "save_strategy=steps", "save_steps=2", "logging_steps=1",
              "disable_tqdm=true", "learning_rate=1e-3", "save_total_limit=5"]
    fn = f"test_fault_commands:{reward}"
    specific = {
        "train": [f"model={tiny_dir / 'model'}", f"dataset={tiny_dir / 'train.jsonl'}", "loss=chipo",
                  f"ref_cache_dir={tiny_dir / 'cache'}", "per_device_train_batch_size=8"],
        "sft": [f"model={tiny_dir / 'model'}", f"dataset={data / 'sft.jsonl'}", "per_device_train_batch_size=8"],
        "reward": [f"model={tiny_dir / 'model'}", f"dataset={tiny_dir / 'train.jsonl'}",
                   "per_device_train_batch_size=8"],
        "rl": [f"policy={tiny_dir / 'model'}", f"prompts={data / 'prompts.jsonl'}", f"reward={fn}", "k=2",
               "prompts_per_step=2", "max_new_tokens=4"],
        "online": [f"policy={tiny_dir / 'model'}", f"prompts={data / 'prompts.jsonl'}", f"judge={fn}",
                   "prompts_per_step=2", "max_new_tokens=4", "loss=chipo"],
    }[command]
    return [command, *specific, *common, *extra]


# Per command, the keys whose change is a different objective, each with a value that changes it.
OBJECTIVE_CHANGES = {"train": ["beta=0.3", "loss=dpo"], "sft": ["dataset={data}/sft2.jsonl"],
                     "reward": ["dataset={data}/prefs2.jsonl"], "rl": ["regularizer=kl", "beta=0.3"],
                     "online": ["beta=0.3", "loss=dpo"]}


def train_steps(out) -> list[int]:
    records = [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r and "grad_norm" in r]
    return [r["step"] for r in records]


def losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(out / "metrics.jsonl") if "loss" in r and "grad_norm" in r}


def checkpoints(out) -> list[str]:
    return sorted((p.name for p in out.glob("checkpoint-*")), key=lambda n: int(n.split("-")[1]))


@pytest.fixture(scope="module")
def finished(tiny_dir, data, tmp_path_factory):
    """One uninterrupted 4-step run per command."""
    runs = {}
    for command in COMMANDS:
        out = tmp_path_factory.mktemp("finished") / command
        assert main(args(command, tiny_dir, data, out)) == 0, command
        assert train_steps(out) == [1, 2, 3, 4] and checkpoints(out) == ["checkpoint-2", "checkpoint-4"], command
        runs[command] = out
    return runs


@pytest.mark.parametrize("command", COMMANDS)
def test_second_run_on_a_busy_output_dir_is_refused(tiny_dir, data, tmp_path, capsys, command):
    """Another process holds output_dir's lock: exit 2, one line, nothing written."""
    out = tmp_path / "busy"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('locked', flush=True); time.sleep(300)",
                               str(out / ".lock")], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        assert main(args(command, tiny_dir, data, out, "overwrite_output_dir=true")) == 2
    finally:
        holder.kill()
        holder.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("chipo: error: output_dir") and "in use by another run" in err[-1]
    assert sorted(p.name for p in out.iterdir()) == [".lock"]


@pytest.mark.parametrize("command", COMMANDS)
def test_overwrite_clears_the_old_run_and_resume_takes_the_new_one(tiny_dir, data, tmp_path, finished, command):
    """overwrite_output_dir removes the old run's checkpoints, metrics and model; a later resume=latest continues
    the new run (its checkpoint-2), never the old run's checkpoint-4."""
    out = tmp_path / "over"
    shutil.copytree(finished[command], out)
    assert main(args(command, tiny_dir, data, out, "overwrite_output_dir=true", "max_steps=2")) == 0
    assert train_steps(out) == [1, 2] and checkpoints(out) == ["checkpoint-2"]
    assert main(args(command, tiny_dir, data, out, "resume_from_checkpoint=latest")) == 0
    assert train_steps(out) == [1, 2, 3, 4] and checkpoints(out) == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.parametrize("command", COMMANDS)
def test_finished_run_resumed_again_has_nothing_to_do(tiny_dir, data, tmp_path, finished, caplog, command):
    out = tmp_path / "again"
    shutil.copytree(finished[command], out)
    before = (out / "metrics.jsonl").read_bytes()
    with caplog.at_level("INFO"):
        assert main(args(command, tiny_dir, data, out, "resume_from_checkpoint=latest")) == 0
    assert "nothing to do" in caplog.text
    assert (out / "metrics.jsonl").read_bytes() == before and checkpoints(out) == ["checkpoint-2", "checkpoint-4"]


@pytest.mark.parametrize("command,change", [(c, k) for c in COMMANDS for k in OBJECTIVE_CHANGES[c]])
def test_resume_with_another_objective_is_refused(tiny_dir, data, tmp_path, finished, capsys, command, change):
    out = tmp_path / "changed"
    shutil.copytree(finished[command], out)
    saved = (out / "run_config.yaml").read_bytes()
    change = change.format(data=data)
    assert main(args(command, tiny_dir, data, out, "resume_from_checkpoint=latest", "max_steps=6", change)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("chipo: error: resume_from_checkpoint") and "the objective changed" in err[-1]
    assert change.split("=")[0] in err[-1]
    assert (out / "run_config.yaml").read_bytes() == saved


@pytest.mark.parametrize("command", COMMANDS)
def test_resume_cuts_metrics_back_and_retraces_the_run(tiny_dir, data, tmp_path, finished, caplog, command):
    """What a kill after step 4 was logged but before checkpoint-4 was renamed into place leaves: steps 1-4 in
    metrics.jsonl, checkpoint-2. Resume cuts the log back to step 2 and trains steps 3-4 again, as the uninterrupted
    run did (losses to 1e-5), ending on its weights."""
    out = tmp_path / "cut"
    shutil.copytree(finished[command], out)
    for name in ("checkpoint-4", "model.safetensors", ".run-complete.json"):
        path = out / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    with caplog.at_level("INFO"):
        assert main(args(command, tiny_dir, data, out, "resume_from_checkpoint=latest")) == 0
    assert "metrics.jsonl cut back to step 2" in caplog.text
    assert train_steps(out) == [1, 2, 3, 4]
    a, b = losses(finished[command]), losses(out)
    for step in a:
        assert a[step] == pytest.approx(b[step], abs=1e-5), step
    wa, wb = load_file(str(finished[command] / "model.safetensors")), load_file(str(out / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-5, rtol=0)


@pytest.mark.parametrize("command", COMMANDS)
def test_the_same_seed_gives_the_same_run_and_another_seed_another(tiny_dir, data, tmp_path, finished, command):
    """``seed`` fixes everything a run draws (chipo reward's fresh score head, the data order, rl / online samples):
    the finished run's command run again (the command's default seed) ends on the same weights bit for bit, with
    the same losses; with seed=7 (no command's default) the weights differ."""
    same, other = tmp_path / "same", tmp_path / "other"
    assert main(args(command, tiny_dir, data, same)) == 0
    assert main(args(command, tiny_dir, data, other, "seed=7")) == 0
    assert losses(same) == losses(finished[command])
    first = load_file(str(finished[command] / "model.safetensors"))
    for name, weights in load_file(str(same / "model.safetensors")).items():
        torch.testing.assert_close(weights, first[name], atol=0, rtol=0, msg=name)
    changed = load_file(str(other / "model.safetensors"))
    assert any(not torch.equal(changed[name], first[name]) for name in first)


class _Boom(RuntimeError):
    pass


@pytest.mark.parametrize("command", COMMANDS)
def test_a_run_that_fails_before_its_first_step_leaves_nothing(tiny_dir, data, tmp_path, monkeypatch, command):
    """An error in the first optimizer step: the output_dir the run created is removed again, so rerunning the
    same command works (before, run_config.yaml stayed and the rerun failed with "not empty")."""
    import transformers

    from chipo.train.sampled import SampledTrainer

    def boom(*a, **k):
        raise _Boom("step 1 failed")

    out = tmp_path / "fresh"
    with monkeypatch.context() as patch:
        patch.setattr(transformers.Trainer, "training_step", boom)
        patch.setattr(SampledTrainer, "train_step", boom)
        with pytest.raises(_Boom):
            main(args(command, tiny_dir, data, out))
    assert not out.exists()
    assert main(args(command, tiny_dir, data, out, "max_steps=2")) == 0
    assert train_steps(out) == [1, 2]


@pytest.mark.parametrize("command", ["rl", "online"])
def test_an_exception_from_the_reward_function_is_one_line(tiny_dir, data, tmp_path, capsys, command):
    out = tmp_path / "reward-fails"
    FAIL["armed"] = False
    assert main(args(command, tiny_dir, data, out, reward="failing_reward")) == 2
    err = [line for line in capsys.readouterr().err.splitlines()
           if line.strip() and not line.startswith(("Loading", "Writing"))]
    assert len(err) == 1 and "RuntimeError: the reward server went away" in err[0], err
    assert err[0].startswith("chipo: error: ") and not out.exists()


@pytest.mark.parametrize("command", COMMANDS)
def test_ctrl_c_names_the_last_checkpoint_and_the_resume_command(tiny_dir, data, tmp_path, command):
    """SIGINT as step 4 begins (checkpoint-2 saved): exit 130; the last line names checkpoint-2 and the command."""
    out = tmp_path / "interrupted"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path])}
    proc = subprocess.run([sys.executable, str(KILLER), "sigint:4", *args(command, tiny_dir, data, out)], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 130, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("chipo: interrupted; last checkpoint: ") and "checkpoint-2" in last, last
    assert last.endswith("resume_from_checkpoint=latest") and f"chipo {command} " in last
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("command", COMMANDS)
def test_report_to_a_tracker_that_is_not_installed_is_one_line(tiny_dir, data, tmp_path, capsys, command):
    import importlib.util

    if importlib.util.find_spec("tensorboard") or importlib.util.find_spec("tensorboardX"):
        pytest.skip("tensorboard is installed here")
    out = tmp_path / "tb"
    assert main(args(command, tiny_dir, data, out, "report_to=tensorboard")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("chipo: error: report_to=tensorboard needs the 'tensorboard'"), err
    assert not out.exists()


@pytest.fixture
def small_disk(tmp_path, tiny_dir):
    """A tmpfs with room for the tiny model once but not for a checkpoint with its optimizer state (root only)."""
    where = tmp_path / "disk"
    where.mkdir()
    size = int((tiny_dir / "model" / "model.safetensors").stat().st_size * 1.5) + 2**20
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)], capture_output=True)
    if proc.returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.parametrize("command", COMMANDS)
def test_a_full_disk_is_one_line(tiny_dir, data, tmp_path, small_disk, capsys, command):
    out = small_disk / "run"
    assert main(args(command, tiny_dir, data, out, "save_steps=1")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("chipo: error: No space left on device"), err[-3:]
    assert "Traceback" not in "\n".join(err)
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1  # the log is intact
