"""chipo rl end to end on a tiny Llama: metrics, checkpoints, exact resume, reward-model and callable rewards."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from chipo.cli.rl import main as rl_main
from chipo.io import read_jsonl as read_metrics


def toy_reward(prompts, responses):
    """A callable reward for ``reward=test_rl_trainer:toy_reward``: shorter responses score higher."""
    return [-len(r) / 20.0 for r in responses]


@pytest.fixture(scope="module")
def rl_files(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("rl")
    rows = [json.loads(line) for line in open(tiny_dir / "train.jsonl")]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows[:6]))
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_dir / "model", num_labels=1)
    rm.config.pad_token_id = 0
    rm.save_pretrained(root / "rm")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tiny_dir / "model").save_pretrained(root / "rm")
    return root


def _rl(tiny_dir, rl_files, out, *overrides):
    return rl_main([f"policy={tiny_dir / 'model'}", f"prompts={rl_files / 'prompts.jsonl'}", f"output_dir={out}",
                    "reward=test_rl_trainer:toy_reward", "k=3", "prompts_per_step=2", "max_new_tokens=6",
                    "learning_rate=1e-3", "disable_tqdm=true", "seed=1", *overrides])


def _weights(directory):
    return AutoModelForCausalLM.from_pretrained(directory).state_dict()


def test_rl_runs_logs_and_saves(tiny_dir, rl_files, tmp_path):
    out = tmp_path / "run"
    code = _rl(tiny_dir, rl_files, out, "max_steps=3", "regularizer=chi2mix", "beta=0.1", "eval_steps=3",
               "gold=test_rl_trainer:toy_reward", "save_steps=2")
    assert code == 0
    records = read_metrics(out / "metrics.jsonl")
    steps = [r for r in records if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    first = steps[0]
    for key in ("reward", "penalized_reward", "penalty", "kl_k1", "kl_k3", "chi2", "response_length", "loss"):
        assert key in first
    assert first["kl_k1"] == pytest.approx(0.0, abs=1e-5)  # policy == reference before the first update
    assert first["penalty"] == pytest.approx(0.1, abs=1e-4)  # chi2mix: beta * (z + log z) = beta at z = 1
    evals = [r for r in records if "eval_gold" in r]
    assert [r["step"] for r in evals] == [0, 3] and evals[0]["eval_kl_k1"] == pytest.approx(0.0, abs=1e-5)
    assert evals[1]["eval_kl_k3"] > 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    final = _weights(out)
    init = _weights(tiny_dir / "model")
    assert any(not torch.equal(final[k], init[k]) for k in final)
    assert (out / "tokenizer.json").is_file() and "regularizer: chi2mix" in (out / "run_config.yaml").read_text()


def test_rl_resume_retraces_the_uninterrupted_run(tiny_dir, rl_files, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    assert _rl(tiny_dir, rl_files, full, "max_steps=4", "save_strategy=no", "regularizer=kl", "beta=0.05") == 0
    assert _rl(tiny_dir, rl_files, split, "max_steps=2", "save_steps=2", "regularizer=kl", "beta=0.05") == 0
    # pretend the first run died after step 3 had been logged but before it was checkpointed
    with (split / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"step": 3, "reward": 123.0}) + "\n")
    assert _rl(tiny_dir, rl_files, split, "max_steps=4", "save_steps=2", "regularizer=kl", "beta=0.05",
               "resume_from_checkpoint=latest") == 0
    a, b = read_metrics(full / "metrics.jsonl"), read_metrics(split / "metrics.jsonl")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for ra, rb in zip(a, b):
        assert ra["reward"] == pytest.approx(rb["reward"], abs=1e-6)
        assert ra["kl_k1"] == pytest.approx(rb["kl_k1"], abs=1e-5)
    wa, wb = _weights(full), _weights(split)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_rl_with_reward_model_and_k3(tiny_dir, rl_files, tmp_path):
    out = tmp_path / "rm"
    assert _rl(tiny_dir, rl_files, out, f"reward={rl_files / 'rm'}", "regularizer=kl", "estimator=k3",
               "max_steps=1", "gradient_accumulation_steps=2") == 0
    (record,) = [r for r in read_metrics(out / "metrics.jsonl") if "reward" in r]
    assert record["penalty"] == pytest.approx(0.0, abs=1e-6)  # k3 is 0 at z = 1
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-1"]
    # overwrite_output_dir starts over: the previous run's checkpoints and metrics are removed first
    assert _rl(tiny_dir, rl_files, out, "max_steps=1", "save_strategy=no", "overwrite_output_dir=true") == 0
    assert len(read_metrics(out / "metrics.jsonl")) == 1 and not list(out.glob("checkpoint-*"))


@pytest.mark.parametrize("override, message", [
    ("regularizer=js", "regularizer must be one of"),
    ("k=1", "k must be at least 2"),
    ("estimator=k3", "estimator k3 is a KL estimator"),
    ("reward=no_such_module:fn", "no_such_module"),
    ("reward=/no/such/dir", "/no/such/dir"),
    ("prompts=/no/such.jsonl", "file not found"),
    ("gradient_accumulation_steps=3", "prompts_per_step (2) must be divisible by gradient_accumulation_steps (3)"),
    ("save_strategy=epoch", "save_strategy must be 'steps' or 'no'"),
    ("resume_from_checkpoint=/no/such/checkpoint", "is not a directory"),
    ("report_to=nonsense", "unknown logger 'nonsense'"),
])
def test_rl_bad_inputs_one_line_exit_2_no_output(tiny_dir, rl_files, tmp_path, capsys, override, message):
    out = tmp_path / "never"
    assert _rl(tiny_dir, rl_files, out, "max_steps=1", override) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_rl_prompts_without_prompt_column(tiny_dir, rl_files, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "hi"}) + "\n")
    assert _rl(tiny_dir, rl_files, tmp_path / "never", f"prompts={bad}", "max_steps=1") == 2
    assert "'prompt' column" in capsys.readouterr().err


def test_rl_prompts_per_step_must_split_over_processes(tiny_dir, rl_files, tmp_path, capsys, monkeypatch):
    """Under DDP each of N processes takes prompts_per_step / N prompts, in gradient_accumulation_steps equal
    micro-batches: 4 prompts over 3 processes cannot split, checked before anything is written."""
    import chipo.train.rl_run as rl_run

    make = rl_run._accelerator

    def three_processes(config):
        accelerator = make(config)
        monkeypatch.setattr(type(accelerator), "num_processes", property(lambda self: 3))
        return accelerator

    monkeypatch.setattr(rl_run, "_accelerator", three_processes)
    out = tmp_path / "never"
    assert _rl(tiny_dir, rl_files, out, "max_steps=1", "prompts_per_step=4") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["chipo: error: prompts_per_step (4) must be divisible by num_processes x "
                   "gradient_accumulation_steps (3 x 1)"]
    assert not out.exists()
