"""A disk cache of judge replies (SQLite), so rerunning an evaluation never pays for the same request twice.

Key: SHA-256 of (endpoint, model, prompt template key, prompt, first shown, second shown), i.e. of everything that
decides the request up to sampling settings (temperature is fixed at 0). The endpoint (``base_url`` without
credentials) is part of it: two servers may serve different weights under one model name, so one must never answer
for the other. The order the candidates were *shown* in is part of the key, so a reply is always mapped back with
the order it was given for.

The raw reply is stored, not the parsed verdict: a better parser applies to old replies for free, and a malformed
reply is still cached (at temperature 0 asking again would mostly give the same answer and cost the same). Failed
requests are not cached, so a rerun retries them.

The file is created at the first stored reply, not before: a run in which every request failed leaves no cache
behind (nor its directory).

Consistency: each ``put`` is its own committed transaction (SQLite's journal makes it atomic), so a crash or
Ctrl-C mid-run loses at most the replies in flight; WAL mode lets another process read while this one writes.
Writes happen from the calling thread only (the judge collects replies from its worker threads), so one connection
suffices.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path

from chipo.config import ConfigError
from chipo.judges.base import JudgeError
from chipo.judges.config import check_writable_file
from chipo.judges.http import strip_credentials


def cache_key(base_url: str, model: str, template_key: str, prompt: str, first: str, second: str) -> str:
    # JSON of a list: unambiguous field boundaries (no two different tuples serialise alike).
    endpoint = strip_credentials(base_url).rstrip("/")
    payload = json.dumps([endpoint, model, template_key, prompt, first, second], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class ReplyCache:
    """``get(key) -> reply | None`` and ``put(key, reply)`` over one SQLite file (created at the first ``put``).

    A path that cannot hold the cache (a directory, an unwritable place, a file that is not SQLite) is a
    ``ConfigError`` naming the ``cache`` key when the cache is made; a write failing later is a ``JudgeError``."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        check_writable_file(self.path, "cache")
        self._db: sqlite3.Connection | None = None
        if self.path.exists():
            try:
                self._open()
            except sqlite3.Error as e:
                raise ConfigError(f"cache: {self.path} is not a usable SQLite file ({e}); delete it or set "
                                  "cache=null") from None

    def _open(self) -> sqlite3.Connection:
        # check_same_thread=False only so the object can be created in one thread and used in another; the judge
        # never uses it from two threads at once.
        db = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False)
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply TEXT NOT NULL, "
                       "model TEXT, created REAL, base_url TEXT)")
            columns = {row[1] for row in db.execute("PRAGMA table_info(replies)")}
            if "base_url" not in columns:  # a cache written before the endpoint was recorded
                db.execute("ALTER TABLE replies ADD COLUMN base_url TEXT")
            db.commit()
        except sqlite3.Error:
            db.close()
            raise
        self._db = db
        return db

    def get(self, key: str) -> str | None:
        if self._db is None:
            return None
        row = self._db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, reply: str, model: str = "", base_url: str = "") -> None:
        """Store one reply; ``base_url`` is recorded without credentials."""
        try:
            if self._db is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._open()
            with self._db:  # one transaction per reply: committed or not there at all
                self._db.execute("INSERT OR REPLACE INTO replies (key, reply, model, created, base_url) "
                                 "VALUES (?, ?, ?, ?, ?)",
                                 (key, reply, model, time.time(), strip_credentials(base_url) if base_url else ""))
        except (sqlite3.Error, OSError) as e:
            raise JudgeError(f"cannot write the judge cache {self.path}: {e}") from None

    def count(self) -> int:
        # A method, not __len__: an empty cache would otherwise be falsy and `if cache:` would skip it.
        if self._db is None:
            return 0
        return self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None
