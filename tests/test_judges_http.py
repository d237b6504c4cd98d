"""OpenAIChatJudge against a local chat-completions server (http.server on 127.0.0.1, ephemeral port).

The fake judge prefers the summary containing "GOOD", so the expected outcome of every item is known whatever
order the candidates were shown in. Markers in the post script the server's behaviour per item: MALFORMED (an
unparseable reply), RATE (429 once, with Retry-After), FLAKY (500 once), DOWN (503 always), BADREQ (400).
"""

import json
import re
import socket

import pytest

from chat_server import ChatServer
from chipo.cli.judge import main as judge_main
from chipo.config import ConfigError
from chipo.judges import JudgeError, OpenAIChatJudge, OpenAIJudgeConfig
from chipo.judges.chat import outcome_for_a, shown_swapped

_SHOWN = re.compile(r"### Post\n(.*?)\n\n### Summary A\n(.*?)\n\n### Summary B\n(.*?)\n\n", re.S)


class FakeServer(ChatServer):
    """Records every request (body, headers, which summary was shown first) and the peak concurrency."""

    def __init__(self, delay: float = 0.0):
        self.requests: list[dict] = []
        self.seen: dict[str, int] = {}  # post -> requests so far
        super().__init__(delay)

    def respond(self, path, headers, body):
        post, first, second = _SHOWN.search(body["messages"][-1]["content"]).groups()
        with self.lock:
            count = self.seen[post] = self.seen.get(post, 0) + 1
            self.requests.append({"path": path, "headers": headers, "body": body, "post": post, "first": first,
                                  "second": second})
        if path != "/v1/chat/completions":
            return 404, {}, {"error": "not found"}
        if "DOWN" in post:
            return 503, {}, {"error": "overloaded"}
        if "BADREQ" in post:
            return 400, {}, {"error": "bad request"}
        if "RATE" in post and count == 1:
            return 429, {"Retry-After": "3"}, {"error": "rate limited"}
        if "FLAKY" in post and count == 1:
            return 500, {}, {"error": "internal"}
        better = "A" if "GOOD" in first else "B"
        reply = "I cannot decide, both are fine." if "MALFORMED" in post else \
            f"Summary {better} keeps the key point.\n**Preferred:** {better}"
        return 200, {}, {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}}]}


@pytest.fixture
def server():
    s = FakeServer()
    yield s
    s.stop()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("CHIPO_JUDGE_BASE_URL", "CHIPO_JUDGE_MODEL", "CHIPO_JUDGE_API_KEY", "OPENAI_API_KEY",
                 "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


def make_judge(url, tmp_path=None, **overrides):
    settings = dict(base_url=url, model="judge-model", cache=str(tmp_path / "cache.sqlite") if tmp_path else None,
                    backoff_initial_s=0.001, backoff_max_s=0.002, max_attempts=3, max_concurrency=4)
    settings.update(overrides)
    judge = OpenAIChatJudge(OpenAIJudgeConfig(**settings))
    judge.client.sleep = lambda s: None  # observe backoff without waiting for it
    return judge


def items(n, marker=lambda i: ""):
    """Post i; a holds GOOD for even i, so the expected outcome is 1.0 for even i and 0.0 for odd i."""
    prompts = [f"post {i} {marker(i)}".strip() for i in range(n)]
    a = [f"summary {i} {'GOOD' if i % 2 == 0 else 'meh'}" for i in range(n)]
    b = [f"summary {i} {'meh' if i % 2 == 0 else 'GOOD'}" for i in range(n)]
    return prompts, a, b


def expected(n):
    return [1.0 if i % 2 == 0 else 0.0 for i in range(n)]


def test_correct_answers_mapped_back_through_both_orders(server):
    prompts, a, b = items(12)
    result = make_judge(server.url).judge(prompts, a, b)
    assert result.outcomes == expected(12)
    assert result.status == ["ok"] * 12 and result.malformed == result.errors == 0
    assert result.win_rate == 0.5 and result.summary()["a_wins"] == 6
    # The server saw both orders, exactly as shown_swapped says, and the answers were mapped back correctly.
    firsts = {r["post"]: r["first"] for r in server.requests}
    swapped = [firsts[p] == y for p, y in zip(prompts, b)]
    assert any(swapped) and not all(swapped)
    assert swapped == [shown_swapped(0, p, x, y) for p, x, y in zip(prompts, a, b)]
    body = server.requests[0]["body"]
    assert body["model"] == "judge-model" and body["temperature"] == 0 and body["max_tokens"] == 256
    assert body["messages"][0]["role"] == "system"


def test_order_randomization_off_shows_a_first(server):
    prompts, a, b = items(6)
    result = make_judge(server.url, randomize_order=False).judge(prompts, a, b)
    assert result.outcomes == expected(6)
    assert all(r["first"] == a[int(r["post"].split()[1])] for r in server.requests)


def test_outcome_mapping():
    assert [outcome_for_a(v, False) for v in ("A", "B", "tie", None)] == [1.0, 0.0, 0.5, None]
    assert [outcome_for_a(v, True) for v in ("A", "B", "tie", None)] == [0.0, 1.0, 0.5, None]


def test_malformed_replies_are_counted_not_guessed(server):
    prompts, a, b = items(6, marker=lambda i: "MALFORMED" if i in (1, 4) else "")
    result = make_judge(server.url).judge(prompts, a, b)
    assert result.outcomes == [1.0, None, 1.0, 0.0, None, 0.0]
    assert result.malformed == 2 and result.errors == 0 and result.valid == 4
    assert result.raw[1] == "I cannot decide, both are fine."


def test_429_retried_honouring_retry_after_then_success(server):
    prompts, a, b = items(3, marker=lambda i: "RATE" if i == 1 else "")
    judge = make_judge(server.url)
    waits = []
    judge.client.sleep = waits.append
    result = judge.judge(prompts, a, b)
    assert result.outcomes == expected(3) and result.errors == 0
    assert server.seen["post 1 RATE"] == 2 and judge.client.requests == 4
    assert waits == [3.0]  # Retry-After: 3 beats the tiny configured backoff


def test_500_retried_then_success(server):
    prompts, a, b = items(4, marker=lambda i: "FLAKY" if i == 2 else "")
    result = make_judge(server.url).judge(prompts, a, b)
    assert result.outcomes == expected(4) and result.errors == 0
    assert server.seen["post 2 FLAKY"] == 2


def test_persistent_failure_counted_after_bounded_attempts(server):
    prompts, a, b = items(5, marker=lambda i: "DOWN" if i == 3 else "")
    result = make_judge(server.url, max_attempts=3).judge(prompts, a, b)
    assert result.outcomes[3] is None and result.status[3] == "error" and result.errors == 1
    assert "HTTP 503" in result.raw[3] and "after 3 attempts" in result.raw[3]
    assert server.seen["post 3 DOWN"] == 3
    assert [o for i, o in enumerate(result.outcomes) if i != 3] == [1.0, 0.0, 1.0, 1.0]


def test_non_retryable_status_fails_at_once(server):
    prompts, a, b = items(3, marker=lambda i: "BADREQ" if i == 0 else "")
    result = make_judge(server.url).judge(prompts, a, b)
    assert result.status[0] == "error" and server.seen["post 0 BADREQ"] == 1


def test_every_request_failing_raises(server):
    prompts, a, b = items(4, marker=lambda i: "DOWN")
    with pytest.raises(JudgeError, match="all 4 requests failed; first error: HTTP 503"):
        make_judge(server.url, fail_fast_after=0).judge(prompts, a, b)


def test_fail_fast_stops_paying_for_a_dead_endpoint(server):
    prompts, a, b = items(20, marker=lambda i: "DOWN")
    with pytest.raises(JudgeError, match="all 2 requests failed"):
        make_judge(server.url, fail_fast_after=2, max_concurrency=1, max_attempts=2).judge(prompts, a, b)
    assert len(server.requests) == 4  # 2 items x 2 attempts, the other 18 never sent


def test_connection_refused_is_not_retried():
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = make_judge(f"http://127.0.0.1:{port}/v1", max_attempts=2)
    prompts, a, b = items(2)
    with pytest.raises(JudgeError, match="cannot reach .*connection refused"):
        judge.judge(prompts, a, b)
    assert judge.client.requests <= 2  # at most one attempt per item (both may be in flight before the abort)


def test_concurrency_limit_respected():
    server = FakeServer(delay=0.05)
    try:
        prompts, a, b = items(12)
        result = make_judge(server.url, max_concurrency=3).judge(prompts, a, b)
        assert result.outcomes == expected(12)
        assert 2 <= server.max_in_flight <= 3
    finally:
        server.stop()


def test_cache_second_run_makes_no_requests(server, tmp_path):
    prompts, a, b = items(8, marker=lambda i: "MALFORMED" if i == 5 else "")
    first = make_judge(server.url, tmp_path).judge(prompts, a, b)
    sent = len(server.requests)
    assert sent == 8
    again = make_judge(server.url, tmp_path)
    second = again.judge(prompts, a, b)
    assert len(server.requests) == sent and again.client.requests == 0
    assert second.outcomes == first.outcomes and second.raw == first.raw
    assert second.cached == 7 and second.malformed == 1  # malformed replies are cached too (same answer at T=0)
    # A different judge model is a different key: it asks again.
    other = make_judge(server.url, tmp_path, model="other-model").judge(prompts[:2], a[:2], b[:2])
    assert other.status == ["ok", "ok"] and len(server.requests) == sent + 2


def test_failed_requests_are_not_cached(server, tmp_path):
    prompts, a, b = items(3, marker=lambda i: "DOWN" if i == 0 else "")
    make_judge(server.url, tmp_path, max_attempts=1).judge(prompts, a, b)
    result = make_judge(server.url, tmp_path, max_attempts=1).judge(prompts, a, b)
    assert result.status == ["error", "cached", "cached"] and server.seen["post 0 DOWN"] == 2


def test_identical_candidates_tie_without_a_request(server):
    result = make_judge(server.url).judge(["p"], ["same"], ["same"])
    assert result.outcomes == [0.5] and result.status == ["identical"] and not server.requests


def test_endpoint_from_environment_and_key_header(server, monkeypatch):
    monkeypatch.setenv("CHIPO_JUDGE_BASE_URL", server.url + "/chat/completions")
    monkeypatch.setenv("CHIPO_JUDGE_MODEL", "env-model")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    judge = OpenAIChatJudge(OpenAIJudgeConfig(cache=None))
    judge.judge(*items(1))
    request = server.requests[0]
    assert request["body"]["model"] == "env-model" and request["headers"]["Authorization"] == "Bearer sk-test"
    assert "sk-test" not in json.dumps(OpenAIJudgeConfig(api_key="sk-test").public_dict())


def test_config_errors(monkeypatch):
    with pytest.raises(ConfigError, match="judge model is not set"):
        OpenAIChatJudge(OpenAIJudgeConfig(base_url="http://127.0.0.1:1/v1", cache=None))
    with pytest.raises(ConfigError, match="needs an API key"):
        OpenAIChatJudge(OpenAIJudgeConfig(model="gpt-4o", cache=None))
    with pytest.raises(ConfigError, match="base_url must be an http"):
        OpenAIJudgeConfig(base_url="localhost:8000")
    with pytest.raises(ConfigError, match="jitter"):
        OpenAIJudgeConfig(jitter=2.0)


def test_cli_openai_pairs_file(server, tmp_path, capsys):
    prompts, a, b = items(4, marker=lambda i: "MALFORMED" if i == 3 else "")
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": p, "a": x, "b": y}) + "\n" for p, x, y in zip(prompts, a, b)))
    out, details = tmp_path / "res.json", tmp_path / "details.jsonl"
    code = judge_main(["--pairs", str(pairs), "--judge", "openai", "--output", str(out), "--details", str(details),
                       f"base_url={server.url}", "model=m", f"cache={tmp_path / 'c.sqlite'}", "api_key=sk-secret"])
    assert code == 0
    res = json.loads(out.read_text())
    assert res["n"] == 4 and res["valid"] == 3 and res["malformed"] == 1 and res["requests"] == 4
    assert res["win_rate_a"] == pytest.approx(2 / 3) and res["judge"] == "openai:m"
    assert "sk-secret" not in out.read_text()
    rows = [json.loads(line) for line in details.read_text().splitlines()]
    assert [r["outcome"] for r in rows] == [1.0, 0.0, 1.0, None] and rows[3]["status"] == "malformed"
    assert "win rate of a: 0.667" in capsys.readouterr().out


def test_cli_all_failing_is_one_line_error(server, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "DOWN", "a": "x", "b": "y"}) + "\n")
    code = judge_main(["--pairs", str(pairs), "--judge", "openai", "--output", str(tmp_path / "r.json"),
                       f"base_url={server.url}", "model=m", "cache=null", "max_attempts=1"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("chipo: error: judge openai:m") and err.count("\n") == 1
    assert not (tmp_path / "r.json").exists()
