"""A disk cache of judge replies (SQLite), so rerunning an evaluation never pays for the same request twice.

Key: SHA-256 of (model, prompt template key, prompt, first shown, second shown), i.e. of everything that decides the
request up to sampling settings (temperature is fixed at 0). The order the candidates were *shown* in is part of
the key, so a reply is always mapped back with the order it was given for.

The raw reply is stored, not the parsed verdict: a better parser applies to old replies for free, and a malformed
reply is still cached (at temperature 0 asking again would mostly give the same answer and cost the same). Failed
requests are not cached, so a rerun retries them.

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


def cache_key(model: str, template_key: str, prompt: str, first: str, second: str) -> str:
    # JSON of a list: unambiguous field boundaries (no two different tuples serialise alike).
    payload = json.dumps([model, template_key, prompt, first, second], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


class ReplyCache:
    """``get(key) -> reply | None`` and ``put(key, reply)`` over one SQLite file (created if missing)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # check_same_thread=False only so the object can be created in one thread and used in another; the judge
        # never uses it from two threads at once.
        self._db = sqlite3.connect(str(self.path), timeout=30, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, reply TEXT NOT NULL, "
                         "model TEXT, created REAL)")
        self._db.commit()

    def get(self, key: str) -> str | None:
        row = self._db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, reply: str, model: str = "") -> None:
        with self._db:  # one transaction per reply: committed or not there at all
            self._db.execute("INSERT OR REPLACE INTO replies (key, reply, model, created) VALUES (?, ?, ?, ?)",
                             (key, reply, model, time.time()))

    def count(self) -> int:
        # A method, not __len__: an empty cache would otherwise be falsy and `if cache:` would skip it.
        return self._db.execute("SELECT COUNT(*) FROM replies").fetchone()[0]

    def close(self) -> None:
        self._db.close()
