"""The shared sampled-data loop (``chipo.train.sampled``) under ``chipo rl`` and ``chipo online`` on the tiny Llama:
gradient accumulation, gradient checkpointing, ``transformers.TrainerCallback`` hooks and early stop."""

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from chipo.cli.main import main
from chipo.config import load_config
from chipo.io import read_jsonl, write_jsonl
from chipo.train.online import run_online
from chipo.train.online_config import OnlineConfig
from chipo.train.rl_config import RLConfig
from chipo.train.rl_run import run_rl

PROMPTS = ["the cat sat", "a dog is", "why is the post", "how good", "this model", "reward the", "the summary",
           "short answer"]


def length_reward(prompts, responses):
    """Longer responses score higher (``test_sampled_loop:length_reward``)."""
    return [0.1 * len(r) for r in responses]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("sampled") / "prompts.jsonl"
    write_jsonl(path, [{"prompt": p} for p in PROMPTS])
    return path


def _args(command, tiny_dir, prompts, out, *extra):
    common = [f"policy={tiny_dir / 'model'}", f"prompts={prompts}", f"output_dir={out}", "max_new_tokens=5",
              "prompts_per_step=4", "learning_rate=1e-3", "disable_tqdm=true", "save_strategy=no", "seed=3"]
    if command == "rl":
        common += ["reward=test_sampled_loop:length_reward", "k=2", "max_steps=2"]
    else:
        common += ["judge=test_sampled_loop:length_reward", "loss=chipo", "max_steps=2"]
    return [*common, *extra]


def _run(command, tiny_dir, prompts, out, *extra):
    return main([command, *_args(command, tiny_dir, prompts, out, *extra)])


def _assert_same(a, b, atol=1e-5):
    ra, rb = read_jsonl(a / "metrics.jsonl"), read_jsonl(b / "metrics.jsonl")
    assert [r["step"] for r in ra] == [r["step"] for r in rb] == [1, 2]
    for x, y in zip(ra, rb):
        assert x["loss"] == pytest.approx(y["loss"], abs=atol) and x["grad_norm"] == pytest.approx(y["grad_norm"],
                                                                                                   abs=atol)
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], atol=atol, rtol=0)


@pytest.mark.parametrize("command", ["rl", "online"])
def test_micro_batches_times_accumulation_equal_one_batch(tiny_dir, prompts, tmp_path, command):
    """4 prompts per step as one batch vs 4 micro-batches of 1 accumulated: the gradient is (1/4) sum of the same
    per-prompt gradients either way (``chipo.train.sampled`` docstring), so losses, gradient norms and the final
    weights agree to float round-off (1e-5). Samples depend only on (seed, step, position), not on G."""
    one, four = tmp_path / "g1", tmp_path / "g4"
    assert _run(command, tiny_dir, prompts, one) == 0
    assert _run(command, tiny_dir, prompts, four, "gradient_accumulation_steps=4") == 0
    _assert_same(one, four)
    assert read_jsonl(one / "metrics.jsonl")[-1]["grad_norm"] > 0  # a real gradient, not two zeros


def test_accumulation_that_cannot_split_the_prompts_is_one_line(tiny_dir, prompts, tmp_path, capsys):
    """gradient_accumulation_steps is read: 4 prompts cannot split into 3 micro-batches (one line, exit 2)."""
    assert _run("online", tiny_dir, prompts, tmp_path / "never", "gradient_accumulation_steps=3") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["chipo: error: prompts_per_step (4) must be divisible by gradient_accumulation_steps (3)"]


@pytest.mark.parametrize("command", ["rl", "online"])
def test_gradient_checkpointing_gives_the_same_run(tiny_dir, prompts, tmp_path, command):
    """Recomputing activations in the backward changes memory, not the result (tiny Llama: no dropout)."""
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    assert _run(command, tiny_dir, prompts, plain) == 0
    assert _run(command, tiny_dir, prompts, ckpt, "gradient_checkpointing=true") == 0
    _assert_same(plain, ckpt)


class Recorder(TrainerCallback):
    """Records every event with the step it saw; asks to stop at ``stop_at``."""

    def __init__(self, stop_at=None):
        self.events, self.stop_at, self.logs = [], stop_at, []

    def on_train_begin(self, args, state, control, **kwargs):
        self.events.append(("train_begin", state.global_step))
        assert kwargs["model"] is not None and kwargs["optimizer"] is not None

    def on_step_end(self, args, state, control, **kwargs):
        self.events.append(("step_end", state.global_step))
        if state.global_step == self.stop_at:
            control.should_training_stop = True
        return control

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.events.append(("evaluate", state.global_step))

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.events.append(("log", state.global_step))
        self.logs.append(dict(logs))

    def on_save(self, args, state, control, **kwargs):
        self.events.append(("save", state.global_step))

    def on_train_end(self, args, state, control, **kwargs):
        self.events.append(("train_end", state.global_step))


@pytest.mark.parametrize("command", ["rl", "online"])
def test_callback_hooks_and_stop_at_step_2(tiny_dir, prompts, tmp_path, command):
    """A callback that sets should_training_stop at step 2 of 5 ends the run after step 2: checkpoint-2 and the
    final model are saved, metrics stop at step 2, and every hook saw the step it was called at."""
    out = tmp_path / "stopped"
    cls, run = (RLConfig, run_rl) if command == "rl" else (OnlineConfig, run_online)
    extra = ["max_steps=5", "save_strategy=steps", "save_steps=4"]
    if command == "rl":
        extra += ["eval_steps=1", "max_eval_prompts=2", "eval_samples=1"]
    config = load_config(cls, None, _args(command, tiny_dir, prompts, out, *extra))
    recorder = Recorder(stop_at=2)
    run(config, callbacks=[recorder])
    per_step = ([("step_end", 1), ("evaluate", 1), ("log", 1), ("step_end", 2), ("evaluate", 2), ("log", 2)]
                if command == "rl" else [("step_end", 1), ("log", 1), ("step_end", 2), ("log", 2)])
    begin = [("train_begin", 0), ("evaluate", 0), ("log", 0)] if command == "rl" else [("train_begin", 0)]
    assert recorder.events == [*begin, *per_step, ("save", 2), ("train_end", 2)]
    assert [r["step"] for r in read_jsonl(out / "metrics.jsonl")] == [r["step"] for r in recorder.logs]
    assert read_jsonl(out / "metrics.jsonl")[-1]["step"] == 2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]
    assert (out / "model.safetensors").is_file()
