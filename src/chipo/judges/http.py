"""A minimal OpenAI-compatible chat-completions client with retries, on the standard library only.

Standard library rather than ``openai`` or ``httpx``: the judge needs one POST with retries, and the project should
not take a dependency (and its version churn) for that. ``urllib`` opens one connection per request, which is
negligible next to an LLM's answer time.

Retries: HTTP 429, 500, 502, 503, 504, timeouts and connection errors are retried up to ``max_attempts`` times in
all, waiting ``min(backoff_max_s, backoff_initial_s * 2**k) * (1 - jitter * U[0, 1))`` before retry ``k + 1``,
or longer when the server sends ``Retry-After`` (seconds or an HTTP date; capped at ``max_retry_after_s``). Any
other HTTP status (400, 401, 404, ...) will not get better by asking again and fails at once.
"""

from __future__ import annotations

import email.utils
import http.client
import ipaddress
import json
import random
import threading
import time
import urllib.error
import urllib.request
from datetime import datetime, timezone
from urllib.parse import urlparse

RETRY_STATUS = frozenset({429, 500, 502, 503, 504})


class RequestFailed(Exception):
    """One request failed (after its retries, if it was retryable); ``str()`` is one line."""

    def __init__(self, message: str, retryable: bool, retry_after: float | None = None):
        super().__init__(" ".join(message.split()))
        self.retryable = retryable
        self.retry_after = retry_after


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


def _is_loopback(url: str) -> bool:
    host = urlparse(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ChatClient:
    """POST ``{base_url}/chat/completions`` and return the first choice's message content.

    ``sleep`` and ``rng`` are attributes so tests can observe the backoff without waiting for it.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, timeout_s: float = 120.0,
                 max_attempts: int = 5, backoff_initial_s: float = 1.0, backoff_max_s: float = 30.0,
                 jitter: float = 0.5, max_retry_after_s: float = 120.0, seed: int | None = None):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model = model
        self.api_key = api_key
        self.timeout_s = timeout_s
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
        # An http(s)_proxy set for reaching a hosted API must not capture a local vLLM server on 127.0.0.1.
        handlers = [urllib.request.ProxyHandler({})] if _is_loopback(self.url) else []
        self._opener = urllib.request.build_opener(*handlers)

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
                    raise RequestFailed(f"{failure}{suffix}", failure.retryable) from None
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
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
        with self._lock:
            self.requests += 1
        try:
            with self._opener.open(request, timeout=self.timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as e:
            detail = _snippet(e.read() if e.fp is not None else b"")
            wait_s = retry_after_seconds(e.headers.get("Retry-After") if e.headers else None)
            raise RequestFailed(f"HTTP {e.code} from {self.url}: {detail}", retryable=e.code in RETRY_STATUS,
                                retry_after=wait_s) from None
        except urllib.error.URLError as e:
            raise RequestFailed(f"cannot reach {self.url}: {e.reason}", retryable=True) from None
        except (TimeoutError, ConnectionError, http.client.HTTPException, OSError) as e:
            # Timeouts while reading, resets, a server closing the connection without a response.
            raise RequestFailed(f"{type(e).__name__} talking to {self.url}: {e}", retryable=True) from None
        return _content(payload, self.url)


def _content(payload: bytes, url: str) -> str:
    try:
        data = json.loads(payload)
        content = data["choices"][0]["message"].get("content")
    except (ValueError, KeyError, IndexError, TypeError, AttributeError):
        raise RequestFailed(f"{url} answered 200 but not with a chat completion: {_snippet(payload)}",
                            retryable=False) from None
    # None: e.g. a refusal or a tool call; no text means no verdict, which the parser reports as malformed.
    return content if isinstance(content, str) else ""


def _snippet(payload: bytes, limit: int = 200) -> str:
    text = payload.decode("utf-8", errors="replace").strip()
    return text if len(text) <= limit else text[: limit - 3] + "..."
