"""Stored responses (`store: true`): one SQLite file in STATE_DIR, shared by every gunicorn worker
(never worker memory), each response visible only to the API key that created it, bounded by age
(RESPONSES_TTL) and size (RESPONSES_MAX_MB, the oldest going first)."""

from __future__ import annotations

import json
import logging
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    created REAL NOT NULL,
    size INTEGER NOT NULL,
    response TEXT NOT NULL,
    input_items TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS responses_created ON responses (created);
"""


@dataclass(frozen=True)
class Stored:
    response: dict[str, Any]
    input_items: list[dict[str, Any]]  # everything the model was given before answering, in order


class StoreError(Exception):
    """The state directory cannot hold the store (a setting to fix, named in the message)."""


class ResponseStore:
    def __init__(self, directory: Path, ttl: float, max_bytes: int) -> None:
        self.path = directory / "responses.sqlite3"
        self.ttl, self.max_bytes = ttl, max_bytes
        try:
            directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            for attempt in range(50):
                try:
                    with self._connect() as db:
                        db.execute("PRAGMA journal_mode=WAL")  # readers in one worker never wait for a writer
                        db.executescript(SCHEMA)
                    break
                except sqlite3.OperationalError as exc:
                    # Workers start together, and SQLite refuses (does not wait for) a second switch to WAL.
                    if "locked" not in str(exc) or attempt == 49:
                        raise
                    time.sleep(0.1)
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"STATE_DIR: cannot keep stored responses in {directory}: {exc}") from None

    def _connect(self) -> sqlite3.Connection:
        # A connection per operation: nothing to share across forks or greenlets, and opening one is ~0.1 ms.
        db = sqlite3.connect(self.path, timeout=5, isolation_level=None)
        db.execute("PRAGMA busy_timeout=5000")
        db.execute("PRAGMA synchronous=NORMAL")  # with WAL: no fsync per answer, and still never corrupt
        return db

    def put(self, owner: str, response: dict[str, Any], input_items: list[dict[str, Any]]) -> None:
        body, items = json.dumps(response, ensure_ascii=False), json.dumps(input_items, ensure_ascii=False)
        db = self._connect()
        try:
            db.execute("INSERT OR REPLACE INTO responses VALUES (?, ?, ?, ?, ?, ?)",
                       (response["id"], owner, time.time(), len(body) + len(items), body, items))
            self._prune(db)
        finally:
            db.close()

    def get(self, response_id: str, owner: str) -> Stored | None:
        db = self._connect()
        try:
            row = db.execute("SELECT response, input_items FROM responses WHERE id = ? AND owner = ? AND created > ?",
                             (response_id, owner, time.time() - self.ttl)).fetchone()
        finally:
            db.close()
        return Stored(json.loads(row[0]), json.loads(row[1])) if row else None

    def delete(self, response_id: str, owner: str) -> bool:
        db = self._connect()
        try:
            return db.execute("DELETE FROM responses WHERE id = ? AND owner = ?", (response_id, owner)).rowcount > 0
        finally:
            db.close()

    def _prune(self, db: sqlite3.Connection) -> None:
        """Drop what is past its age, then the oldest until the whole fits the size bound."""
        db.execute("DELETE FROM responses WHERE created <= ?", (time.time() - self.ttl,))
        # The pages in use, read in O(1); rows are only summed when the bound is passed.
        pages = db.execute("SELECT page_count - freelist_count FROM pragma_page_count(), pragma_freelist_count()")
        if pages.fetchone()[0] * db.execute("PRAGMA page_size").fetchone()[0] <= self.max_bytes:
            return
        total = db.execute("SELECT COALESCE(SUM(size), 0) FROM responses").fetchone()[0]
        if total <= self.max_bytes:
            return
        excess, cutoff = total - self.max_bytes, None
        for created, size in db.execute("SELECT created, size FROM responses ORDER BY created"):
            excess -= size
            cutoff = created
            if excess <= 0:
                break
        db.execute("DELETE FROM responses WHERE created <= ?", (cutoff,))
        log.info("stored responses past RESPONSES_MAX_MB: dropped those created before %s", cutoff)
