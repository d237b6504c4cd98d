"""``OpenAIChatJudge``: an LLM judge behind any OpenAI-compatible chat-completions endpoint.

Per item: if ``a == b`` the outcome is a tie without a request. Otherwise the two candidates are shown in a seeded
random order (``shown_swapped``: a hash of the seed and the item's text, so the order does not depend on the item's
position and a rerun on a subset or a shuffled list hits the same cache entries), the reply is looked up in the
cache or requested, parsed (``chipo.judges.prompt.parse_verdict``) and mapped back from shown order to a/b.

Failures never stop the run item by item: an unparseable reply is ``malformed``, a request that failed after its
retries is an ``error``; both give outcome None and are counted, and a run with failed items logs one warning
line with their count and the first error. The run stops with ``JudgeError`` (one line) only when the judge cannot
work at all: the endpoint cannot be reached (connection refused, unknown host) before any request succeeded,
``fail_fast_after`` requests failed before any succeeded, or every request failed and no item was answered without a
request (from the cache, or an identical pair).
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

from chipo.judges.base import CACHED, ERROR, IDENTICAL, MALFORMED, OK, JudgeError, JudgeResult, check_lengths
from chipo.judges.cache import ReplyCache, cache_key
from chipo.judges.config import OpenAIJudgeConfig, resolve_endpoint
from chipo.judges.http import ChatClient, RequestFailed
from chipo.judges.prompt import FIRST, SECOND, TLDR_PROMPT, PairwisePrompt, parse_verdict

logger = logging.getLogger(__name__)

_SKIPPED = object()  # a request not sent because the run is aborting


def shown_swapped(seed: int, prompt: str, a: str, b: str) -> bool:
    """Whether ``b`` is shown first for this item: one pseudo-random bit of (seed, prompt, a, b)."""
    digest = hashlib.sha256(json.dumps([seed, prompt, a, b], ensure_ascii=False).encode("utf-8")).digest()
    return bool(digest[0] & 1)


def outcome_for_a(verdict: str | None, swapped: bool) -> float | None:
    """Map a verdict on the shown order ("A" = first shown) back to a's outcome."""
    if verdict is None:
        return None
    if verdict == FIRST:
        return 0.0 if swapped else 1.0
    if verdict == SECOND:
        return 1.0 if swapped else 0.0
    return 0.5  # the judge declared a tie


class OpenAIChatJudge:
    """Pairwise judge on an OpenAI-compatible chat-completions server (a local vLLM server or a hosted API).

    Args:
        config: endpoint, retry, concurrency and cache settings (``OpenAIJudgeConfig``; unset endpoint fields come
            from the environment, see ``chipo.judges.config``).
        prompt: the pairwise prompt; default ``TLDR_PROMPT`` (summary comparison).
    """

    def __init__(self, config: OpenAIJudgeConfig | None = None, prompt: PairwisePrompt = TLDR_PROMPT):
        self.config = config or OpenAIJudgeConfig()
        self.prompt = prompt
        base_url, model, api_key = resolve_endpoint(self.config)
        c = self.config
        self.client = ChatClient(base_url, model, api_key, timeout_s=c.timeout_s, deadline_s=c.deadline_s,
                                 max_reply_bytes=c.max_reply_bytes, max_attempts=c.max_attempts,
                                 backoff_initial_s=c.backoff_initial_s, backoff_max_s=c.backoff_max_s,
                                 jitter=c.jitter, max_retry_after_s=c.max_retry_after_s, seed=c.seed)
        self.cache = ReplyCache(c.cache) if c.cache else None
        self.name = f"openai:{model}"

    def judge(self, prompts: Sequence[str], a: Sequence[str], b: Sequence[str]) -> JudgeResult:
        check_lengths(prompts, a, b)
        n = len(prompts)
        outcomes: list[float | None] = [None] * n
        status = [ERROR] * n
        raw: list[str | None] = [None] * n
        pending = []  # (index, swapped, key, messages) of items that need a request
        for i, (prompt, x, y) in enumerate(zip(prompts, a, b, strict=True)):
            if x == y:
                outcomes[i], status[i] = 0.5, IDENTICAL
                continue
            swapped = self.config.randomize_order and shown_swapped(self.config.seed, prompt, x, y)
            first, second = (y, x) if swapped else (x, y)
            key = cache_key(self.client.base_url, self.client.model, self.prompt.key, prompt, first, second)
            reply = self.cache.get(key) if self.cache is not None else None
            if reply is not None:
                self._record(i, reply, swapped, outcomes, status, raw, cached=True)
            else:
                pending.append((i, swapped, key, self.prompt.messages(prompt, first, second)))
        if pending:
            self._request_all(pending, outcomes, status, raw, from_cache=n - len(pending))
        return JudgeResult(outcomes, status, raw)

    def _record(self, i: int, reply: str, swapped: bool, outcomes, status, raw, cached: bool) -> None:
        outcomes[i] = outcome_for_a(parse_verdict(reply), swapped)
        status[i] = MALFORMED if outcomes[i] is None else (CACHED if cached else OK)
        raw[i] = reply

    def _request_all(self, pending: list, outcomes, status, raw, from_cache: int) -> None:
        """Send the pending requests, ``max_concurrency`` at a time; replies are cached from this thread only.

        Raises ``JudgeError`` when the endpoint is unreachable or the fail-fast limit stopped the run (both only
        before any request succeeded), or when every request failed and no item was answered without one (cache or
        identical pair): then the judge cannot work at all. Failures among otherwise answered items are counted per
        item instead, and summarised in one warning."""
        abort = threading.Event()
        lock = threading.Lock()
        counts = {"ok": 0, "failed": 0}

        def ask(messages):
            # Counted here, in the worker, so the abort is seen by the very next request a worker picks up.
            if abort.is_set():
                return _SKIPPED
            try:
                reply = self.client.complete(messages, self.config.max_tokens)
            except RequestFailed as failure:
                with lock:
                    counts["failed"] += 1
                    limit = self.config.fail_fast_after
                    # Nothing listening there (refused, unknown host): every other request would fail alike.
                    dead = failure.unreachable or (limit and counts["failed"] >= limit)
                    if dead and not counts["ok"]:
                        abort.set()  # queued requests return at once instead of paying for more failures
                return failure
            with lock:
                counts["ok"] += 1
            return reply

        first_error = unreachable = None
        with ThreadPoolExecutor(max_workers=self.config.max_concurrency, thread_name_prefix="chipo-judge") as pool:
            futures = {pool.submit(ask, messages): (i, swapped, key) for i, swapped, key, messages in pending}
            remaining = set(futures)
            try:
                while remaining:
                    done, remaining = wait(remaining, return_when=FIRST_COMPLETED)
                    for future in done:
                        i, swapped, key = futures[future]
                        result = future.result()
                        if result is _SKIPPED:
                            raw[i] = "not sent: the run was aborted"
                        elif isinstance(result, RequestFailed):
                            first_error = first_error or str(result)
                            if result.unreachable:
                                unreachable = unreachable or str(result)
                            raw[i] = str(result)
                            # One line per item would bury the summary below (and repeat one cause many times).
                            logger.debug("judge request for item %d failed: %s", i, result)
                        else:
                            if self.cache is not None:
                                self.cache.put(key, result, model=self.client.model, base_url=self.client.base_url)
                            self._record(i, result, swapped, outcomes, status, raw, cached=False)
            except BaseException:
                # Ctrl-C or a cache error: do not let the pool's exit wait for (and pay for) every queued request.
                abort.set()
                for future in remaining:
                    future.cancel()
                raise
        succeeded, failed = counts["ok"], counts["failed"]
        if abort.is_set() or not (succeeded or from_cache):
            # The judge produced nothing (or the run stopped early): a result would be all errors, so say why.
            if unreachable and not succeeded:  # one cause, said once: how many requests saw it depends on timing
                raise JudgeError(f"judge {self.name}: {unreachable}")
            raise JudgeError(f"judge {self.name}: all {failed} requests failed; first error: {first_error}")
        if failed:
            logger.warning("judge %s: %d of %d requests failed (counted as errors, no verdict); first error: %s",
                           self.name, failed, failed + succeeded, first_error)

    def close(self) -> None:
        """Close the reply cache (the judge is unusable afterwards)."""
        if self.cache is not None:
            self.cache.close()
