"""OveroptimizationCallback in a training loop: chipo's PreferenceTrainer (the ``monitor`` key) and TRL's
DPOTrainer (a plain callback), on tiny local models."""

from __future__ import annotations

import copy
import json
import logging

import pytest

from chipo.monitor import MonitorSettings, OveroptimizationMonitor
from chipo.train.monitor_callback import OveroptimizationCallback


def _config(tiny_dir, tmp_path, **values):
    from chipo.config import build_config
    from chipo.train.config import PreferenceConfig

    base = dict(model=str(tiny_dir / "model"), dataset=str(tiny_dir / "train.jsonl"),
                eval_dataset=str(tiny_dir / "test.jsonl"), eval_split="train", output_dir=str(tmp_path / "run"),
                ref_cache_dir=str(tmp_path / "cache"), max_steps=4, eval_strategy="steps", eval_steps=2,
                per_device_train_batch_size=8, logging_steps=1, save_strategy="no", loss="dpo", beta=0.1,
                learning_rate=1e-3, monitor_prompts=4, monitor_samples=2, monitor_max_new_tokens=4, report_to="none")
    base.update(values)
    return build_config(PreferenceConfig, base)


def test_monitor_key_validation(tiny_dir, tmp_path):
    from chipo.config import ConfigError

    with pytest.raises(ConfigError, match="monitor must be one of"):
        _config(tiny_dir, tmp_path, monitor="loud")
    with pytest.raises(ConfigError, match="monitor_samples"):
        _config(tiny_dir, tmp_path, monitor_samples=0)
    with pytest.raises(ConfigError, match="SIGNAL>NUMBER"):
        _config(tiny_dir, tmp_path, monitor_rules=["kl?3"])
    # `monitor=off` on the command line: YAML reads off as false.
    from chipo.config import load_config
    from chipo.train.config import PreferenceConfig

    assert load_config(PreferenceConfig, None, ["monitor=off", f"output_dir={tmp_path}"]).monitor == "off"
    assert load_config(PreferenceConfig, None, ["monitor=stop", f"output_dir={tmp_path}"]).monitor == "stop"


def test_chipo_train_logs_signals_and_stops_on_alarm(tiny_dir, tmp_path, caplog):
    """``monitor=stop`` with a rule that fires at the first evaluation (KL > 0 once the policy moved): signals in
    metrics.jsonl and monitor.jsonl, one warning line naming the reason, training stopped at that evaluation,
    monitor.json naming the initial policy (step 0, before the first evaluation) as the monitor's best."""
    from chipo.train.run import run_training

    config = _config(tiny_dir, tmp_path, monitor="stop", monitor_rules=["kl_k3>1e-6"])
    with caplog.at_level(logging.WARNING, logger="chipo"):
        out = run_training(config)
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = [m for m in metrics if "monitor/off_support" in m]
    assert [m["step"] for m in logged] == [2]
    assert logged[0]["monitor/kl_k3"] > 1e-6 and logged[0]["monitor/alarm"] == 1.0
    assert {"monitor/implicit_acc", "monitor/chosen_logratio", "monitor/entropy"} <= set(logged[0])
    # The trainer's own training-window metrics are untouched by the monitor's log calls.
    train_logs = [m for m in metrics if "loss" in m]
    assert [m["step"] for m in train_logs] == [1, 2] and all("rewards/accuracies" in m for m in train_logs)
    assert not any("loss" in m or "rewards/accuracies" in m for m in logged)
    warnings = [r.getMessage() for r in caplog.records if "overoptimization monitor" in r.getMessage()]
    assert len(warnings) == 1 and "kl_k3" in warnings[0] and "step 2" in warnings[0] and "stopping" in warnings[0]
    summary = json.loads((out / "monitor.json").read_text())
    assert summary["alarm"]["step"] == 2 and summary["best_step"] == 0 and summary["evaluations"] == 1
    rows = [json.loads(line) for line in (out / "monitor.jsonl").read_text().splitlines()]
    assert [r["alarm"] is not None for r in rows] == [True]


def test_monitor_log_mode_is_silent_and_idle_without_eval(tiny_dir, tmp_path, caplog):
    """``monitor=log``: the alarm is logged as a flag, no warning, training runs to the end. A rule that never fires
    (KL estimates are finite): no alarm. Without evaluation data the monitor stays idle (no measurements)."""
    from chipo.train.run import run_training

    with caplog.at_level(logging.WARNING, logger="chipo"):
        out = run_training(_config(tiny_dir, tmp_path, monitor="log", monitor_rules=["kl_k3>1e-6"]))
    assert not [r for r in caplog.records if "overoptimization monitor" in r.getMessage()]
    logged = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["monitor/alarm"] for m in logged if "monitor/alarm" in m] == [1.0, 1.0]
    quiet = run_training(_config(tiny_dir, tmp_path / "q", monitor="warn", monitor_rules=["kl_k3>1e9"]))
    assert json.loads((quiet / "monitor.json").read_text())["alarm"] is None
    assert json.loads((quiet / "monitor.json").read_text())["best_step"] == 4
    idle = run_training(_config(tiny_dir, tmp_path / "b", eval_dataset=None, eval_split=None, eval_strategy="no",
                                max_steps=1))
    assert not (idle / "monitor.jsonl").exists()
    assert not any("monitor/kl_k3" in line for line in (idle / "metrics.jsonl").read_text().splitlines())


def test_plain_callback_with_trl_dpo_trainer(tiny_dir, tmp_path):
    """TRL's DPOTrainer with the callback attached: signals reach the trainer's log history (what report_to sees)
    and monitor.jsonl; ``stop`` ends training at the alarm."""
    trl = pytest.importorskip("trl")
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chipo.toy import toy_preference_rows

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "model")
    policy = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    ref = copy.deepcopy(policy).eval()
    train, held = toy_preference_rows(16, seed=0), toy_preference_rows(8, seed=1)
    monitor = OveroptimizationMonitor.from_texts(tokenizer, sorted({r["prompt"] for r in held})[:3], held,
                                                 ref_model=ref, settings=MonitorSettings(num_samples=2,
                                                                                         max_new_tokens=4),
                                                 loss="dpo", beta=0.1)
    callback = OveroptimizationCallback(monitor, mode="stop", rules=["kl_k3>1e-6"])
    args = trl.DPOConfig(output_dir=str(tmp_path / "trl"), beta=0.1, max_length=32, per_device_train_batch_size=4,
                         learning_rate=1e-3, max_steps=6, eval_strategy="steps", eval_steps=2, logging_steps=1,
                         report_to="none", use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0)
    trainer = trl.DPOTrainer(model=policy, ref_model=ref, args=args, train_dataset=datasets.Dataset.from_list(train),
                             eval_dataset=datasets.Dataset.from_list(held), processing_class=tokenizer,
                             callbacks=[callback])
    callback.attach(trainer)
    assert trainer.callback_handler.callbacks.count(callback) == 1
    trainer.train()
    assert trainer.state.global_step == 2  # stopped at the first evaluation's alarm
    logged = [h for h in trainer.state.log_history if "monitor/kl_k3" in h]
    assert [h["step"] for h in logged] == [2] and logged[-1]["monitor/alarm"] == 1.0
    assert (tmp_path / "trl" / "monitor.jsonl").is_file()
    assert callback.summary()["best_step"] == 0


def test_monitor_with_lora_uses_the_adapters_off_policy_as_reference(tiny_dir, tmp_path):
    """LoRA: pi_ref is the policy with its adapters disabled (no copy); adapters start at zero, so right after the
    first step the measured KL is small but the run completes and the signals are finite."""
    import math

    from chipo.train.run import run_training

    out = run_training(_config(tiny_dir, tmp_path, lora=True, lora_r=4, monitor="log", max_steps=2))
    rows = [json.loads(line) for line in (out / "monitor.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2]
    assert all(math.isfinite(v) for k, v in rows[0].items() if isinstance(v, float))


def test_callback_in_the_rl_loop(tiny_dir, tmp_path):
    """``chipo rl``'s accelerate loop calls the TrainerCallback hooks: the monitor, passed as a plain callback
    (``run_rl(config, callbacks=[...])``), calibrates at the start and measures at each RL evaluation (chipo rl
    evaluates at step 0 and every eval_steps)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chipo.config import load_config
    from chipo.toy import toy_preference_rows
    from chipo.train.rl_config import RLConfig
    from chipo.train.rl_run import run_rl

    prompts = sorted({r["prompt"] for r in toy_preference_rows(8, seed=0)})[:4]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "model")
    ref = AutoModelForCausalLM.from_pretrained(tiny_dir / "model").eval()
    monitor = OveroptimizationMonitor.from_texts(tokenizer, prompts[:2], ref_model=ref,
                                                 settings=MonitorSettings(num_samples=2, max_new_tokens=4))
    callback = OveroptimizationCallback(monitor, mode="log", rules=["kl_k3>1e9"])
    config = load_config(RLConfig, None, [f"policy={tiny_dir / 'model'}", f"prompts={tmp_path / 'prompts.jsonl'}",
                                          f"output_dir={tmp_path / 'rl'}", "reward=test_rl_trainer:toy_reward", "k=2",
                                          "prompts_per_step=2", "max_new_tokens=4", "learning_rate=1e-3",
                                          "max_steps=2", "eval_steps=2", "disable_tqdm=true", "seed=1",
                                          "monitor=off"])  # only the plain callback below, not chipo rl's own
    run_rl(config, callbacks=[callback])
    rows = [json.loads(line) for line in (tmp_path / "rl" / "monitor.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [0, 2] and all(r["alarm"] is None for r in rows)
    assert rows[0]["kl_k3"] == pytest.approx(0.0, abs=1e-9) and rows[1]["kl_k3"] > 0
