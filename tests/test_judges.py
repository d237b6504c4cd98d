"""Judges without a server: verdict parsing, JudgeResult accounting, the reward-model judge, backoff arithmetic,
and ``chipo judge`` with a reward-model judge."""

import json
import math
from datetime import datetime, timedelta, timezone

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from chipo.cli.judge import main as judge_main
from chipo.judges import TLDR_PROMPT, Judge, JudgeResult, PairwisePrompt, RewardModelJudge, parse_verdict
from chipo.judges.cache import cache_key
from chipo.judges.http import ChatClient, retry_after_seconds


def length_scorer(prompts, responses):
    """A ``module:function`` scorer for the CLI test: longer is better."""
    return [float(len(r)) for r in responses]


@pytest.mark.parametrize("reply, verdict", [
    ("Preferred: A", "A"),
    ("preferred: b", "B"),
    ("  PREFERRED -  B  ", "B"),
    ("**Preferred:** B", "B"),
    ("### Preferred: A", "A"),
    ('Preferred: "A"', "A"),
    ("Preferred: Summary B.", "B"),
    ("Preferred: A (more concise)", "A"),
    ("Summary B misses the request.\nSummary A is precise.\n\nPreferred: A", "A"),
    ("Preferred: A.\nSummary B is too long.", "A"),  # text after the verdict line does not confuse it
    ("A", "A"),
    ("**B**", "B"),
    ("Preferred: tie", "tie"),
    ("Preferred: A\nPreferred: A", "A"),
    # never guessed:
    ("", None),
    (None, None),
    ("I think B is better", None),  # no verdict line, and not a bare label
    ("Preferred: a summary that covers more", None),  # lower-case 'a' followed by words is the article
    ("Preferred: A or B", None),
    ("Preferred: A, although B is shorter", None),
    ("Preferred: A\nPreferred: B", None),  # conflicting verdicts
    ("Preferred: C", None),
    ("Preferred:", None),
])
def test_parse_verdict(reply, verdict):
    assert parse_verdict(reply) == verdict


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="aAbB"), max_size=200))
def test_parse_verdict_never_invents_a_label(text):
    """Without the letters A or B anywhere in the reply there is nothing to read a verdict from (ties aside)."""
    assert parse_verdict(text) in (None, "tie")


@settings(max_examples=100, deadline=None)
@given(st.text(alphabet=st.characters(blacklist_characters="\r\n\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"), max_size=80),
       st.sampled_from(["A", "B"]))
def test_parse_verdict_reads_the_final_line_after_any_reasoning(reasoning, label):
    assume("preferred" not in reasoning.lower())  # the reasoning itself could hold a (conflicting) verdict line
    assert parse_verdict(f"{reasoning}\nPreferred: {label}") == label


def test_prompt_key_changes_with_the_text():
    edited = PairwisePrompt(TLDR_PROMPT.version, TLDR_PROMPT.system, TLDR_PROMPT.user + " Be brief.")
    assert edited.key != TLDR_PROMPT.key and edited.key.startswith("tldr-pairwise-v1:")
    messages = TLDR_PROMPT.messages("the post", "first one", "second one")
    assert "### Summary A\nfirst one\n\n### Summary B\nsecond one" in messages[-1]["content"]
    assert cache_key("u", "m", "t", "p", "x", "y") != cache_key("u", "m", "t", "p", "y", "x")
    assert cache_key("http://a/v1", "m", "t", "p", "x", "y") != cache_key("http://b/v1", "m", "t", "p", "x", "y")
    assert cache_key("http://k:s@a/v1/", "m", "t", "p", "x", "y") == cache_key("http://a/v1", "m", "t", "p", "x", "y")


def test_judge_result_accounting():
    r = JudgeResult([1.0, 0.0, 0.5, None, None, 1.0], ["ok", "cached", "identical", "malformed", "error", "ok"])
    s = r.summary()
    assert (s["n"], s["valid"], s["malformed"], s["errors"], s["cached"]) == (6, 4, 1, 1, 1)
    assert (s["a_wins"], s["b_wins"], s["ties"]) == (2, 1, 1)
    assert s["win_rate_a"] == pytest.approx(2.5 / 4)
    assert s["stderr"] == pytest.approx(math.sqrt(((0.375**2) * 2 + 0.625**2 + 0.125**2) / 3 / 4))
    empty = JudgeResult([None], ["error"]).summary()
    assert empty["win_rate_a"] is None and empty["stderr"] is None
    with pytest.raises(ValueError):
        JudgeResult([1.0], [])


class TableScorer:
    name = "table"

    def __init__(self, table):
        self.table = table

    def score(self, prompts, responses):
        return [self.table[r] for r in responses]


def test_reward_model_judge_compares_scores():
    judge = RewardModelJudge(TableScorer({"hi": 2.0, "lo": 1.0, "mid": 1.5, "mid2": 1.5, "nan": math.nan}))
    assert isinstance(judge, Judge) and judge.name == "reward-model:table"
    r = judge.judge(["p"] * 5, ["hi", "lo", "mid", "nan", "hi"], ["lo", "hi", "mid2", "hi", "hi"])
    assert r.outcomes == [1.0, 0.0, 0.5, None, 0.5]
    assert r.status == ["ok", "ok", "ok", "malformed", "identical"]
    tolerant = RewardModelJudge(TableScorer({"a": 1.0, "b": 1.05}), tie_tolerance=0.1)
    assert tolerant.judge(["p"], ["a"], ["b"]).outcomes == [0.5]
    with pytest.raises(ValueError, match="same length"):
        judge.judge(["p"], ["hi"], [])


def test_reward_model_judge_from_hf_directory(tiny_dir, tmp_path):
    """A reward model given by path is loaded by chipo.rewards.load_scorer and compared."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir / "model")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, num_labels=1,
                         pad_token_id=tokenizer.pad_token_id)
    LlamaForSequenceClassification(config).save_pretrained(tmp_path / "rm")
    tokenizer.save_pretrained(tmp_path / "rm")
    for template in (None, "{prompt}\n{response}"):  # chipo's reward tokenization, or a formatted text
        judge = RewardModelJudge(str(tmp_path / "rm"), template=template)
        scores = judge.scorer.score(["why?"] * 2, ["good answer.", "bad."])
        assert scores[0] != scores[1]
        r = judge.judge(["why?"], ["good answer."], ["bad."])
        assert r.outcomes == [1.0 if scores[0] > scores[1] else 0.0] and r.status == ["ok"]


def test_retry_after_and_backoff():
    now = datetime(2025, 1, 1, tzinfo=timezone.utc)
    assert retry_after_seconds("7", now) == 7.0
    date = (now + timedelta(seconds=30)).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert retry_after_seconds(date, now) == pytest.approx(30.0)
    assert retry_after_seconds("soon", now) is None and retry_after_seconds(None) is None
    client = ChatClient("http://127.0.0.1:1/v1", "m", backoff_initial_s=1.0, backoff_max_s=5.0, jitter=0.0,
                        max_retry_after_s=60.0)
    assert [client.backoff_delay(k) for k in (1, 2, 3, 4)] == [1.0, 2.0, 4.0, 5.0]
    assert client.backoff_delay(1, retry_after=10.0) == 10.0 and client.backoff_delay(1, retry_after=999) == 60.0
    client.jitter = 0.5
    assert all(0.5 <= client.backoff_delay(1) <= 1.0 for _ in range(50))


def test_cli_reward_model_judge_on_two_sample_files(tmp_path, capsys):
    a = [{"prompt": f"post {i}", "completion": "a long summary" if i < 3 else "short"} for i in range(4)]
    b = [{"prompt": f"post {i}", "completion": "medium one"} for i in range(4)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in a))
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in b))
    out = tmp_path / "res.json"
    code = judge_main(["--a", str(tmp_path / "a.jsonl"), "--b", str(tmp_path / "b.jsonl"), "--judge", "reward-model",
                       "--output", str(out), "model=test_judges:length_scorer"])
    assert code == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["win_rate_a"] == 0.75 and res["n"] == 4 and res["requests"] == 0
    assert res["judge"] == "reward-model:test_judges:length_scorer"


def test_cli_input_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text(json.dumps({"prompt": "p", "completion": "x"}) + "\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"prompt": "q", "completion": "y"}) + "\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "p", "a": "x", "b": 3}) + "\n")
    base = ["--judge", "reward-model", "--output", str(tmp_path / "r.json"), "model=test_judges:length_scorer"]
    cases = [
        (["--a", str(tmp_path / "a.jsonl"), "--b", str(tmp_path / "b.jsonl")], "b.jsonl: row 0, field 'prompt': "
                                                                              "prompt differs from row 0"),
        (["--pairs", str(tmp_path / "p.jsonl")], "p.jsonl: row 0 (line 1), field 'b': expected a string"),
        (["--pairs", str(tmp_path / "p.jsonl"), "--b-field", "rejected"], "missing column 'rejected'"),
        (["--pairs", str(tmp_path / "missing.jsonl")], "missing.jsonl: file not found"),
        (["--a", str(tmp_path / "a.jsonl")], "give --pairs FILE, or both --a FILE and --b FILE"),
    ]
    for extra, expected in cases:
        assert judge_main(extra + base) == 2
        err = capsys.readouterr().err
        assert err.startswith("chipo: error: ") and expected in err and err.count("\n") == 1, err
    assert judge_main(["--pairs", str(tmp_path / "p.jsonl"), "--judge", "openai", "--output", "x.json",
                       "max_concurency=2"]) == 2
    assert "did you mean 'max_concurrency'" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
