"""The experiment-directory protocol (``chipo.train.experiment_dir``) under every command that fills a directory with
many runs or results: ``chipo lab sweep``, ``chipo tldr sweep``, ``chipo tldr generate`` and ``chipo tldr judge``,
through the CLI.

Each case is one fault a user meets: a second process on a busy directory, overwrite=true after a finished
experiment, a rerun with other settings, a rerun of a finished experiment (no training, no sampling), a failure
before the first result (the same command must simply run again), and overwrite=true pointed at a folder that is
not an experiment. Every run is tiny: the tiny Llama, one run of one epoch (2 optimizer steps) or one cell of
2 prompts x 4 tokens (judged by a tiny random reward model). The judge stage judges again, by design, when its
judge changes, so it has no "other settings" case.
"""

from __future__ import annotations

import fcntl
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest

from chipo.cli.main import main
from chipo.io import read_json, read_jsonl, write_jsonl
from chipo.train import experiment_dir

pytestmark = pytest.mark.slow


def length_gold(prompts, responses):
    """The lab sweep's gold scorer here (``test_fault_experiments:length_gold``): longer responses score higher."""
    return [0.1 * len(r) for r in responses]


@dataclass(frozen=True)
class Command:
    """One command: its arguments, where its experiment directory is, a setting that changes its results, the
    function that does its work (patched to count calls, to fail, or to refuse being called) and the result
    files that a rerun must leave alone."""

    name: str
    argv: tuple[str, ...]
    changed: tuple[str, str]  # (override, the key a refusal must name)
    work: str  # "module:attribute" called once per run / cell
    first: str  # called before the first result is written
    results: str  # glob (under the experiment directory) of the result files
    directory: str = "."  # the experiment directory, relative to out_dir
    needs_generations: bool = False

    def run(self, data: Path, out: Path, *extra: str) -> int:
        return main([*self.name.split(), *(a.format(data=data, out=out) for a in self.argv), *extra])

    def exp_dir(self, out: Path) -> Path:
        return out / self.directory


SMALL = ("max_length=64",)
COMMANDS = {
    "lab sweep": Command(
        "lab sweep",
        ("ref_model={data}/model", "train_prefs={data}/train.jsonl", "eval_prompts={data}/prompts.jsonl",
         "gold=test_fault_experiments:length_gold", "exact=false", "out_dir={out}", "losses=[dpo]", "betas=[0.1]",
         "seeds=[0]", "epochs=1", "batch_size=16", "num_samples=2", "max_new_tokens=4", "max_eval_prompts=2",
         *SMALL),
        ("learning_rate=0.5", "learning_rate"), "chipo.train.run:run_training", "chipo.lab.evaluate:baseline_metrics",
        "results.jsonl"),
    "tldr sweep": Command(
        "tldr sweep",
        ("sft_model={data}/model", "dataset={data}/train.jsonl", "out_dir={out}", "losses=[dpo]", "betas=[0.1]",
         "seeds=[0]", "epochs=1", "eval_epochs=[1]", "per_device_train_batch_size=16",
         "gradient_accumulation_steps=1", "max_prompt_length=32", "train_overrides=[disable_tqdm=true]", *SMALL),
        ("learning_rate=0.5", "learning_rate"), "chipo.train.run:run_training", "chipo.train.run:run_training",
        "runs/*/done.json"),
    "tldr generate": Command(
        "tldr generate",
        ("out_dir={out}", "sft_model={data}/model", "prompts_dataset={data}/tldr", "num_prompts=2",
         "max_new_tokens=4", "batch_size=2", "backend=hf"),
        ("temperature=0.5", "temperature"), "chipo.recipes.tldr.generate:Generator.run",
        "chipo.recipes.tldr.generate:Generator.run", "*_epoch*.json*", "generations"),
    "tldr judge": Command(
        "tldr judge",
        ("out_dir={out}", "judge=reward-model", "reward_model.model={data}/rm"),
        ("response_prefix=x", "response_prefix"), "chipo.recipes.tldr.judge:judge_cell",
        "chipo.recipes.tldr.judge:judge_cell", "*_epoch*.json", "judgements/reward-model", needs_generations=True),
}
SETTINGS_CHECKED = [name for name in COMMANDS if name != "tldr judge"]


@pytest.fixture(scope="module")
def data(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("experiments")
    (root / "model").symlink_to(tiny_dir / "model")
    rows = read_jsonl(tiny_dir / "train.jsonl")
    write_jsonl(root / "train.jsonl", rows)
    write_jsonl(root / "prompts.jsonl", [{"prompt": r["prompt"]} for r in rows[:2]])
    write_jsonl(root / "tldr" / "test.jsonl", [{"prompt": r["prompt"], "completion": r["chosen"]} for r in rows[:2]])
    _reward_model(tiny_dir / "model", root / "rm")
    return root


def _reward_model(policy: Path, directory: Path) -> None:
    """A tiny random Llama sequence classifier with one output and the policy's tokenizer (the judge)."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(policy)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=32, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    LlamaForSequenceClassification(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@pytest.fixture(scope="module")
def finished(data, tmp_path_factory):
    """One finished experiment per command, copied by the tests that need one."""
    done = {}
    for name, command in COMMANDS.items():  # generate before judge: the judge's directory starts from its samples
        out = tmp_path_factory.mktemp(name.replace(" ", "-")) / "out"
        _prepare(command, done, out)
        assert command.run(data, out) == 0
        done[name] = out
    return done


def _prepare(command: Command, finished: dict, out: Path) -> None:
    """The judge stage needs a recipe directory with samples: the finished generate stage's."""
    if command.needs_generations:
        shutil.copytree(finished["tldr generate"] / "generations", out / "generations")


def _target(monkeypatch, spec: str, replacement):
    module, attribute = spec.split(":")
    owner, _, name = attribute.rpartition(".")
    target = __import__(module, fromlist=["_"])
    if owner:
        target = getattr(target, owner)
    original = getattr(target, name)
    monkeypatch.setattr(target, name, replacement(original))


def _copy(finished, name, tmp_path) -> Path:
    out = tmp_path / "out"
    shutil.copytree(finished[name], out, symlinks=True)
    return out


def _files(root: Path) -> dict:
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _refuse_work(monkeypatch, command):
    def refuse(original):
        def called(*args, **kwargs):
            pytest.fail(f"{command.name} did work ({command.work}) where there was nothing to do")
        return called
    _target(monkeypatch, command.work, refuse)


@pytest.mark.parametrize("name", COMMANDS)
def test_a_busy_directory_is_refused_in_one_line(name, data, finished, tmp_path, monkeypatch, capsys):
    command = COMMANDS[name]
    out = tmp_path / "out"
    _prepare(command, finished, out)
    directory = command.exp_dir(out)
    directory.mkdir(parents=True)
    monkeypatch.setattr(experiment_dir, "JOIN_WAIT_S", 0.2)  # the shared TL;DR sweep waits this long for a set-up
    _refuse_work(monkeypatch, command)
    (directory / ".lock").touch()
    with open(directory / ".lock") as held:  # another open file description: conflicts as another process would
        fcntl.flock(held.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert command.run(data, out) == 2
    err = capsys.readouterr().err
    assert f"{directory} is in use by another run" in err and err.count("\n") == 1
    assert [p.name for p in directory.iterdir()] == [".lock"]


@pytest.mark.parametrize("name", COMMANDS)
def test_overwrite_clears_the_experiment_and_runs_it_again(name, data, finished, tmp_path, monkeypatch):
    command = COMMANDS[name]
    out = _copy(finished, name, tmp_path)
    stale = command.exp_dir(out) / "stale-result.jsonl"
    stale.write_text("{}\n")
    calls = []

    def count(original):
        def counted(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)
        return counted

    _target(monkeypatch, command.work, count)
    assert command.run(data, out, command.changed[0], "overwrite=true") == 0
    assert len(calls) == 1 and not stale.exists()
    key = read_json(command.exp_dir(out) / experiment_dir.MARKER)["key"]
    assert str(key[command.changed[1]]) == command.changed[0].split("=")[1]
    assert list(command.exp_dir(out).glob(command.results))


@pytest.mark.parametrize("name", SETTINGS_CHECKED)
def test_other_settings_are_refused_naming_the_key_and_nothing_is_rewritten(name, data, finished, tmp_path,
                                                                             monkeypatch, capsys):
    command = COMMANDS[name]
    out = _copy(finished, name, tmp_path)
    before = _files(out)
    _refuse_work(monkeypatch, command)
    capsys.readouterr()
    assert command.run(data, out, command.changed[0]) == 2
    err = capsys.readouterr().err
    assert f"with other settings ({command.changed[1]}): {command.changed[1]} was" in err
    assert "overwrite=true" in err and err.count("\n") == 1
    assert _files(out) == before


@pytest.mark.parametrize("name", COMMANDS)
def test_a_finished_experiment_resumes_to_nothing(name, data, finished, tmp_path, monkeypatch):
    command = COMMANDS[name]
    out = _copy(finished, name, tmp_path)
    before = _files(out)
    _refuse_work(monkeypatch, command)
    assert command.run(data, out) == 0
    # Nothing rewritten, not even experiment.json; commands.log gains this copy's command line (its out_dir).
    before.pop(Path("commands.log"), None)
    assert {k: v for k, v in _files(out).items() if k != Path("commands.log")} == before
    # The shared TL;DR sweep records no "finished": its processes each fill a part of the grid, done.json per run.
    assert read_json(command.exp_dir(out) / experiment_dir.MARKER)["finished"] is (name != "tldr sweep")


@pytest.mark.parametrize("name", COMMANDS)
def test_a_failure_before_the_first_result_leaves_nothing(name, data, finished, tmp_path, monkeypatch, capsys):
    command = COMMANDS[name]
    out = tmp_path / "out"
    _prepare(command, finished, out)

    def interrupt(original):
        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt
        return interrupted

    with monkeypatch.context() as patch:
        _target(patch, command.first, interrupt)
        assert command.run(data, out) == 130
    assert not command.exp_dir(out).exists()
    assert command.run(data, out) == 0  # the same command simply runs again
    assert list(command.exp_dir(out).glob(command.results))


@pytest.mark.parametrize("name", COMMANDS)
def test_overwrite_refuses_a_folder_that_is_not_an_experiment(name, data, finished, tmp_path, monkeypatch, capsys):
    command = COMMANDS[name]
    out = tmp_path / "out"
    _prepare(command, finished, out)
    directory = command.exp_dir(out)
    directory.mkdir(parents=True)
    (directory / "thesis.tex").write_text("years of work")
    _refuse_work(monkeypatch, command)
    assert command.run(data, out, "overwrite=true") == 2
    err = capsys.readouterr().err
    assert "refusing to clear it" in err and err.count("\n") == 1
    assert (directory / "thesis.tex").read_text() == "years of work"
    assert sorted(p.name for p in directory.iterdir()) == [".lock", "thesis.tex"]
