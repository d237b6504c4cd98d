"""``chipo online`` end to end on the tiny Llama: every judge kind (module:function scorer, reward model, LLM judge
on a local fake OpenAI server) and every method (online DPO, chiPO, XPO, Nash-MD), the label budget, resume, NaN
stop, one-line errors, and 2-process DDP (gloo) against 1 process."""

import os
import re
import subprocess
import sys

import pytest
import torch

from chat_server import ChatServer
from chipo.cli.main import main
from chipo.io import read_jsonl, write_jsonl

PROMPTS = ["the cat sat", "a dog is", "why is the post", "how good", "this model", "reward the", "the summary",
           "short answer"]


def length_reward(prompts, responses):
    """A module:function scorer: longer responses are better (0.1 per character)."""
    return [0.1 * len(r) for r in responses]


@pytest.fixture(scope="module")
def data(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("online")
    write_jsonl(root / "prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    return root


def run(tiny_dir, data, out, *extra):
    base = [f"policy={tiny_dir / 'model'}", f"prompts={data / 'prompts.jsonl'}", "max_new_tokens=6",
            "prompts_per_step=4", "max_steps=2", "learning_rate=1e-3", "disable_tqdm=true", "save_steps=0",
            f"output_dir={out}"]
    return main(["online", *base, *extra])


def metrics(out):
    return read_jsonl(out / "metrics.jsonl")


TRL_NAMES = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
             "logps/rejected", "kl", "chi2", "labels", "labels/step")


@pytest.mark.parametrize("method", [("loss=dpo",), ("loss=chipo", "label=argmax"),
                                    ("loss=chipo", "exploration=xpo", "xpo_alpha=0.1")])
def test_pairwise_methods_with_function_judge(tiny_dir, data, tmp_path, method):
    out = tmp_path / "run"
    assert run(tiny_dir, data, out, "judge=test_online_cli:length_reward", *method) == 0
    rows = metrics(out)
    assert [r["step"] for r in rows] == [1, 2] and [r["labels"] for r in rows] == [4, 8]
    assert all(name in rows[-1] for name in TRL_NAMES)
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the first samples come from pi = pi_ref
    assert ("loss/xpo" in rows[0]) == ("exploration=xpo" in method)
    assert (out / "model.safetensors").is_file() and (out / "run_config.yaml").is_file()


def test_nash_md_with_reward_model_judge(tiny_dir, data, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    rm_dir = tmp_path / "rm"
    tok = AutoTokenizer.from_pretrained(tiny_dir / "model")
    rm = AutoModelForSequenceClassification.from_pretrained(tiny_dir / "model", num_labels=1)
    rm.config.pad_token_id = tok.pad_token_id
    rm.save_pretrained(rm_dir)
    tok.save_pretrained(rm_dir)
    out = tmp_path / "run"
    assert run(tiny_dir, data, out, f"judge={rm_dir}", "loss=nash-md", "mixture_coef=0.5",
               "regularizer=chi2mix") == 0
    rows = metrics(out)
    assert len(rows) == 2 and all(k in rows[-1] for k in ("loss/score", "loss/kl", "rewards/probabilities", "kl"))
    assert 0.0 < rows[0]["rewards/probabilities"] < 1.0  # Bradley-Terry probabilities, not labels


class FakeJudge(ChatServer):
    """An OpenAI-compatible server preferring the longer response (A when equal); counts requests."""

    SHOWN = re.compile(r"### Response A\n(.*?)\n\n### Response B\n(.*?)\n\nWhich", re.S)

    def __init__(self):
        self.requests = 0
        super().__init__()

    def respond(self, path, headers, body):
        first, second = self.SHOWN.search(body["messages"][-1]["content"]).groups()
        with self.lock:
            self.requests += 1
        verdict = "A" if len(first) >= len(second) else "B"
        return 200, {}, {"choices": [{"message": {"role": "assistant", "content": f"Longer.\nPreferred: {verdict}"}}]}


@pytest.mark.parametrize("loss", ["chipo", "nash-md"])
def test_llm_judge_on_local_server(tiny_dir, data, tmp_path, monkeypatch, loss):
    for name in ("CHIPO_JUDGE_BASE_URL", "CHIPO_JUDGE_MODEL", "CHIPO_JUDGE_API_KEY", "OPENAI_API_KEY",
                 "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    server = FakeJudge()
    try:
        out = tmp_path / "run"
        assert run(tiny_dir, data, out, "judge=openai", f"judge_base_url={server.url}", "judge_model=fake",
                   "judge_cache=null", f"loss={loss}") == 0
    finally:
        server.stop()
    rows = metrics(out)
    identical = sum(r.get("labels/ties", 0) for r in rows)  # identical pairs are ties without a request
    assert server.requests + identical == 8 and rows[-1]["labels"] == 8
    assert all(r["labels/missing"] == 0 for r in rows)


class SlowJudge(FakeJudge):
    """Answers only after 5 s: a hanging judge, for ``judge_timeout``."""

    def __init__(self):
        super().__init__()
        self.delay = 5.0


def test_judge_timeout_bounds_a_hanging_judge(tiny_dir, data, tmp_path, monkeypatch, capsys):
    """judge_timeout=0.5 with one attempt: each request to a judge that answers after 5 s is cut at 0.5 s; with
    every request failed the judge stops the run in one line (exit 2), and the run, stopped before its first
    step, leaves no output_dir behind."""
    for name in ("CHIPO_JUDGE_BASE_URL", "CHIPO_JUDGE_MODEL", "CHIPO_JUDGE_API_KEY", "OPENAI_API_KEY",
                 "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)
    server = SlowJudge()
    out = tmp_path / "run"
    try:
        assert run(tiny_dir, data, out, "judge=openai", f"judge_base_url={server.url}", "judge_model=fake",
                   "judge_cache=null", "loss=chipo", "max_steps=1", "judge_timeout=0.5",
                   "judge_max_attempts=1") == 2
    finally:
        server.stop()
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("chipo")]
    assert len(err) == 1 and "within deadline_s=0.5 s" in err[0], err
    assert not out.exists()


def test_label_budget_stops_the_run(tiny_dir, data, tmp_path):
    out = tmp_path / "run"
    assert run(tiny_dir, data, out, "judge=test_online_cli:length_reward", "max_steps=5", "max_labels=10") == 0
    assert [r["labels"] for r in metrics(out)] == [4, 8]  # a third step would spend 12 > 10


@pytest.mark.slow
def test_resume_retraces_the_uninterrupted_run(tiny_dir, data, tmp_path):
    judge = "judge=test_online_cli:length_reward"
    full, part = tmp_path / "full", tmp_path / "part"
    assert run(tiny_dir, data, full, judge, "max_steps=3") == 0
    assert run(tiny_dir, data, part, judge, "max_steps=2", "save_steps=1", "save_total_limit=1") == 0
    assert sorted(p.name for p in part.glob("checkpoint-*")) == ["checkpoint-2"]
    assert run(tiny_dir, data, part, judge, "max_steps=3", "resume_from_checkpoint=latest") == 0
    a, b = metrics(full), metrics(part)
    assert [r["step"] for r in b] == [1, 2, 3] and b[-1]["labels"] == 12
    assert b[-1]["loss"] == pytest.approx(a[-1]["loss"], abs=1e-6)


@pytest.mark.parametrize("extra, message", [
    (("loss=nope",), "unknown loss 'nope'"),
    (("loss=dpo", "regularizer=chi2"), "regularizer applies to loss=nash-md"),
    (("prompts_per_step=0",), "prompts_per_step must be at least 1"),
    (("judge=no_such_module:fn",), "cannot load reward"),
])
def test_bad_input_is_one_line(tiny_dir, data, tmp_path, capsys, extra, message):
    out = tmp_path / "run"
    assert run(tiny_dir, data, out, "judge=test_online_cli:length_reward", *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("chipo: error:") and message in err and "\n" not in err
    assert not out.exists()


def test_nan_stops_before_the_optimizer_step(tiny_dir, data, tmp_path):
    from accelerate import Accelerator

    from chipo.config import load_config
    from chipo.models import load_causal_lm, load_tokenizer
    from chipo.train.online import OnlineConfig, OnlineTrainer, PreferenceOracle
    from chipo.train.pairwise import NonFiniteError

    config = load_config(OnlineConfig, None, [f"policy={tiny_dir / 'model'}", "prompts=x",
                                              "judge=test_online_cli:length_reward", "prompts_per_step=2",
                                              "max_new_tokens=3"])
    tok = load_tokenizer(str(tiny_dir / "model"))
    policy, ref = load_causal_lm(str(tiny_dir / "model")), load_causal_lm(str(tiny_dir / "model"))
    with torch.no_grad():
        policy.lm_head.weight[0, 0] = float("nan")
    prompts = [tok(p)["input_ids"] for p in PROMPTS[:2]]
    trainer = OnlineTrainer(config, Accelerator(cpu=True), policy, ref, tok, PreferenceOracle(config), prompts,
                            PROMPTS[:2], tmp_path)
    before = policy.model.embed_tokens.weight.detach().clone()
    with pytest.raises(NonFiniteError, match="non-finite online loss at step 1"):
        trainer.train_step(0)
    assert torch.equal(policy.model.embed_tokens.weight, before)


@pytest.mark.slow
def test_ddp_two_processes_match_one_process(tiny_dir, data, tmp_path):
    """accelerate launch --num_processes 2 (gloo on CPU): each process samples, judges and differentiates 2 of the
    step's 4 prompts with the same per-prompt random streams; loss x (2 / 4) per process and DDP's gradient average
    give the 1-process gradient, so the per-step losses agree to the all-reduce's round-off."""
    common = [f"policy={tiny_dir / 'model'}", f"prompts={data / 'prompts.jsonl'}", "max_new_tokens=6",
              "prompts_per_step=4", "max_steps=3", "learning_rate=1e-3", "disable_tqdm=true", "save_steps=0",
              "judge=test_online_cli:length_reward", "loss=chipo", "exploration=xpo", "xpo_alpha=0.1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])}
    one, two = tmp_path / "one", tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "chipo.cli.main", "online", *common, f"output_dir={one}"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "chipo.cli.main", "online", *common, f"output_dir={two}"],
                          env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = metrics(one), metrics(two)
    assert len(a) == len(b) == 3
    for key in ("loss", "rewards/margins", "kl", "loss/xpo"):
        assert [r[key] for r in a] == pytest.approx([r[key] for r in b], abs=1e-5), key
    assert [r["labels"] for r in b] == [4, 8, 12]
