"""chipo train end to end through the CLI on a locally built tiny Llama and local jsonl data."""

import shutil
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from chipo.cli.main import main
from chipo.io import read_jsonl as read_metrics


def _train(tiny_dir, out, *overrides):
    args = ["train", f"model={tiny_dir / 'model'}", f"dataset={tiny_dir / 'train.jsonl'}", f"output_dir={out}",
            f"ref_cache_dir={tiny_dir / 'cache'}", "per_device_train_batch_size=8", "learning_rate=2e-3",
            "logging_steps=1", "disable_tqdm=true", "save_strategy=no", *overrides]
    return main(args)


def _weights(directory):
    return AutoModelForCausalLM.from_pretrained(directory).state_dict()


@pytest.mark.parametrize("loss", ["chipo", "dpo"])
def test_train_writes_loadable_checkpoint_and_metrics_move(tiny_dir, tmp_path, loss):
    out = tmp_path / loss
    assert _train(tiny_dir, out, f"loss={loss}", "beta=0.1", "num_train_epochs=3") == 0
    model = AutoModelForCausalLM.from_pretrained(out)  # HF format, safetensors
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert model.config.vocab_size > 0
    assert (out / "run_config.yaml").read_text().count(f"loss: {loss}") == 1
    logs = [r for r in read_metrics(out / "metrics.jsonl") if "rewards/margins" in r]
    first, last = logs[0], logs[-1]
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # policy == reference at step 0
    assert last["rewards/margins"] > 0.5 and last["rewards/accuracies"] > 0.9
    assert last["loss"] < first["loss"]
    assert last["logratio/chosen_max"] >= last["logratio/chosen_mean"]


def test_eval_split_and_reference_model_mode(tiny_dir, tmp_path):
    out = tmp_path / "eval"
    data = tmp_path / "data"
    data.mkdir()
    shutil.copy(tiny_dir / "train.jsonl", data / "train.jsonl")
    shutil.copy(tiny_dir / "test.jsonl", data / "test.jsonl")
    code = _train(tiny_dir, out, f"dataset={data}", "eval_split=test", "reference=model", "loss=ipo",
                  "num_train_epochs=1")
    assert code == 0
    evals = [r for r in read_metrics(out / "metrics.jsonl") if "eval_loss" in r]
    assert evals and "eval_rewards/accuracies" in evals[-1]


def test_lora_reference_is_base_model(tiny_dir, tmp_path):
    out = tmp_path / "lora"
    assert _train(tiny_dir, out, "lora=true", "lora_r=4", "reference=model", "num_train_epochs=1") == 0
    assert (out / "adapter" / "adapter_config.json").is_file()
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    diff = sum((merged.state_dict()[k] - v).abs().sum().item() for k, v in base.state_dict().items())
    assert diff > 0  # the merged adapters changed the weights
    first = [r for r in read_metrics(out / "metrics.jsonl") if "rewards/margins" in r][0]
    assert first["rewards/margins"] == pytest.approx(0.0, abs=1e-6)  # adapters start at zero: policy == ref


def test_gradient_accumulation_equivalence(tiny_dir, tmp_path):
    """Batch 8 x accumulation 1 and batch 2 x accumulation 4 see the same 8 pairs per step (same sampler seed)
    and average the same per-pair losses, so after 4 SGD steps the weights agree to fp32 round-off (atol 1e-6).
    SGD, not Adam: Adam divides by sqrt(v), which turns round-off in near-zero gradients into O(lr) noise."""
    a, b = tmp_path / "a", tmp_path / "b"
    common = ("num_train_epochs=1", "loss=dpo", "optim=sgd", "learning_rate=0.5", "max_grad_norm=0")
    assert _train(tiny_dir, a, "per_device_train_batch_size=8", "gradient_accumulation_steps=1", *common) == 0
    assert _train(tiny_dir, b, "per_device_train_batch_size=2", "gradient_accumulation_steps=4", *common) == 0
    wa, wb = _weights(a), _weights(b)
    moved = max((wa[k] - _weights(tiny_dir / "model")[k]).abs().max().item() for k in ["lm_head.weight"])
    assert moved > 1e-4
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=1e-6, rtol=1e-5)


def test_resume_equivalence(tiny_dir, tmp_path):
    """Two epochs straight vs. resuming from the epoch-1 checkpoint: identical final weights (atol 1e-6)."""
    full = tmp_path / "full"
    assert _train(tiny_dir, full, "num_train_epochs=2", "save_strategy=epoch") == 0
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(full / "checkpoint-4", resumed / "checkpoint-4")
    assert _train(tiny_dir, resumed, "num_train_epochs=2", "save_strategy=epoch",
                  "resume_from_checkpoint=latest") == 0
    wf, wr = _weights(full), _weights(resumed)
    for k in wf:
        torch.testing.assert_close(wf[k], wr[k], atol=1e-6, rtol=1e-5)


def _error_lines(capsys):
    """The error lines on stderr (progress bars may precede them); the error must be the last line."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines and lines[-1].startswith("chipo: error:"), lines
    return [line for line in lines if "error" in line.lower()]


BAD_CASES = {
    "missing column": ('{"prompt": "a", "chosen": "b"}\n', "'rejected'"),
    "empty response": ('{"prompt": "a", "chosen": "b", "rejected": "ok"}\n{"prompt": "a", "chosen": "", '
                       '"rejected": "c"}\n', "row 1"),
    "malformed json": ('{"prompt": "a", "chosen": "b", "rejected": "c"}\n{"prompt": "a", "chosen": \n', "line 2"),
    "prompt too long": ('{"prompt": "' + "the cat sat on the mat " * 40 + '", "chosen": "b", "rejected": "c"}\n',
                        "prompt"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_bad_data_one_line_error_no_output(tiny_dir, tmp_path, capsys, case):
    text, needle = BAD_CASES[case]
    path = tmp_path / "bad.jsonl"
    path.write_text(text)
    out = tmp_path / "out"
    assert _train(tiny_dir, out, f"dataset={path}", "max_length=64") == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and needle in err[0], err
    assert str(path) in err[0]
    assert not out.exists()


@pytest.mark.parametrize("override,needle", [("loss=dpoo", "unknown loss 'dpoo'"), ("beta=-0.1", "beta must be"),
                                             ("max_lenght=3", "did you mean 'max_length'")])
def test_bad_config_one_line_error_no_output(tiny_dir, tmp_path, capsys, override, needle):
    out = tmp_path / "out"
    assert _train(tiny_dir, out, override) == 2
    err = _error_lines(capsys)
    assert len(err) == 1 and needle in err[0], err
    assert not out.exists()


def test_real_process_exit_code_and_help(tiny_dir, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "chipo.cli.main", "train", f"model={tiny_dir / 'model'}",
                           f"dataset={tiny_dir / 'train.jsonl'}", f"output_dir={out}", "loss=nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and "valid: " in proc.stderr and not out.exists()
    helped = subprocess.run([sys.executable, "-m", "chipo.cli.main", "train", "--help"], capture_output=True,
                            text=True)
    assert helped.returncode == 0 and "beta (float" in helped.stdout and "r_max" in helped.stdout


def test_a_full_or_read_only_disk_is_one_line_exit_2(tiny_dir, tmp_path, monkeypatch, capsys):
    """An OSError while writing the run (disk full here; read-only behaves the same) is one line naming the reason
    and the path, exit 2 -- not a traceback. (As root, chmod cannot make a directory read-only, so the error is
    injected where the run writes its first file.)"""
    import errno

    import chipo.train.common as run  # where the Trainer-based commands write run_config.yaml

    def full(path, text):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(run, "atomic_write_text", full)
    out = tmp_path / "out"
    assert _train(tiny_dir, out) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"chipo: error: No space left on device ({out / 'run_config.yaml'})"
