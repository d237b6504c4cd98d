"""A minimal OpenAI-compatible chat-completions client with retries, on the standard library only.

Standard library rather than ``openai`` or ``httpx``: the judge needs one POST with retries, and the project should
not take a dependency (and its version churn) for that. ``urllib`` opens one connection per request, which is
negligible next to an LLM's answer time.

Retries: HTTP 429, 500, 502, 503, 504, timeouts (including the total deadline) and dropped connections are retried
up to ``max_attempts`` times in all, waiting ``min(backoff_max_s, backoff_initial_s * 2**k) * (1 - jitter * U[0, 1))``
before retry ``k + 1``, or longer when the server sends ``Retry-After`` (seconds or an HTTP date; capped at
``max_retry_after_s``). Any other HTTP status (400, 401, 404, ...), a reply over ``max_reply_bytes``, a redirect, and
an endpoint that cannot be reached at all (connection refused, unknown host: ``RequestFailed.unreachable``) will
not get better by asking again and fail at once.

Bounds per attempt: ``timeout_s`` on each connect and each read, and ``deadline_s`` on the whole attempt (connect,
headers, body). The per-read timeout alone does not bound a server that sends one byte a second; the deadline is
enforced by a timer that shuts the connection down, which wakes a read blocked in the kernel.

Secrets: error text shown to the user (``RequestFailed``) is built from the credential-free URL, truncated, stripped
of control characters and passed through ``redact``, since servers echo request headers in their error bodies.
"""

from __future__ import annotations

import base64
import email.utils
import http.client
import ipaddress
import json
import random
import re
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from datetime import datetime, timezone
from urllib.parse import unquote, urlparse, urlunparse

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})
ERROR_BODY_BYTES = 4096  # of an error reply, only a snippet is shown: never read more


class RequestFailed(Exception):
    """One request failed (after its retries, if it was retryable); ``str()`` is one line.

    ``unreachable``: nothing listens at the endpoint (connection refused, unknown host), so every other request to it
    will fail the same way."""

    def __init__(self, message: str, retryable: bool, retry_after: float | None = None, unreachable: bool = False):
        super().__init__(" ".join(message.split()))
        self.retryable = retryable
        self.retry_after = retry_after
        self.unreachable = unreachable


def retry_after_seconds(value: str | None, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header value (delta-seconds or HTTP date), or None if absent/bad."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, (when - (now or datetime.now(timezone.utc))).total_seconds())


def strip_credentials(url: str) -> str:
    """``url`` without a ``user:password@`` part: the form that may be shown, logged or written anywhere."""
    parsed = urlparse(url)
    if "@" not in parsed.netloc:
        return url
    return urlunparse(parsed._replace(netloc=parsed.netloc.rsplit("@", 1)[1]))


def url_credentials(url: str) -> tuple[str, str] | None:
    """(user, password) from a ``user:password@`` part of ``url``, or None."""
    parsed = urlparse(url)
    if parsed.username is None and parsed.password is None:
        return None
    return unquote(parsed.username or ""), unquote(parsed.password or "")


_SECRET_PATTERNS = [
    (re.compile(r"(?<=://)[^/\s@]+@"), "***@"),  # user:password@ in a URL
    # An echoed Authorization header. "Basic" only with a case-sensitive name and a base64 token: it is a word too.
    (re.compile(r"\b([Bb]earer|BEARER)\s+[^\s\"',;}]+"), r"\1 ***"),
    (re.compile(r"\bBasic\s+[A-Za-z0-9+/]{8,}={0,2}"), "Basic ***"),
    (re.compile(r"\bsk-[A-Za-z0-9_\-]{4,}"), "sk-***"),  # OpenAI-style keys (sk-..., sk-proj-...)
    # "api_key": "...", x-api-key: ..., token=..., password=...
    (re.compile(r"((?:api[_-]?key|token|secret|password)[\"']?\s*[:=]\s*[\"']?)[^\s\"',;}&]+", re.I), r"\1***"),
]


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with the given secrets and anything that looks like a credential replaced by ``***``.

    Secrets shorter than 4 characters are not searched for (they would mangle ordinary words and are no secret)."""
    for secret in sorted((s for s in secrets if s and len(s) >= 4), key=len, reverse=True):
        text = text.replace(secret, "***")
    for pattern, replacement in _SECRET_PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def _is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class _Watchdog:
    """Shuts the attempt's TCP connection down when its deadline passes.

    It holds a duplicate of the socket's file descriptor (``socket.dup``): shutting down the duplicate ends the
    connection under any wrapper (TLS wraps the socket after we see it, and detaches the original object), and the
    descriptor stays ours until ``disarm`` closes it, so the timer can never hit a descriptor reused by another
    connection."""

    def __init__(self, seconds: float):
        self.expired = False
        self._lock = threading.Lock()
        self._socks: list[socket.socket] = []
        self._done = False
        self._timer = threading.Timer(seconds, self._fire)
        self._timer.daemon = True
        self._timer.start()

    def watch(self, sock: socket.socket) -> None:
        dup = sock.dup()
        with self._lock:
            if not self._done:
                self._socks.append(dup)
                if self.expired:
                    _shutdown(dup)
                return
        dup.close()

    def _fire(self) -> None:
        with self._lock:
            if self._done:
                return
            self.expired = True
            for sock in self._socks:
                _shutdown(sock)

    def disarm(self) -> bool:
        """Stop the timer, release the descriptors; whether the deadline had passed."""
        self._timer.cancel()
        with self._lock:
            self._done = True
            socks, self._socks = self._socks, []
        for sock in socks:
            sock.close()
        return self.expired


def _shutdown(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass  # already closed by the peer


_current = threading.local()  # the watchdog of the attempt this thread is making


class _WatchedConnection:
    """Mixin for ``http.client`` connections: hand each new TCP socket to the current attempt's watchdog."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        create = self._create_connection

        def create_watched(*a, **kw):
            sock = create(*a, **kw)
            watchdog = getattr(_current, "watchdog", None)
            if watchdog is not None:
                watchdog.watch(sock)
            return sock

        self._create_connection = create_watched


class _WatchedHTTP(_WatchedConnection, http.client.HTTPConnection):
    pass


class _WatchedHTTPS(_WatchedConnection, http.client.HTTPSConnection):
    pass


class _HTTPHandler(urllib.request.HTTPHandler):
    def http_open(self, req):
        return self.do_open(_WatchedHTTP, req)


class _HTTPSHandler(urllib.request.HTTPSHandler):
    def https_open(self, req):
        return self.do_open(_WatchedHTTPS, req, context=self._context)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A chat-completions POST is never redirected; following one would forward the Authorization header to
    wherever the redirect points (urllib keeps it), so a 3xx fails as a non-retryable HTTP error instead."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


class ChatClient:
    """POST ``{base_url}/chat/completions`` and return the first choice's message content.

    ``base_url`` may carry ``user:password@``: it is sent as HTTP Basic authentication and removed from the URL
    that is kept (``base_url``, ``url``) and shown. ``sleep`` and ``rng`` are attributes so tests can observe the
    backoff without waiting for it.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, timeout_s: float = 120.0,
                 deadline_s: float = 120.0, max_reply_bytes: int = 4 * 1024 * 1024, max_attempts: int = 5,
                 backoff_initial_s: float = 1.0, backoff_max_s: float = 30.0, jitter: float = 0.5,
                 max_retry_after_s: float = 120.0, seed: int | None = None):
        credentials = url_credentials(base_url)
        self.base_url = strip_credentials(base_url).rstrip("/")
        self.url = self.base_url + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self._auth = f"Bearer {api_key}" if api_key else None
        self._secrets = [api_key]
        if credentials and not api_key:
            token = base64.b64encode(":".join(credentials).encode("utf-8")).decode("ascii")
            self._auth = f"Basic {token}"
            self._secrets += [*credentials, token]
        self.timeout_s = timeout_s
        self.deadline_s = deadline_s
        self.max_reply_bytes = max_reply_bytes
        self.max_attempts = max_attempts
        self.backoff_initial_s = backoff_initial_s
        self.backoff_max_s = backoff_max_s
        self.jitter = jitter
        self.max_retry_after_s = max_retry_after_s
        self.sleep = time.sleep
        self.rng = random.Random(seed)
        self._lock = threading.Lock()
        self.requests = 0
        """HTTP requests sent so far (every attempt counts), across threads."""
        handlers = [_HTTPHandler(), _HTTPSHandler(), _NoRedirect()]
        # An http(s)_proxy set for reaching a hosted API must not capture a local vLLM server on 127.0.0.1.
        if _is_loopback(self.url):
            handlers.append(urllib.request.ProxyHandler({}))
        self._opener = urllib.request.build_opener(*handlers)

    def redact(self, text: str) -> str:
        """``text`` without this client's key or URL credentials (or anything credential-like)."""
        return redact(text, self._secrets)

    def complete(self, messages: list[dict], max_tokens: int) -> str:
        """The reply text ("" when the server sent no content); ``RequestFailed`` after the last attempt."""
        body = json.dumps({"model": self.model, "messages": messages, "temperature": 0,
                           "max_tokens": max_tokens}).encode("utf-8")
        for attempt in range(1, self.max_attempts + 1):
            try:
                return self._post(body)
            except RequestFailed as failure:
                if not failure.retryable or attempt == self.max_attempts:
                    suffix = f" (after {attempt} attempts)" if attempt > 1 else ""
                    # The one place failure text leaves the client: redacted here, whatever built it.
                    raise RequestFailed(self.redact(f"{failure}{suffix}"), failure.retryable,
                                        unreachable=failure.unreachable) from None
                self.sleep(self.backoff_delay(attempt, failure.retry_after))
        raise AssertionError("unreachable")  # the loop returns or raises

    def backoff_delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait after failed attempt ``attempt`` (1-based)."""
        base = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (attempt - 1))
        delay = base * (1.0 - self.jitter * self.rng.random())
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_retry_after_s))
        return delay

    def _post(self, body: bytes) -> str:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self._auth:
            headers["Authorization"] = self._auth
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with self._lock:
            self.requests += 1
        watchdog = _current.watchdog = _Watchdog(self.deadline_s)
        try:
            payload, failure = self._exchange(request), None
        except RequestFailed as e:
            payload, failure = b"", e
        finally:
            _current.watchdog = None
            expired = watchdog.disarm()
        # Whatever the read saw after the shutdown (a reset, an early EOF, or a close-delimited body cut short that
        # looks complete), the cause is the deadline.
        if expired:
            raise RequestFailed(f"no complete reply from {self.url} within deadline_s={self.deadline_s:g} s",
                                retryable=True)
        if failure is not None:
            raise failure
        return self._content(payload)

    def _content(self, payload: bytes) -> str:
        try:
            data = json.loads(payload)
            content = data["choices"][0]["message"].get("content")
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            raise RequestFailed(f"{self.url} answered 200 but not with a chat completion: {self._snippet(payload)}",
                                retryable=False) from None
        # None: e.g. a refusal or a tool call; no text means no verdict, which the parser reports as malformed.
        return content if isinstance(content, str) else ""

    def _snippet(self, payload: bytes, limit: int = 200) -> str:
        """At most ``limit`` characters of a reply body, redacted before it is cut (a cut key would no longer
        match), printable characters only (no terminal escape sequences reach the user)."""
        text = self.redact(payload.decode("utf-8", errors="replace"))
        text = " ".join("".join(c if c.isprintable() else " " for c in text).split())
        return text if len(text) <= limit else text[: limit - 3] + "..."

    def _exchange(self, request: urllib.request.Request) -> bytes:
        """Send ``request``; the body, read up to ``max_reply_bytes``; ``RequestFailed`` for anything else."""
        try:
            with self._opener.open(request, timeout=min(self.timeout_s, self.deadline_s)) as response:
                return _read_capped(response, self.max_reply_bytes, self.url)
        except urllib.error.HTTPError as e:
            try:
                detail = self._snippet(e.read(ERROR_BODY_BYTES) if e.fp is not None else b"")
            except (OSError, http.client.HTTPException):
                detail = ""
            if 300 <= e.code < 400:
                detail = f"redirect to {strip_credentials(e.headers.get('Location') or '?')}, not followed"
            wait_s = retry_after_seconds(e.headers.get("Retry-After") if e.headers else None)
            raise RequestFailed(f"HTTP {e.code} from {self.url}: {detail}", retryable=e.code in RETRY_STATUS,
                                retry_after=wait_s) from None
        except urllib.error.URLError as e:
            if isinstance(e.reason, ConnectionRefusedError):
                raise RequestFailed(f"cannot reach {self.url}: connection refused (is the server running?)",
                                    retryable=False, unreachable=True) from None
            if isinstance(e.reason, socket.gaierror):
                raise RequestFailed(f"cannot reach {self.url}: unknown host ({e.reason.strerror})",
                                    retryable=False, unreachable=True) from None
            raise RequestFailed(f"cannot reach {self.url}: {e.reason}", retryable=True) from None
        except (TimeoutError, ConnectionError, http.client.HTTPException, OSError) as e:
            # Timeouts while reading, resets, a server closing the connection without a response.
            raise RequestFailed(f"{type(e).__name__} talking to {self.url}: {e}", retryable=True) from None


def _read_capped(response, limit: int, url: str) -> bytes:
    """The body, or a non-retryable ``RequestFailed`` as soon as it is known to exceed ``limit`` bytes."""
    too_big = RequestFailed(f"reply from {url} is larger than max_reply_bytes={limit}", retryable=False)
    declared = response.headers.get("Content-Length", "")
    if declared.strip().isdigit() and int(declared) > limit:
        raise too_big
    chunks, total = [], 0
    while chunk := response.read(min(65536, limit + 1 - total)):
        chunks.append(chunk)
        total += len(chunk)
        if total > limit:
            raise too_big
    return b"".join(chunks)


