"""chipo rl on accelerate: 2-process DDP equals 1 process; kill -9 then resume equals an uninterrupted run.

DDP (gloo on CPU): prompts_per_step = 4 over 2 processes (2 each) vs 4 on one process, generation_batch_size = 4
with k = 2, i.e. sampling chunks of 2 prompts, each seeded by (seed, step, position of its first prompt): both runs
draw the same samples. The micro-batch loss is a mean over prompts and DDP averages the two processes' gradients,
(1/2)(g_0 + g_1) with g_r = (1/2) sum_{i in r} grad loss_i, which is (1/4) sum_i grad loss_i: the one-process
gradient. Per-step metrics therefore agree to the round-off of the all-reduce and of different batch padding
(abs 1e-5); the tiny Llama has no dropout.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from chipo.cli.rl import main as rl_main
from chipo.io import read_jsonl

HERE = Path(__file__).parent
METRICS = ("loss", "reward", "penalized_reward", "penalty", "kl_k1", "kl_k3", "chi2", "grad_norm", "response_length")


def length_reward(prompts, responses):
    """Shorter responses score higher."""
    return [-len(r) / 20.0 for r in responses]


def slow_length_reward(prompts, responses):
    """``length_reward``, slowly: a run of a few steps lasts long enough to be killed mid-way."""
    time.sleep(0.4)
    return length_reward(prompts, responses)


@pytest.fixture(scope="module")
def prompts(tiny_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("rl_dist") / "prompts.jsonl"
    rows = [json.loads(line) for line in open(tiny_dir / "train.jsonl")]
    path.write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows[:8]))
    return path


def _env():
    paths = [str(HERE), str(HERE.parent / "src"), os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


def _common(tiny_dir, prompts, out, reward="length_reward"):
    return [f"policy={tiny_dir / 'model'}", f"prompts={prompts}", f"output_dir={out}",
            f"reward=test_rl_distributed:{reward}", "k=2", "max_new_tokens=6", "learning_rate=1e-3",
            "disable_tqdm=true", "seed=3", "regularizer=chi2mix", "beta=0.1"]


def _steps(out):
    return [r for r in read_jsonl(out / "metrics.jsonl") if "loss" in r]


def _weights(directory):
    return AutoModelForCausalLM.from_pretrained(directory).state_dict()


LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "chipo.cli.main", "rl"]


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tiny_dir, prompts, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    args = ["max_steps=3", "prompts_per_step=4", "generation_batch_size=4", "save_strategy=no"]
    assert rl_main([*_common(tiny_dir, prompts, one), *args]) == 0
    # On a CPU-only machine accelerate's --multi_gpu launcher is torchrun; chipo asks for use_cpu, so gloo DDP.
    proc = subprocess.run([*LAUNCH, *_common(tiny_dir, prompts, two), *args], env=_env(), capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = _steps(one), _steps(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for name in METRICS:
            assert ra[name] == pytest.approx(rb[name], abs=1e-5), (ra["step"], name)
    assert a[-1]["kl_k1"] != 0  # the policy moved: later steps compare trained policies, not pi_ref twice



@pytest.mark.slow
def test_kill_9_then_resume_matches_uninterrupted_and_finished_run_is_left_alone(tiny_dir, prompts, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"
    args = ["max_steps=6", "prompts_per_step=2", "save_steps=2", "save_total_limit=2"]
    assert rl_main([*_common(tiny_dir, prompts, full), *args]) == 0

    proc = subprocess.Popen([sys.executable, "-m", "chipo.cli.main", "rl",
                             *_common(tiny_dir, prompts, killed, "slow_length_reward"), *args],
                            env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not (killed / "checkpoint-2").is_dir() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    steps_at_kill = [r["step"] for r in _steps(killed)]
    assert steps_at_kill[:2] == [1, 2] and steps_at_kill[-1] < 6  # killed mid-run

    resume = [*_common(tiny_dir, prompts, killed, "slow_length_reward"), *args, "resume_from_checkpoint=latest"]
    assert rl_main(resume) == 0
    a, b = _steps(full), _steps(killed)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]  # no repeated steps
    for ra, rb in zip(a, b):
        for name in METRICS:
            assert ra[name] == pytest.approx(rb[name], abs=1e-6), (ra["step"], name)
    wa, wb = _weights(full), _weights(killed)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6, rtol=0) for k in wa)
    assert sorted(p.name for p in killed.glob("*checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]

    # Resuming the finished run does nothing: no extra step, no new checkpoint, the same final weights.
    log = (killed / "metrics.jsonl").read_text()
    assert rl_main(resume) == 0
    assert (killed / "metrics.jsonl").read_text() == log
    assert sorted(p.name for p in killed.glob("*checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert all(torch.equal(wb[k], v) for k, v in _weights(killed).items())
