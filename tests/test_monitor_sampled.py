"""The overoptimization monitor in ``chipo rl`` and ``chipo online`` (the shared sampled-data loop), through the real
CLI on the tiny Llama: its signals reach metrics.jsonl and monitor.jsonl at each evaluation, an alarm rule that must
fire stops the run under ``monitor=stop`` and is named in monitor.json, a rule that cannot fire stays quiet, and
``monitor=off`` measures nothing."""

import json

import pytest

from chipo.cli.main import main
from chipo.io import read_jsonl, write_jsonl
from test_sampled_loop import PROMPTS


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("monitored") / "prompts.jsonl"
    write_jsonl(path, [{"prompt": p} for p in PROMPTS])
    return path


def run(command, tiny_dir, prompts, out, *extra):
    judge = ["judge=test_sampled_loop:length_reward"] if command == "online" else \
        ["reward=test_sampled_loop:length_reward", "k=2"]
    base = [f"policy={tiny_dir / 'model'}", f"prompts={prompts}", "max_new_tokens=6", "prompts_per_step=4",
            "max_steps=3", "learning_rate=1e-3", "disable_tqdm=true", "save_steps=0", f"output_dir={out}",
            "eval_steps=1", "max_eval_prompts=4", "monitor_prompts=2", "monitor_samples=2",
            "monitor_max_new_tokens=6"]
    return main([command, *base, *judge, *extra])


@pytest.mark.parametrize("command", ["rl", "online"])
def test_an_alarm_that_must_fire_stops_the_run(command, tiny_dir, prompts, tmp_path):
    """KL >= 0 up to Monte-Carlo noise, so 'kl_k3>-1' (k3 >= 0 exactly) fires at the first evaluation (step 0, pi =
    pi_ref); monitor=stop then ends the run after step 1 (the loop checks its control after each step)."""
    out = tmp_path / "run"
    assert run(command, tiny_dir, prompts, out, "monitor=stop", "monitor_rules=[kl_k3>-1]") == 0
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1]
    assert all("monitor/off_support" in r and "monitor/kl_k3" in r for r in rows)
    summary = json.loads((out / "monitor.json").read_text())
    assert summary["alarm"]["step"] == 0 and "kl_k3" in summary["alarm"]["reason"]
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("command", ["rl", "online"])
def test_a_rule_that_cannot_fire_stays_quiet(command, tiny_dir, prompts, tmp_path):
    """off_support is a fraction, so "off_support>1" never fires: every evaluation logged, no alarm, all steps run."""
    out = tmp_path / "run"
    assert run(command, tiny_dir, prompts, out, "monitor=stop", "monitor_rules=[off_support>1]") == 0
    rows = read_jsonl(out / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    assert all(r["monitor/alarm"] == 0.0 for r in rows)
    assert len(read_jsonl(out / "monitor.jsonl")) == 4
    assert json.loads((out / "monitor.json").read_text())["alarm"] is None


def test_online_eval_steps_without_the_monitor_is_refused(tiny_dir, prompts, tmp_path, capsys):
    out = tmp_path / "run"
    assert run("online", tiny_dir, prompts, out, "monitor=off") == 2
    assert "monitor=off does nothing" in capsys.readouterr().err
    assert not out.exists()


def test_rl_monitor_off_measures_nothing(tiny_dir, prompts, tmp_path):
    out = tmp_path / "run"
    assert run("rl", tiny_dir, prompts, out, "monitor=off") == 0
    assert not any(key.startswith("monitor/") for r in read_jsonl(out / "metrics.jsonl") for key in r)
    assert not (out / "monitor.jsonl").exists()
