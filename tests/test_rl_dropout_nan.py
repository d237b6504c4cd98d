"""chipo rl: the loss's log-probs are those of the deterministic network (dropout off), and NaN/inf stops the run.

Dropout: a tiny GPT-2 with dropout 0.5 everywhere. Every sequence log-prob the trainer computes
(``chipo.train.rl.batch_sequence_logps``) is recorded and recomputed (a) in eval mode and (b) in train mode with
dropout. The recorded values must equal (a) to float round-off -- with dropout on they would be a random variable
and differ from (a) by far more, which (b) checks, so the test can fail -- and the policy's must carry a gradient.
"""

import json

import pytest
import torch
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

import chipo.train.rl as rl
from chipo.cli.rl import main as rl_main
from chipo.config import load_config
from chipo.io import read_jsonl
from chipo.train.rl_config import RLConfig
from chipo.train.rl_run import run_rl


def length_reward(prompts, responses):
    """Shorter responses score higher (``reward=test_rl_dropout_nan:length_reward``)."""
    return [-len(r) / 20.0 for r in responses]


@pytest.fixture(scope="module")
def files(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("rl_dropout")
    rows = [json.loads(line) for line in open(tiny_dir / "train.jsonl")]
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": r["prompt"]}) + "\n" for r in rows[:4]))
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "model")
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=2, n_head=2,
                                      resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5,
                                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id))
    gpt2.save_pretrained(root / "gpt2")
    tokenizer.save_pretrained(root / "gpt2")
    return root


def _overrides(files, out, *extra):
    return [f"policy={files / 'gpt2'}", f"prompts={files / 'prompts.jsonl'}", f"output_dir={out}",
            "reward=test_rl_dropout_nan:length_reward", "k=2", "prompts_per_step=2", "max_new_tokens=5",
            "learning_rate=1e-3", "disable_tqdm=true", "logprobs_impl=logits", *extra]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_loss_logps_are_eval_mode_logps(files, tmp_path, monkeypatch, checkpointing):
    calls = []
    original = rl.batch_sequence_logps

    def recording(model, batch, impl, chunk_tokens=1024, max_buckets=1, packed=False):
        out = original(model, batch, impl, chunk_tokens, packed=packed)
        mode = [m.training for m in model.modules()]
        with torch.no_grad():
            model.eval()
            clean = original(model, batch, impl, chunk_tokens)
            model.train()
            torch.manual_seed(len(calls))
            noisy = original(model, batch, impl, chunk_tokens)
        for m, training in zip(model.modules(), mode):
            m.training = training
        calls.append((out, clean, noisy))
        return out

    monkeypatch.setattr(rl, "batch_sequence_logps", recording)
    config = load_config(RLConfig, None, _overrides(files, tmp_path / "run", "max_steps=1", "save_strategy=no",
                                                    f"gradient_checkpointing={str(checkpointing).lower()}"))
    run_rl(config)
    assert len(calls) == 2  # pi_ref, then pi_theta, for one micro-batch
    (ref, ref_clean, _), (policy, policy_clean, policy_noisy) = calls
    assert policy.requires_grad and not ref.requires_grad
    torch.testing.assert_close(policy.detach(), policy_clean, rtol=0, atol=1e-5)
    torch.testing.assert_close(ref, ref_clean, rtol=0, atol=1e-5)
    assert (policy.detach() - policy_noisy).abs().max() > 1e-2  # dropout 0.5 would have changed log pi


def test_nan_stops_before_the_step_naming_it_and_keeps_the_last_checkpoint(tiny_dir, files, tmp_path, capsys,
                                                                           monkeypatch):
    """The RLOO loss made NaN from step 3 on (its third call: one micro-batch per step): exit 3, one line naming
    step 3 and the last good checkpoint; checkpoints 1-2 and the metrics of steps 1-2 stay."""
    out = tmp_path / "run"
    real, calls = rl.rloo_loss, []

    def nan_from_step_3(*args, **kwargs):
        losses, metrics = real(*args, **kwargs)
        calls.append(1)
        return (losses * float("nan") if len(calls) >= 3 else losses), metrics

    monkeypatch.setattr(rl, "rloo_loss", nan_from_step_3)
    code = rl_main([f"policy={tiny_dir / 'model'}", f"prompts={files / 'prompts.jsonl'}", f"output_dir={out}",
                    "reward=test_rl_dropout_nan:length_reward", "k=2", "prompts_per_step=2", "max_new_tokens=4",
                    "disable_tqdm=true", "save_steps=1", "regularizer=kl", "max_steps=4"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("chipo")]
    assert code == 3 and len(err) == 1, err
    err = err[0]
    assert "non-finite RL loss at step 3" in err and "before the optimizer step" in err and "checkpoint-2" in err
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1", "checkpoint-2"]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [1, 2]
