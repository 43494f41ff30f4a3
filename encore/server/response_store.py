"""Stored ``/v1/responses`` (``store: true``): an embedded SQLite database, scoped by tenant.

A row keeps what ``GET /v1/responses/{id}`` returns and the conversation a follow-up with
``previous_response_id`` continues (chat messages: every earlier input and output, without
``instructions``, which OpenAI does not carry over), plus the chain's ``root`` (the first
response's id), which names the conversation as an agent program so its KV stays pinned
between turns. Rows older than the retention, or beyond the row limit (oldest first), are
deleted as new ones arrive. Another tenant's id reads as unknown.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from encore.configs.types import EncoreConfig

DB_NAME = "responses.sqlite3"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    created REAL NOT NULL,
    root TEXT NOT NULL,
    body TEXT NOT NULL,
    conversation TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_created ON responses (created);
"""


def default_db_path(config: EncoreConfig) -> Path:
    """``server.responses_db``; else beside the disk KV tier; else under the XDG data dir."""
    if config.server.responses_db:
        return Path(config.server.responses_db)
    if config.cache.disk_cache_dir:
        return Path(config.cache.disk_cache_dir) / DB_NAME
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "encore" / DB_NAME


@dataclass(frozen=True)
class StoredResponse:
    id: str
    root: str
    body: dict[str, Any]
    conversation: list[dict[str, Any]]


class ResponseStore:
    """Thread-safe (one connection, one lock); calls are short: run them off the event loop.
    ``clock`` (wall time, seconds) is injectable for retention tests."""

    def __init__(self, path: Path | str, retention_s: float, max_rows: int,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self.retention_s = retention_s
        self.max_rows = max_rows
        self.clock = clock
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(_SCHEMA)
        self._lock = threading.Lock()

    def put(self, tenant: str | None, response_id: str, root: str, body: dict[str, Any],
            conversation: list[dict[str, Any]]) -> None:
        """Store a finished response (replacing one of the same id), then apply retention."""
        row = (response_id, tenant or "", self.clock(), root, json.dumps(body),
               json.dumps(conversation))
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)", row)
            self._expire()

    def get(self, tenant: str | None, response_id: str) -> StoredResponse | None:
        """The response if it exists, belongs to ``tenant`` and is within the retention."""
        with self._lock:
            self._expire()
            row = self._db.execute(
                "SELECT id, root, body, conversation FROM responses WHERE id = ? AND tenant = ?",
                (response_id, tenant or "")).fetchone()
        if row is None:
            return None
        return StoredResponse(row[0], row[1], json.loads(row[2]), json.loads(row[3]))

    def delete(self, tenant: str | None, response_id: str) -> bool:
        """Delete the tenant's response; False if there was none."""
        with self._lock:
            cur = self._db.execute("DELETE FROM responses WHERE id = ? AND tenant = ?",
                                   (response_id, tenant or ""))
        return cur.rowcount > 0

    def count(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM responses").fetchone()[0]

    def _expire(self) -> None:
        """Drop rows past the retention, then the oldest beyond ``max_rows`` (lock held)."""
        self._db.execute("DELETE FROM responses WHERE created < ?",
                         (self.clock() - self.retention_s,))
        self._db.execute(
            "DELETE FROM responses WHERE id IN (SELECT id FROM responses ORDER BY created DESC "
            "LIMIT -1 OFFSET ?)", (self.max_rows,))

    def close(self) -> None:
        with self._lock:
            self._db.close()
