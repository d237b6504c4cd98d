"""chipo sft: completion-only masking, data layouts, truncation, one-line data errors, and the CLI end to end on a
locally built tiny Llama (chipo.toy)."""

import json

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from chipo.cli.sft import main as sft_main
from chipo.config import ConfigError, load_config
from chipo.data import DataError, load_preference_dataset
from chipo.data.sft import IGNORE_INDEX, SFTCollator, prepare_sft_dataset
from chipo.io import read_jsonl as read_metrics
from chipo.train.sft_config import SFTConfig

WORDS = "cat dog model policy reward summary post answer".split()


def tldr_rows():
    """TL;DR-shaped rows (prompt ends with "TL;DR:", completion is the summary) in the toy tokenizer's words."""
    return [{"prompt": f"POST: the {w} sat on the mat. why is this post long?\nTL;DR:", "completion": f" {w} sat."}
            for w in WORDS] * 2


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(tiny_dir / "model")


def _sft(tiny_dir, data, out, *overrides):
    return sft_main([f"model={tiny_dir / 'model'}", f"dataset={data}", f"output_dir={out}",
                     "per_device_train_batch_size=4", "learning_rate=3e-3", "logging_steps=1", "disable_tqdm=true",
                     "warmup_ratio=0", *overrides])


def test_sft_cli_trains_and_saves_loadable_model(tiny_dir, tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "out"
    data.mkdir()
    write(data / "train.jsonl", tldr_rows())
    write(data / "test.jsonl", tldr_rows()[:4])
    assert _sft(tiny_dir, data, out, "num_train_epochs=3", "save_strategy=no", "eval_split=test") == 0
    metrics = read_metrics(out / "metrics.jsonl")
    losses = [r["loss"] for r in metrics if "loss" in r]
    evals = [r["eval_loss"] for r in metrics if "eval_loss" in r]
    assert len(evals) == 3 and evals[-1] < evals[0]  # one evaluation per epoch, on completion tokens
    assert len(losses) == 12 and sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.vocab_size > 0 and (out / "tokenizer.json").is_file()
    assert "completion_only_loss: true" in (out / "run_config.yaml").read_text()
    assert not [p for p in out.iterdir() if p.name.startswith(".final-")]  # the temporary save dir was renamed away
    assert f"model saved to {out}" in capsys.readouterr().out


def test_resume_from_latest_checkpoint(tiny_dir, tmp_path):
    data, out = write(tmp_path / "train.jsonl", tldr_rows()), tmp_path / "out"
    assert _sft(tiny_dir, data, out, "max_steps=2", "save_strategy=steps", "save_steps=2") == 0
    assert (out / "checkpoint-2").is_dir()
    assert _sft(tiny_dir, data, out, "max_steps=4", "save_strategy=steps", "save_steps=2",
                "resume_from_checkpoint=latest") == 0
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4]  # the second run continued at step 3, it did not start over
    assert (out / "checkpoint-4").is_dir()
    AutoModelForCausalLM.from_pretrained(out)


def test_collated_batch_masks_prompt_and_padding(tokenizer, tmp_path):
    rows = [{"prompt": "why is the cat long?", "completion": " good answer."},
            {"prompt": "why?", "completion": " a much longer good helpful answer about the dog."}]
    source = str(write(tmp_path / "d.jsonl", rows))
    prepared, stats = prepare_sft_dataset(load_preference_dataset(source), tokenizer, source=source, max_length=64)
    assert stats.rows == 2 and stats.truncated_completions == 0
    features = [prepared[i] for i in range(2)]
    batch = SFTCollator(pad_token_id=tokenizer.pad_token_id)(features)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    for i, f in enumerate(features):
        p, c = len(f["prompt_input_ids"]), len(f["completion_input_ids"])
        labels, ids = batch["labels"][i], batch["input_ids"][i]
        assert (labels[:p] == IGNORE_INDEX).all()  # prompt
        assert labels[p:p + c].tolist() == ids[p:p + c].tolist() == f["completion_input_ids"]  # completion
        assert (labels[p + c:] == IGNORE_INDEX).all() and (batch["attention_mask"][i, p + c:] == 0).all()  # padding
        assert f["completion_input_ids"][-1] == tokenizer.eos_token_id
        assert tokenizer.decode(f["completion_input_ids"][:-1]) == rows[i]["completion"]
    # pad == EOS (a common fallback): the completion's EOS keeps its label; padding is found by length, not id.
    same = SFTCollator(pad_token_id=tokenizer.eos_token_id)(features)
    c0 = len(features[0]["prompt_input_ids"]) + len(features[0]["completion_input_ids"])
    assert same["labels"][0, c0 - 1] == tokenizer.eos_token_id and (same["labels"][0, c0:] == IGNORE_INDEX).all()
    # completion_only_loss=false trains on the prompt too, still never on padding.
    full = SFTCollator(pad_token_id=tokenizer.pad_token_id, completion_only_loss=False)(features)
    assert full["labels"][0, :c0].tolist() == full["input_ids"][0, :c0].tolist()
    assert (full["labels"][0, c0:] == IGNORE_INDEX).all()


@pytest.mark.parametrize("layout", ["conversational", "messages"])
def test_conversational_layouts_render_with_chat_template(tokenizer, tmp_path, layout):
    prompt = [{"role": "user", "content": "why is the cat long?"}]
    answer = [{"role": "assistant", "content": "good answer."}]
    row = {"prompt": prompt, "completion": answer} if layout == "conversational" else {"messages": prompt + answer}
    source = str(write(tmp_path / "c.jsonl", [row]))
    prepared, stats = prepare_sft_dataset(load_preference_dataset(source), tokenizer, source=source, max_length=64)
    assert stats.format == layout
    assert tokenizer.decode(prepared[0]["prompt_input_ids"]) == "<|user|>why is the cat long?<|end|>\n<|assistant|>"
    assert tokenizer.decode(prepared[0]["completion_input_ids"]) == "good answer.<|end|>\n<|eos|>"


def test_truncation_rules(tokenizer, tmp_path):
    rows = [{"prompt": "why is the cat long? " * 4, "completion": " good helpful answer" * 10}]
    source = str(write(tmp_path / "t.jsonl", rows))
    dataset = load_preference_dataset(source)
    prompt_ids = tokenizer(rows[0]["prompt"])["input_ids"]
    prepared, stats = prepare_sft_dataset(dataset, tokenizer, source=source, max_length=len(prompt_ids) + 5)
    assert len(prepared[0]["completion_input_ids"]) == 5 and stats.truncated_completions == 1  # first tokens kept
    prepared, stats = prepare_sft_dataset(dataset, tokenizer, source=source, max_length=20, max_prompt_length=6)
    assert prepared[0]["prompt_input_ids"] == prompt_ids[-6:] and stats.truncated_prompts == 1  # last tokens kept
    with pytest.raises(DataError, match=r"t.jsonl: row 0 \(line 1\), field 'prompt': prompt leaves no room"):
        prepare_sft_dataset(dataset, tokenizer, source=source, max_length=len(prompt_ids))


GOOD = {"prompt": "why?", "completion": " good."}


@pytest.mark.parametrize("rows, expected", [
    ([GOOD, {"prompt": "why?"}], "row 1 (line 2), field 'completion': expected a string, got null"),
    ([{"text": "x"}], "row 0 (line 1), field 'prompt': missing column 'prompt'"),
    ([GOOD, GOOD, {"prompt": "why?", "completion": 3}], "row 2 (line 3), field 'completion': expected a string"),
    ([GOOD, {"prompt": "why?", "completion": "  "}], "row 1 (line 2), field 'completion': empty completion"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "row 0 (line 1), field 'messages': need a prompt and a "
                                                          "final assistant message"),
])
def test_bad_data_is_one_line_error_and_leaves_no_output(tiny_dir, tmp_path, capsys, rows, expected):
    data, out = write(tmp_path / "bad.jsonl", rows), tmp_path / "out"
    assert _sft(tiny_dir, data, out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"chipo: error: {data}: ") and expected in err and err.count("\n") == 1
    assert not out.exists()


def test_config_validation():
    with pytest.raises(ConfigError, match="model is required"):  # checked when the command runs
        load_config(SFTConfig, overrides=["dataset=x.jsonl"]).require_model_and_data()
    with pytest.raises(ConfigError, match="max_prompt_length must lie in"):
        load_config(SFTConfig, overrides=["model=m", "dataset=d", "max_length=8", "max_prompt_length=8"])
    with pytest.raises(ConfigError, match="did you mean 'learning_rate'"):
        load_config(SFTConfig, overrides=["model=m", "dataset=d", "learning_rat=1e-3"])
