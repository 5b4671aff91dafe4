"""Stored responses (`store: true`): one SQLite file in STATE_DIR, shared by every gunicorn worker
(never worker memory), each response visible only to the API key that created it.

A continuation (`previous_response_id`) is stored as a link to the response it continues and its
own new input only, so a long conversation costs what it says once, not once per turn; reading a
response's conversation walks those links back (at most `max_links` of them). The responses
linked so make one conversation, kept and dropped whole, so a link is never left dangling:
- by age: RESPONSES_TTL after the conversation's last response;
- by size: each key has an even share of RESPONSES_MAX_MB, and a write that takes a key past its
  share drops that key's own conversations, the one continued longest ago first. One key's writes
  never drop another key's responses. A response whose conversation alone would not fit the share
  is not stored (and the answer says `store: false`).
Deleting a response hands its part of the conversation (its input and output) to the responses that
continue it, so they go on reading the whole conversation they were answered with.

Under gunicorn's gevent worker no SQLite call runs on the event loop (reads on gevent's thread
pool, writes on a thread of their own over one connection kept open): SQLite waits for the disk and
for other workers' writes, which on the loop stalled every request of the worker. The file is
created 0600 (SQLite gives its -wal and -shm files the same mode) in a 0700 directory, and both are
made again if they are removed while the server runs."""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import quote

log = logging.getLogger(__name__)
T = TypeVar("T")

SCHEMA_VERSION = 2  # 1: each response held its whole history (no conversations, no links)
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS responses (
        id TEXT PRIMARY KEY, owner TEXT NOT NULL, created REAL NOT NULL, size INTEGER NOT NULL,
        response TEXT NOT NULL, input_items TEXT NOT NULL, conversation TEXT, previous TEXT)""",
    """CREATE TABLE IF NOT EXISTS conversations (
        id TEXT PRIMARY KEY, owner TEXT NOT NULL, updated REAL NOT NULL, size INTEGER NOT NULL)""",
    "CREATE TABLE IF NOT EXISTS owners (owner TEXT PRIMARY KEY, size INTEGER NOT NULL)",  # each key's total
    """CREATE TRIGGER IF NOT EXISTS conversation_added AFTER INSERT ON conversations BEGIN
        INSERT OR IGNORE INTO owners VALUES (new.owner, 0);
        UPDATE owners SET size = size + new.size WHERE owner = new.owner; END""",
    """CREATE TRIGGER IF NOT EXISTS conversation_resized AFTER UPDATE OF size ON conversations BEGIN
        UPDATE owners SET size = size + new.size - old.size WHERE owner = new.owner; END""",
    """CREATE TRIGGER IF NOT EXISTS conversation_dropped AFTER DELETE ON conversations BEGIN
        UPDATE owners SET size = size - old.size WHERE owner = old.owner; END""",
    "CREATE INDEX IF NOT EXISTS conversations_owner ON conversations (owner, updated)",
    "CREATE INDEX IF NOT EXISTS conversations_updated ON conversations (updated)",
    "CREATE INDEX IF NOT EXISTS responses_conversation ON responses (conversation)",
    "CREATE INDEX IF NOT EXISTS responses_previous ON responses (previous)",
    "DROP INDEX IF EXISTS responses_created",
)
# A response and the responses before it in its conversation, oldest first: at most `max_links` rows
# (the last parameter is max_links - 1); an oldest row that still continues another is past the bound.
CHAIN = """
WITH RECURSIVE chain(id, previous, response, input_items, depth) AS (
    SELECT r.id, r.previous, r.response, r.input_items, 0 FROM responses r
    JOIN conversations c ON c.id = r.conversation WHERE r.id = ? AND r.owner = ? AND c.updated > ?
    UNION ALL
    SELECT r.id, r.previous, r.response, r.input_items, chain.depth + 1 FROM responses r
    JOIN chain ON r.id = chain.previous WHERE r.owner = ? AND chain.depth < ?
) SELECT previous, response, input_items FROM chain ORDER BY depth DESC"""


@dataclass(frozen=True)
class Stored:
    response: dict[str, Any]
    input_items: list[dict[str, Any]]  # everything the model was given before answering, in order


class StoreError(Exception):
    """The state directory cannot hold the store (a setting to fix, named in the message)."""


class StoreUnavailable(StoreError):
    """The store cannot be read or written now (its directory cannot be made again, a full disk...)."""


class ConversationTooLong(Exception):
    """A conversation of more responses than the store walks back."""


class _OffLoop:
    """Runs the store's work where it cannot stall the event loop: under gevent (gunicorn's gevent
    worker), reads on gevent's thread pool and writes on one thread of their own (they queue there,
    rather than each thread waiting out SQLite's lock with its sleeps); directly otherwise
    (Passenger, tests in one thread)."""

    def __init__(self) -> None:
        self._writer: tuple[int, Any] | None = None  # (pid, gevent ThreadPool): made in the process that uses it

    def __call__(self, call: Callable[[], T], write: bool) -> T:
        try:
            from gevent import get_hub, monkey
            from gevent.threadpool import ThreadPool
        except ImportError:  # pragma: no cover - gevent is a requirement
            return call()
        if not monkey.is_module_patched("threading"):
            return call()
        if not write:
            return cast(T, get_hub().threadpool.apply(call))
        if self._writer is None or self._writer[0] != os.getpid():  # a pool is not inherited across fork
            self._writer = (os.getpid(), ThreadPool(1))
        return cast(T, self._writer[1].apply(call))


class _WriteConnection:
    """The one connection a process writes with, kept open: closing the last connection to a WAL
    file checkpoints it (an fsync), which on every write cost most of the write. It is opened again
    when the file it has open is no longer the store's (STATE_DIR removed), in a new process, or after
    an error. A real lock (not gevent's) keeps it to one thread at a time."""

    def __init__(self, path: Path, connect: Callable[[], sqlite3.Connection]) -> None:
        self.path, self.connect = path, connect
        self.lock = _real_lock()
        self._open: tuple[int, tuple[int, int], sqlite3.Connection] | None = None  # (pid, file, connection)

    def run(self, work: Callable[[sqlite3.Connection], T]) -> T:
        with self.lock:
            db = self._connection()
            try:
                return work(db)
            except BaseException:
                self.close()
                raise

    def _connection(self) -> sqlite3.Connection:
        if self._open is not None:
            pid, file, db = self._open
            if pid == os.getpid() and file == _identity(self.path):
                return db
            self.close()
        db = self.connect()
        self._open = (os.getpid(), _identity(self.path), db)
        return db

    def close(self) -> None:
        if self._open is not None and self._open[0] == os.getpid():  # a parent's connection is not ours to close
            self._open[2].close()
        self._open = None


def _identity(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return (-1, -1)
    return (st.st_dev, st.st_ino)


def _real_lock() -> Any:
    """A lock that holds between OS threads even where gevent has patched threading."""
    try:
        from gevent import monkey
    except ImportError:  # pragma: no cover - gevent is a requirement
        import _thread
        return _thread.allocate_lock()
    return monkey.get_original("_thread", "allocate_lock")()


def _dumps(value: Any) -> str:
    """JSON as SQLite can store it: text as written, unless it holds a lone surrogate (valid in a
    JSON string, not in UTF-8), which is then escaped."""
    text = json.dumps(value, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = json.dumps(value)
    return text


def _storable(text: str) -> bool:
    """Can SQLite look this id up (a lone surrogate cannot be written as UTF-8)?"""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class ResponseStore:
    def __init__(self, directory: Path, ttl: float, max_bytes: int, owners: int = 1, max_links: int = 2048) -> None:
        """``max_bytes`` is split evenly between ``owners`` (the configured keys); a conversation of
        more than ``max_links`` responses cannot be continued or listed."""
        self.directory = directory.absolute()
        self.path = self.directory / "responses.sqlite3"
        self.ttl, self.share, self.max_links = ttl, max_bytes // max(1, owners), max_links
        self._off_loop = _OffLoop()
        self._writes = _WriteConnection(self.path, lambda: self._connect(shared=True))
        try:
            self._create()
        except (OSError, sqlite3.Error) as exc:
            raise StoreError(f"STATE_DIR: cannot keep stored responses in {directory}: {exc}") from None

    # -- the file -----------------------------------------------------------------------------------

    def _create(self) -> None:
        """The directory (0700) and the file (0600) with the current schema, made or brought up to date."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        for path in (self.path, self.path.with_name(self.path.name + "-wal"),
                     self.path.with_name(self.path.name + "-shm")):
            if path.exists() and path.stat().st_mode & 0o077:  # made by an older aigate, 0644
                path.chmod(0o600)
        db = self._open()
        try:
            for attempt in range(50):
                try:
                    db.execute("PRAGMA journal_mode=WAL")  # readers in one worker never wait for a writer
                    break
                except sqlite3.OperationalError as exc:
                    # Workers start together, and SQLite refuses (does not wait for) a second switch to WAL.
                    if "locked" not in str(exc) or attempt == 49:
                        raise
                    time.sleep(0.1)
            if db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
                with _transaction(db):
                    self._upgrade(db)
        finally:
            db.close()

    @staticmethod
    def _upgrade(db: sqlite3.Connection) -> None:
        if db.execute("PRAGMA user_version").fetchone()[0] >= SCHEMA_VERSION:
            return  # another worker did it first
        columns = {row[1] for row in db.execute("PRAGMA table_info(responses)")}
        if columns and "conversation" not in columns:  # version 1: each response is a conversation of its own
            db.execute("ALTER TABLE responses ADD COLUMN conversation TEXT")
            db.execute("ALTER TABLE responses ADD COLUMN previous TEXT")
        for statement in SCHEMA:
            db.execute(statement)
        db.execute("UPDATE responses SET conversation = id WHERE conversation IS NULL")
        db.execute("INSERT OR IGNORE INTO conversations SELECT id, owner, created, size FROM responses "
                   "WHERE conversation = id")
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _open(self, shared: bool = False) -> sqlite3.Connection:
        # mode=rw: a file that is gone is made again by _create, never by SQLite (0644). ``shared``: the
        # write connection, used from whichever one thread holds its lock.
        db = sqlite3.connect(f"file:{quote(str(self.path))}?mode=rw", uri=True, timeout=5, isolation_level=None,
                             check_same_thread=not shared)
        db.execute("PRAGMA busy_timeout=5000")
        db.execute("PRAGMA synchronous=NORMAL")  # with WAL: no fsync per answer, and still never corrupt
        db.execute("PRAGMA journal_size_limit=8388608")  # the -wal file cut back to 8 MB after a checkpoint
        return db

    def _connect(self, shared: bool = False) -> sqlite3.Connection:
        try:
            return self._open(shared)
        except sqlite3.OperationalError:
            if self.path.exists():
                raise
        log.warning("stored responses: %s was removed while running; making it again", self.path)
        self._create()
        return self._open(shared)

    def _run(self, what: str, work: Callable[[sqlite3.Connection], T], write: bool = False) -> T:
        """``work`` off the event loop, on the write connection or a read connection of its own (~0.1 ms
        to open; nothing to share across greenlets); any failure of the file is StoreUnavailable."""
        def read() -> T:
            db = self._connect()
            try:
                return work(db)
            finally:
                db.close()
        try:
            return self._off_loop((lambda: self._writes.run(work)) if write else read, write)
        except (OSError, sqlite3.Error) as exc:
            log.error("stored responses: cannot %s in %s: %s", what, self.directory, exc)
            raise StoreUnavailable(f"cannot {what} in STATE_DIR ({exc})") from None

    def readiness(self) -> str | None:
        """None when responses can be stored, else why not (for /ready)."""
        def check(db: sqlite3.Connection) -> None:
            db.execute("PRAGMA user_version").fetchone()
            if not os.access(self.path, os.W_OK) or not os.access(self.directory, os.W_OK):
                raise PermissionError(f"{self.path} is not writable")
        try:
            self._run("read stored responses", check)
        except StoreUnavailable as exc:
            return f"responses cannot be stored: {exc}"
        return None

    # -- the operations -----------------------------------------------------------------------------

    def put(self, owner: str, response: dict[str, Any], input_items: list[dict[str, Any]],
            previous: str | None = None, new_from: int = 0) -> bool:
        """Store ``response``, answered with ``input_items``; when it continues ``previous``, the
        items before ``new_from`` are that conversation's and only a link to it is stored. False
        when it does not fit its key's share. Raises StoreUnavailable."""
        return self._run("store a response", lambda db: self._put(db, owner, response, input_items, previous,
                                                                    new_from), write=True)

    def _put(self, db: sqlite3.Connection, owner: str, response: dict[str, Any], input_items: list[dict[str, Any]],
             previous: str | None, new_from: int) -> bool:
        response_id, body, now = response["id"], _dumps(response), time.time()
        with _transaction(db):
            self._expire(db, now)
            found = None
            if previous is not None and _storable(previous):
                found = db.execute("SELECT conversation FROM responses WHERE id = ? AND owner = ?",
                                   (previous, owner)).fetchone()
            if found is None:  # a conversation of its own (or what it continued is gone: it holds it all)
                conversation, previous, items = response_id, None, _dumps(input_items)
                before = 0
            else:
                conversation, items = found[0], _dumps(input_items[new_from:])
                before = db.execute("SELECT size FROM conversations WHERE id = ?", (conversation,)).fetchone()[0]
            size = len(body.encode()) + len(items.encode())
            if before + size > self.share:
                log.warning("stored responses: response %s not stored: its conversation would take %d bytes, more "
                            "than a key's share of RESPONSES_MAX_MB (%d)", response_id, before + size, self.share)
                return False
            db.execute("INSERT INTO responses (id, owner, created, size, response, input_items, conversation, previous)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (response_id, owner, now, size, body, items, conversation, previous))
            db.execute("INSERT INTO conversations VALUES (?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                       "updated = excluded.updated, size = size + excluded.size", (conversation, owner, now, size))
            self._fit(db, owner, conversation)
        return True

    def _expire(self, db: sqlite3.Connection, now: float) -> None:
        old = [row[0] for row in db.execute("SELECT id FROM conversations WHERE updated <= ?", (now - self.ttl,))]
        for conversation in old:
            _drop(db, conversation)

    def _fit(self, db: sqlite3.Connection, owner: str, keep: str) -> None:
        """Bring ``owner`` within its share: its conversations continued longest ago go first (never ``keep``,
        which fits alone), and no other key's."""
        total = db.execute("SELECT size FROM owners WHERE owner = ?", (owner,)).fetchone()[0]
        dropped = 0
        while total > self.share:
            oldest = db.execute("SELECT id, size FROM conversations WHERE owner = ? AND id != ? ORDER BY updated "
                                "LIMIT 16", (owner, keep)).fetchall()
            if not oldest:
                break
            for conversation, size in oldest:
                if total <= self.share:
                    break
                _drop(db, conversation)
                total -= size
                dropped += 1
        if dropped:
            log.info("stored responses: a key past its share of RESPONSES_MAX_MB: dropped its %d conversations "
                     "continued longest ago", dropped)

    def get(self, response_id: str, owner: str) -> dict[str, Any] | None:
        """The response object (None: not stored, or another key's). Raises StoreUnavailable."""
        if not _storable(response_id):
            return None
        row = self._run("read a stored response", lambda db: db.execute(
            "SELECT r.response FROM responses r JOIN conversations c ON c.id = r.conversation "
            "WHERE r.id = ? AND r.owner = ? AND c.updated > ?", (response_id, owner, time.time() - self.ttl)
        ).fetchone())
        return json.loads(row[0]) if row else None

    def conversation(self, response_id: str, owner: str) -> Stored | None:
        """The response and every item its model was given, the earlier responses' input and output
        included. Raises ConversationTooLong, StoreUnavailable."""
        if not _storable(response_id):
            return None
        rows = self._run("read a stored conversation", lambda db: db.execute(
            CHAIN, (response_id, owner, time.time() - self.ttl, owner, self.max_links - 1)).fetchall())
        if not rows:
            return None
        if rows[0][0] is not None:  # the oldest row read still continues another
            if len(rows) >= self.max_links:
                raise ConversationTooLong(f"its conversation holds more than {self.max_links} responses")
            log.error("stored responses: the conversation of %s is missing %s", response_id, rows[0][0])
            return None
        items: list[dict[str, Any]] = []
        for _previous, response, input_items in rows[:-1]:
            items += json.loads(input_items) + json.loads(response).get("output", [])
        return Stored(json.loads(rows[-1][1]), items + json.loads(rows[-1][2]))

    def delete(self, response_id: str, owner: str) -> bool:
        """Delete a response; what continues it takes over its part of the conversation. Raises StoreUnavailable."""
        if not _storable(response_id):
            return False
        return self._run("delete a stored response", lambda db: self._delete(db, response_id, owner), write=True)

    @staticmethod
    def _delete(db: sqlite3.Connection, response_id: str, owner: str) -> bool:
        with _transaction(db):
            row = db.execute("SELECT previous, response, input_items, conversation, size FROM responses "
                             "WHERE id = ? AND owner = ?", (response_id, owner)).fetchone()
            if row is None:
                return False
            previous, response, input_items, conversation, size = row
            children = db.execute("SELECT id, input_items FROM responses WHERE previous = ?", (response_id,)).fetchall()
            change = -size
            if children:
                carried = json.loads(input_items) + json.loads(response).get("output", [])
                for child, own in children:
                    items = _dumps(carried + json.loads(own))
                    grown = len(items.encode()) - len(own.encode())
                    db.execute("UPDATE responses SET previous = ?, input_items = ?, size = size + ? WHERE id = ?",
                               (previous, items, grown, child))
                    change += grown
            db.execute("DELETE FROM responses WHERE id = ?", (response_id,))
            if db.execute("SELECT 1 FROM responses WHERE conversation = ? LIMIT 1", (conversation,)).fetchone():
                db.execute("UPDATE conversations SET size = size + ? WHERE id = ?", (change, conversation))
            else:
                db.execute("DELETE FROM conversations WHERE id = ?", (conversation,))
        return True


def _drop(db: sqlite3.Connection, conversation: str) -> None:
    db.execute("DELETE FROM responses WHERE conversation = ?", (conversation,))
    db.execute("DELETE FROM conversations WHERE id = ?", (conversation,))


class _transaction:
    """BEGIN IMMEDIATE (the write lock first: no deadlock between two readers that both mean to
    write) ... COMMIT, or ROLLBACK on any exception."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        self.db.execute("COMMIT" if kind is None else "ROLLBACK")
