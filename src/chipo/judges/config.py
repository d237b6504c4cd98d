"""Typed configs of the judges (help text per field, validation in ``__post_init__``), as for ``chipo train``.

Endpoint settings left unset here come from the environment when the judge is built (``resolve_endpoint``):
``CHIPO_JUDGE_BASE_URL`` (then ``OPENAI_BASE_URL``, then the OpenAI API), ``CHIPO_JUDGE_MODEL``, and the key from
``CHIPO_JUDGE_API_KEY`` or ``OPENAI_API_KEY``. Keeping the key in the environment rather than a YAML file is the
safer habit; a key given in the config is accepted but never written out (``public_dict``). Neither is a
``user:password@`` part of ``base_url`` (sent as HTTP Basic authentication, see ``chipo.judges.http``).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from chipo.config import ConfigError, _field
from chipo.judges.http import redact, strip_credentials, url_credentials

OPENAI_BASE_URL = "https://api.openai.com/v1"


@dataclass
class OpenAIJudgeConfig:
    """A judge served by any OpenAI-compatible chat-completions endpoint (vLLM, a hosted API, ...)."""

    base_url: str | None = _field(None, "Endpoint root, e.g. http://localhost:8000/v1 (requests go to "
                                        "{base_url}/chat/completions); default: $CHIPO_JUDGE_BASE_URL, "
                                        f"$OPENAI_BASE_URL, then {OPENAI_BASE_URL}.")
    model: str | None = _field(None, "Judge model name as the server knows it; default: $CHIPO_JUDGE_MODEL.")
    api_key: str | None = _field(None, "API key (prefer $CHIPO_JUDGE_API_KEY or $OPENAI_API_KEY); a local server "
                                       "usually needs none. Never written to results.")
    max_tokens: int = _field(256, "Max tokens of the judge's reply (room for a short comparison and the verdict).")
    timeout_s: float = _field(120.0, "Seconds a connect or a single read may wait for the server (a timeout is "
                                     "retried).")
    deadline_s: float = _field(120.0, "Total seconds for one request attempt (connect, headers, whole reply), "
                                      "even when the server trickles bytes; an overrun is retried like a timeout.")
    max_reply_bytes: int = _field(4 * 1024 * 1024, "Largest reply body read (bytes); a larger reply fails that "
                                                   "request (not retried) instead of filling memory.")
    max_attempts: int = _field(5, "Attempts per item on HTTP 429/500/502/503/504, timeouts and connection errors; "
                                  "after the last the item counts as an error (no verdict).")
    backoff_initial_s: float = _field(1.0, "Wait before the first retry; doubles per retry (exponential backoff).")
    backoff_max_s: float = _field(30.0, "Cap on the exponential backoff wait.")
    jitter: float = _field(0.5, "Random fraction in [0, 1] taken off each backoff wait, so parallel retries spread.")
    max_retry_after_s: float = _field(120.0, "A server's Retry-After is honoured (waited at least) up to this cap.")
    max_concurrency: int = _field(8, "Requests in flight at once (worker threads).")
    fail_fast_after: int = _field(8, "Stop with an error when this many requests have failed before any succeeded "
                                     "(a wrong URL, model or key); 0: only when every request failed.")
    cache: str | None = _field("~/.cache/chipo/judge_cache.sqlite",
                               "SQLite file of replies keyed by (model, template, prompt, shown order); a rerun "
                               "never pays twice. null disables.")
    seed: int = _field(0, "Seed of the per-item order randomisation (which candidate is shown first).")
    randomize_order: bool = _field(True, "Show the two candidates in a seeded random order per item, to cancel the "
                                         "judge's position bias; false shows `a` first always (debugging only).")

    def __post_init__(self) -> None:
        for name in ("max_tokens", "max_attempts", "max_concurrency", "max_reply_bytes"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("timeout_s", "backoff_initial_s", "backoff_max_s", "max_retry_after_s", "fail_fast_after"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("timeout_s", "deadline_s"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.jitter <= 1.0:
            raise ConfigError(f"jitter must lie in [0, 1], got {self.jitter}")
        if self.base_url is not None:
            _check_url(self.base_url)

    def public_dict(self) -> dict:
        """The settings without the API key or URL credentials, for results files and logs."""
        out = dataclasses.asdict(self)
        out["api_key"] = "***" if self.api_key else None
        out["base_url"] = strip_credentials(self.base_url) if self.base_url else None
        return out


@dataclass
class RewardModelJudgeConfig:
    """A judge that compares reward-model scores of the two candidates."""

    model: str = _field(None, "Reward model: an HF sequence-classification directory or hub name (one output), "
                              "'world' (the lab's embedded gold reward) or module:function.")
    template: str | None = _field(None, "null: score prompt + response tokenized as `chipo reward` trains (right "
                                        "for its models); or the model's input text from {prompt} and {response}.")
    batch_size: int = _field(64, "Scoring batch size.")
    tie_tolerance: float = _field(0.0, "|score_a - score_b| <= this counts as a tie (0.5).")

    def __post_init__(self) -> None:
        if not self.model:
            raise ConfigError("model is required for the reward-model judge (a directory, hub name or 'world')")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be at least 1, got {self.batch_size}")
        if self.tie_tolerance < 0:
            raise ConfigError(f"tie_tolerance must be >= 0, got {self.tie_tolerance}")
        if self.template is not None and "{response}" not in self.template:
            raise ConfigError("template must contain {response}")


def _check_url(url: str) -> None:
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        shown = redact(strip_credentials(url))
        raise ConfigError(f"base_url must be an http(s) URL such as http://localhost:8000/v1, got {shown!r}")


def check_writable_file(path: str | os.PathLike, name: str) -> None:
    """``ConfigError`` (naming ``name``: an option or config key) unless a file can be written at ``path``.

    Writers here create missing parent directories, so the test is on the nearest existing ancestor: it must be a
    directory we may write in; ``path`` itself must not be a directory. Checked before any paid request is made."""
    target = Path(path).expanduser()
    if target.is_dir():
        raise ConfigError(f"{name}: {path} is a directory; give a file path")
    ancestor = target.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise ConfigError(f"{name}: cannot write {path}: {ancestor} is not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise ConfigError(f"{name}: cannot write {path}: no write permission in {ancestor}")
    if target.exists() and not os.access(target, os.W_OK):
        raise ConfigError(f"{name}: cannot write {path}: the file is read-only")


def resolve_endpoint(config: OpenAIJudgeConfig) -> tuple[str, str, str | None]:
    """(base_url, model, api_key) from the config, then the environment; ``ConfigError`` if unusable.

    ``base_url`` keeps a ``user:password@`` part if given (the client sends it as Basic authentication); pass it
    through ``chipo.judges.http.strip_credentials`` before recording it anywhere."""
    env = os.environ
    base_url = config.base_url or env.get("CHIPO_JUDGE_BASE_URL") or env.get("OPENAI_BASE_URL") or OPENAI_BASE_URL
    _check_url(base_url)
    base_url = base_url.rstrip("/")
    # Accept the full endpoint too: users paste ".../v1/chat/completions" as often as ".../v1".
    if base_url.endswith("/chat/completions"):
        base_url = base_url[: -len("/chat/completions")]
    model = config.model or env.get("CHIPO_JUDGE_MODEL")
    if not model:
        raise ConfigError("the judge model is not set: give model=... or set CHIPO_JUDGE_MODEL")
    api_key = config.api_key or env.get("CHIPO_JUDGE_API_KEY") or env.get("OPENAI_API_KEY") or None
    if api_key and url_credentials(base_url):
        raise ConfigError("base_url carries credentials (user:password@) and an API key is set too (api_key, "
                          "CHIPO_JUDGE_API_KEY or OPENAI_API_KEY): give only one")
    if api_key is None and urlparse(base_url).hostname == urlparse(OPENAI_BASE_URL).hostname:
        raise ConfigError(f"{strip_credentials(base_url)} needs an API key: set CHIPO_JUDGE_API_KEY or OPENAI_API_KEY")
    return base_url, model, api_key
