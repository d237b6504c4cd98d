"""The judge client against hostile or broken servers (raw sockets and http.server on 127.0.0.1 only).

Each test bounds its own wall time: the call under test runs in a daemon thread joined with a timeout, so a
regression (a client that hangs on a trickling server) fails the test instead of hanging the suite.
"""

import json
import logging
import socket
import threading
import time

import pytest

from chipo.cli.judge import main as judge_main
from chipo.config import ConfigError
from chipo.judges import JudgeError, OpenAIJudgeConfig
from chipo.judges.cache import ReplyCache
from chipo.judges.http import ChatClient, RequestFailed, redact, strip_credentials
from test_judges_http import FakeServer, items, make_judge

MESSAGES = [{"role": "user", "content": "hi"}]
OK_BODY = json.dumps({"choices": [{"message": {"content": "Preferred: A"}}]}).encode()


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch):
    for name in ("CHIPO_JUDGE_BASE_URL", "CHIPO_JUDGE_MODEL", "CHIPO_JUDGE_API_KEY", "OPENAI_API_KEY",
                 "OPENAI_BASE_URL"):
        monkeypatch.delenv(name, raising=False)


class RawServer:
    """Accepts connections on 127.0.0.1 and hands each to ``serve(conn, stop)`` in its own daemon thread."""

    def __init__(self, serve):
        self.stop_event = threading.Event()
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.05)
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}/v1"

        def accept_loop():
            while not self.stop_event.is_set():
                try:
                    conn, _ = self.listener.accept()
                except (TimeoutError, OSError):
                    continue
                self.connections += 1
                threading.Thread(target=self._serve, args=(serve, conn), daemon=True).start()

        threading.Thread(target=accept_loop, daemon=True).start()

    def _serve(self, serve, conn):
        try:
            conn.settimeout(5)
            _read_request(conn)
            serve(conn, self.stop_event)
        except OSError:
            pass  # the client hung up: what these tests provoke
        finally:
            conn.close()

    def close(self):
        self.stop_event.set()
        self.listener.close()


def _read_request(conn):
    data = b""
    while b"\r\n\r\n" not in data:
        data += conn.recv(65536)
    head, body = data.split(b"\r\n\r\n", 1)
    lines = head.lower().split(b"\r\n")
    length = next(int(line.split(b":")[1]) for line in lines if line.startswith(b"content-length"))
    while len(body) < length:
        body += conn.recv(65536)


def trickle(payload: bytes, interval: float = 0.02):
    """A server that sends ``payload`` one byte per ``interval`` seconds, then keeps trickling spaces."""
    def serve(conn, stop):
        for byte in payload:
            conn.sendall(bytes([byte]))
            time.sleep(interval)
        while not stop.is_set():
            conn.sendall(b" ")
            time.sleep(interval)
    return serve


def bounded(fn, limit_s: float = 10.0):
    """Run ``fn`` in a daemon thread; its result or exception, or a test failure if it is not done in time."""
    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as e:  # noqa: BLE001 (handed back to the test)
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    start = time.monotonic()
    thread.start()
    thread.join(limit_s)
    assert not thread.is_alive(), f"still running after {limit_s} s"
    return box, time.monotonic() - start


def client(url, **kw):
    settings = dict(timeout_s=5.0, max_attempts=1)
    settings.update(kw)
    return ChatClient(url, "m", **settings)


@pytest.mark.parametrize("where", ["status line", "body"])
def test_deadline_holds_against_a_trickling_server(where):
    """Every byte arrives well within timeout_s (5 s), so only a total deadline (0.6 s) can end the request."""
    head = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 1000000\r\n\r\n"

    def body_trickle(conn, stop):
        conn.sendall(head)
        trickle(b"{")(conn, stop)

    server = RawServer(trickle(head) if where == "status line" else body_trickle)
    try:
        box, elapsed = bounded(lambda: client(server.url, deadline_s=0.6).complete(MESSAGES, 8))
    finally:
        server.close()
    assert isinstance(box.get("error"), RequestFailed), box
    assert "deadline" in str(box["error"]) and box["error"].retryable
    assert 0.5 < elapsed < 3.0


def test_deadline_is_retried_like_a_timeout():
    server = RawServer(trickle(b"HTTP/1.1 200 OK\r\n", 0.02))
    try:
        c = client(server.url, deadline_s=0.3, max_attempts=2)
        c.sleep = lambda s: None
        box, _ = bounded(lambda: c.complete(MESSAGES, 8))
    finally:
        server.close()
    assert "after 2 attempts" in str(box["error"]) and c.requests == 2


@pytest.mark.parametrize("declared", [True, False])
def test_reply_size_is_capped(declared):
    """A valid chat completion of ~20 kB, over a 4 kB cap: refused, with or without a Content-Length, not retried
    (the same request would get the same reply). Without a length the server streams forever: the client must stop
    reading at the cap rather than buffer it."""
    big = json.dumps({"choices": [{"message": {"content": "Preferred: A " + "x" * 20000}}]}).encode()

    def serve(conn, stop):
        if declared:
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(big) + big)
            return
        conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + big)
        while not stop.is_set():
            conn.sendall(b" " * 65536)

    server = RawServer(serve)
    try:
        c = client(server.url, max_reply_bytes=4096, max_attempts=3)
        box, _ = bounded(lambda: c.complete(MESSAGES, 8))
    finally:
        server.close()
    error = box.get("error")
    assert isinstance(error, RequestFailed) and "max_reply_bytes" in str(error) and not error.retryable
    assert c.requests == 1


def test_reply_under_the_cap_is_read():
    server = RawServer(lambda conn, stop: conn.sendall(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + OK_BODY))
    try:
        box, _ = bounded(lambda: client(server.url, max_reply_bytes=len(OK_BODY)).complete(MESSAGES, 8))
    finally:
        server.close()
    assert box == {"value": "Preferred: A"}


def test_redact():
    text = ("Authorization: Bearer abc.DEF-123 from http://bob:hunter22@host/v1, key sk-proj-AbC123xyz789, "
            '"api_key": "mykey1234", my-secret-value')
    out = redact(text, ["my-secret-value"])
    for secret in ("abc.DEF-123", "hunter22", "bob:", "AbC123xyz789", "mykey1234", "my-secret-value"):
        assert secret not in out, out
    assert "Bearer ***" in out and "http://***@host/v1" in out and "sk-***" in out
    assert strip_credentials("https://u:p@example.com:8443/v1") == "https://example.com:8443/v1"
    assert strip_credentials("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"


def test_error_bodies_are_redacted_truncated_and_one_line():
    """A server that echoes the Authorization header (and other key-like tokens) back in a long 401 body."""
    key = "sk-live-0123456789abcdef"

    def serve(conn, stop):
        body = (b"\x1b[31mUnauthorized\nheader was: Bearer " + key.encode() + b" bearer-echo " + key.encode()
                + b" " + b"z" * 5000)
        conn.sendall(b"HTTP/1.1 401 Unauthorized\r\nContent-Length: %d\r\n\r\n" % len(body) + body)

    server = RawServer(serve)
    try:
        box, _ = bounded(lambda: ChatClient(server.url, "m", api_key=key, max_attempts=1).complete(MESSAGES, 8))
    finally:
        server.close()
    message = str(box["error"])
    assert key not in message and "0123456789" not in message and "\x1b" not in message
    assert "HTTP 401" in message and "***" in message and "\n" not in message and len(message) < 400


def test_redirects_are_not_followed():
    """urllib would follow a 302 for a POST as a GET and forward the Authorization header to the new location."""
    target = RawServer(lambda conn, stop: conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"))

    def serve(conn, stop):
        conn.sendall(b"HTTP/1.1 302 Found\r\nLocation: %s\r\nContent-Length: 0\r\n\r\n" % target.url.encode())

    server = RawServer(serve)
    try:
        c = client(server.url, api_key="sk-redirected-key", max_attempts=3)
        box, _ = bounded(lambda: c.complete(MESSAGES, 8))
    finally:
        server.close()
        target.close()
    error = box.get("error")
    assert isinstance(error, RequestFailed) and "HTTP 302" in str(error) and "not followed" in str(error)
    assert not error.retryable and target.connections == 0


def test_credentials_in_base_url_are_sent_as_basic_auth_and_never_recorded(tmp_path):
    server = FakeServer()
    host = server.url.split("//", 1)[1]
    url = f"http://alice:sk-urlsecret99@{host}"
    try:
        judge = make_judge(url, tmp_path)
        judge.judge(*items(2))
    finally:
        server.stop()
    assert server.requests[0]["headers"]["Authorization"].startswith("Basic ")
    assert judge.client.url == server.url + "/chat/completions"
    public = json.dumps(OpenAIJudgeConfig(base_url=url).public_dict())
    assert "sk-urlsecret99" not in public and "alice" not in public and server.url in public
    cache = ReplyCache(tmp_path / "cache.sqlite")
    rows = cache._db.execute("SELECT base_url FROM replies").fetchall()
    assert rows and all(row == (server.url,) for row in rows)
    with pytest.raises(ConfigError) as info:
        OpenAIJudgeConfig(base_url="ftp://alice:sk-urlsecret99@host/v1")
    assert "sk-urlsecret99" not in str(info.value)
    with pytest.raises(ConfigError, match="credentials"):
        make_judge(url, api_key="sk-other")


def test_cache_key_includes_the_server(tmp_path):
    """Two servers behind one cache file: the second is asked too, never answered with the first one's verdicts."""
    first, second = FakeServer(), FakeServer()
    try:
        make_judge(first.url, tmp_path).judge(*items(3))
        result = make_judge(second.url, tmp_path).judge(*items(3))
        again = make_judge(second.url + "/", tmp_path).judge(*items(3))  # same server, trailing slash
    finally:
        first.stop()
        second.stop()
    assert result.status == ["ok"] * 3 and len(second.requests) == 3
    assert again.status == ["cached"] * 3


def test_refused_connection_fails_fast_with_one_line(caplog):
    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = make_judge(f"http://127.0.0.1:{port}/v1", max_attempts=5, max_concurrency=1)
    with caplog.at_level(logging.INFO), pytest.raises(JudgeError) as info:
        judge.judge(*items(15))
    assert "connection refused" in str(info.value) and judge.client.requests == 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_partial_failures_are_summarised_in_one_warning(caplog):
    server = FakeServer()
    try:
        with caplog.at_level(logging.INFO):
            result = make_judge(server.url, max_attempts=2).judge(*items(6, marker=lambda i: "DOWN" if i % 2 else ""))
    finally:
        server.stop()
    assert result.errors == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "3 of 6 requests failed" in warnings[0], warnings


def test_cache_not_created_when_every_request_failed(tmp_path):
    server = FakeServer()
    path = tmp_path / "new" / "cache.sqlite"
    try:
        with pytest.raises(JudgeError):
            make_judge(server.url, cache=str(path), max_attempts=1).judge(*items(3, marker=lambda i: "DOWN"))
    finally:
        server.stop()
    assert not path.exists() and not path.parent.exists()


def test_unusable_cache_path_is_a_config_error(tmp_path):
    (tmp_path / "dir.sqlite").mkdir()
    with pytest.raises(ConfigError, match="cache"):
        make_judge("http://127.0.0.1:1/v1", cache=str(tmp_path / "dir.sqlite"))
    (tmp_path / "junk.sqlite").write_text("not a database " * 100)
    with pytest.raises(ConfigError, match="cache"):
        make_judge("http://127.0.0.1:1/v1", cache=str(tmp_path / "junk.sqlite"))


def test_config_validates_new_keys():
    with pytest.raises(ConfigError, match="deadline_s"):
        OpenAIJudgeConfig(deadline_s=0)
    with pytest.raises(ConfigError, match="max_reply_bytes"):
        OpenAIJudgeConfig(max_reply_bytes=0)


def _pairs(tmp_path, marker=""):
    prompts, a, b = items(2, marker=lambda i: marker)
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "a": x, "b": y}) + "\n" for p, x, y in zip(prompts, a, b)))
    return str(path)


@pytest.mark.parametrize("bad", ["directory", "under a file"])
def test_cli_checks_the_output_path_before_any_request(tmp_path, capsys, bad):
    server = FakeServer()
    (tmp_path / "results").mkdir()
    (tmp_path / "afile").write_text("x")
    output = tmp_path / "results" if bad == "directory" else tmp_path / "afile" / "res.json"
    try:
        for flag in ("--output", "--details"):
            paths = {"--output": str(tmp_path / "ok.json"), "--details": str(tmp_path / "ok.jsonl"), flag: str(output)}
            code = judge_main(["--pairs", _pairs(tmp_path), "--judge", "openai", "--output", paths["--output"],
                               "--details", paths["--details"], f"base_url={server.url}", "model=m", "cache=null"])
            err = capsys.readouterr().err
            assert code == 2 and err.startswith(f"chipo: error: {flag}: ") and err.count("\n") == 1, err
    finally:
        server.stop()
    assert not server.requests and not (tmp_path / "ok.json").exists()


def test_cli_refused_connection_is_one_line_without_secrets(tmp_path, capsys, caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cache = tmp_path / "c.sqlite"
    with caplog.at_level(logging.INFO):
        code = judge_main(["--pairs", _pairs(tmp_path), "--judge", "openai", "--output", str(tmp_path / "r.json"),
                           f"base_url=http://bob:sk-hunter2hunter2@127.0.0.1:{port}/v1", "model=m", f"cache={cache}"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("chipo: error: ") and err.count("\n") == 1, err
    assert "connection refused" in err and "hunter2" not in err and "bob" not in err
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert not cache.exists() and not (tmp_path / "r.json").exists()


def test_cli_server_error_echoing_the_key_is_redacted(tmp_path, capsys):
    class Echo(FakeServer):
        def respond(self, path, headers, body):
            super().respond(path, headers, body)
            return 401, {}, {"error": f"invalid key, you sent {headers.get('Authorization')}"}

    server = Echo()
    try:
        code = judge_main(["--pairs", _pairs(tmp_path), "--judge", "openai", "--output", str(tmp_path / "r.json"),
                           f"base_url={server.url}", "model=m", "cache=null", "api_key=k3y-very-secret"])
    finally:
        server.stop()
    err = capsys.readouterr().err
    assert code == 2 and "HTTP 401" in err and "k3y-very-secret" not in err and err.count("\n") == 1, err
