"""Training invariants: NaN/inf stops cleanly; 2-process DDP (gloo, CPU) equals 1 process at the same global batch."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback, TrainingArguments

from chipo.data import PreferenceCollator, load_preference_dataset, prepare_preference_dataset
from chipo.io import read_jsonl as read_metrics
from chipo.train.pairwise import NonFiniteError, NonFiniteGradientGuard
from chipo.train.preference import PreferenceTrainer
from chipo.train.reference import compute_reference_logps


class _PoisonAfterStep(TrainerCallback):
    """Writes a NaN into the LM head as step ``step`` + 1 begins (after checkpoint ``step`` was saved): that
    step's forward gives NaN log-probs, as a diverging run would."""

    def __init__(self, step):
        self.step = step

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            with torch.no_grad():
                model.lm_head.weight[0, 0] = float("nan")


def test_nan_loss_stops_naming_step_and_keeps_last_good_checkpoint(tiny_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "model")
    model = AutoModelForCausalLM.from_pretrained(tiny_dir / "model")
    source = str(tiny_dir / "train.jsonl")
    data, _ = prepare_preference_dataset(load_preference_dataset(source), tokenizer, source=source, max_length=128)
    collator = PreferenceCollator(pad_token_id=tokenizer.pad_token_id)
    chosen, rejected = compute_reference_logps(model, data, collator, batch_size=8)
    data = data.add_column("ref_chosen_logps", chosen.tolist()).add_column("ref_rejected_logps", rejected.tolist())
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8,
                             save_strategy="steps", save_steps=1, report_to="none", remove_unused_columns=False,
                             use_cpu=True, disable_tqdm=True, learning_rate=1e-3)
    trainer = PreferenceTrainer(model=model, args=args, data_collator=collator, train_dataset=data,
                                loss_name="dpo", beta=0.1, callbacks=[_PoisonAfterStep(2)])
    with pytest.raises(NonFiniteError, match=r"non-finite loss at optimizer step 3 \(dataset rows \["):
        trainer.train()
    assert (tmp_path / "checkpoint-2").is_dir() and not (tmp_path / "checkpoint-3").exists()
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "checkpoint-2")
    assert all(torch.isfinite(p).all() for p in saved.parameters())


def test_gradient_guard_names_parameter():
    layer = torch.nn.Linear(2, 2)
    layer.weight.grad = torch.tensor([[1.0, float("inf")], [0.0, 0.0]])
    layer.bias.grad = torch.zeros(2)
    state = SimpleNamespace(global_step=6)
    with pytest.raises(NonFiniteError, match="optimizer step 7 .* first: weight"):
        NonFiniteGradientGuard().on_pre_optimizer_step(SimpleNamespace(output_dir="x"), state, None, model=layer)


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tiny_dir, tmp_path):
    """accelerate launch --num_processes 2 (gloo on CPU) with per-device batch 4 vs one process with batch 8: the
    same 8 pairs form each global step (accelerate shards the same seeded permutation), DDP averages the two
    local mean losses, so per-step losses agree to fp32 round-off of the all-reduce (abs 1e-5)."""
    common = [f"model={tiny_dir / 'model'}", f"dataset={tiny_dir / 'train.jsonl'}", "loss=chipo", "beta=0.1",
              "learning_rate=1e-3", "num_train_epochs=1", "logging_steps=1", "save_strategy=no", "disable_tqdm=true",
              f"ref_cache_dir={tmp_path / 'cache'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "chipo.cli.main", "train", *common, f"output_dir={one}",
                    "per_device_train_batch_size=8"], check=True, env=env, capture_output=True)
    # On a CPU-only machine accelerate's --multi_gpu launcher is torchrun; chipo asks for use_cpu, so gloo DDP.
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "chipo.cli.main", "train", *common, f"output_dir={two}",
                           "per_device_train_batch_size=4"], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = lambda d: [r["loss"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r and "rewards/margins" in r]
    a, b = losses(one), losses(two)
    assert len(a) == len(b) == 4
    assert a == pytest.approx(b, abs=1e-5)
    margins = lambda d: [r["rewards/margins"] for r in read_metrics(d / "metrics.jsonl") if "rewards/margins" in r]
    assert margins(one) == pytest.approx(margins(two), abs=1e-4, rel=1e-4)
