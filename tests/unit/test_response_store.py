"""The stored responses' bounds: per key, by age, by size, and shared by separate connections
(as gunicorn's workers are separate processes); conversations stored as links, not copies."""

from __future__ import annotations

import json
import sqlite3
import stat
import time

import pytest

from store.response_store import ConversationTooLong, ResponseStore, StoreError


def response(n: int | str, text: str = "x") -> dict:
    return {"id": f"resp_{n}", "object": "response", "output": [{"type": "message", "text": text}]}


def item(n: int | str, text: str = "hi") -> dict:
    return {"id": f"msg_{n}", "type": "message", "role": "user", "content": [{"type": "input_text", "text": text}]}


def chain(store: ResponseStore, owner: str, turns: int, text: str = "x", first: int = 0) -> list[dict]:
    """``turns`` responses, each continuing the one before: what the route stores. Returns every input item."""
    items: list[dict] = []
    for n in range(first, first + turns):
        history = items + (response(n - 1, text)["output"] if n > first else [])
        items = [*history, item(n, text)]
        assert store.put(owner, response(n, text), items, f"resp_{n - 1}" if n > first else None, len(history))
    return items


def test_a_response_belongs_to_the_key_that_stored_it(tmp_path):
    store = ResponseStore(tmp_path, ttl=60, max_bytes=1 << 20)
    store.put("alice", response(1), [{"id": "msg_1", "type": "message"}])
    assert store.get("resp_1", "bob") is None and not store.delete("resp_1", "bob")
    assert store.conversation("resp_1", "bob") is None
    other_worker = ResponseStore(tmp_path, ttl=60, max_bytes=1 << 20)
    assert other_worker.get("resp_1", "alice") == response(1)
    got = other_worker.conversation("resp_1", "alice")
    assert got is not None and got.response == response(1) and got.input_items == [{"id": "msg_1", "type": "message"}]
    assert store.delete("resp_1", "alice") and other_worker.get("resp_1", "alice") is None


def test_a_continuation_links_to_the_conversation_bobs_key_cannot_follow(tmp_path):
    store = ResponseStore(tmp_path, ttl=60, max_bytes=1 << 20)
    items = chain(store, "alice", 3)
    got = store.conversation("resp_2", "alice")
    assert got is not None and got.input_items == items  # what the model was given, whole
    assert store.put("bob", response("b"), [*items, item("b")], "resp_2", len(items))  # not bob's: his own
    assert store.conversation("resp_b", "bob").input_items == [*items, item("b")]
    assert store.conversation("resp_2", "bob") is None


def test_old_responses_expire(tmp_path, monkeypatch):
    store = ResponseStore(tmp_path, ttl=60, max_bytes=1 << 20)
    store.put("k", response(1), [])
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 61)
    assert store.get("resp_1", "k") is None  # past its age, even before a prune
    store.put("k", response(2), [])  # each write prunes
    monkeypatch.setattr(time, "time", lambda: now)
    assert store.get("resp_1", "k") is None and store.get("resp_2", "k") is not None


def test_a_conversation_is_kept_from_its_last_response(tmp_path, monkeypatch):
    store = ResponseStore(tmp_path, ttl=60, max_bytes=1 << 20)
    now = time.time()
    chain(store, "k", 1)
    chain(store, "k", 1, first=1)  # two conversations...
    monkeypatch.setattr(time, "time", lambda: now + 50)
    conversation = [item(0, "x"), *response(0)["output"], item(9)]
    store.put("k", response(9), conversation, "resp_0", 2)  # ...the first goes on
    monkeypatch.setattr(time, "time", lambda: now + 100)
    store.put("k", response("other"), [])  # a prune: resp_0 is old, its conversation is not
    assert store.conversation("resp_9", "k").input_items == conversation
    assert store.get("resp_0", "k") is not None and store.get("resp_1", "k") is None


def test_the_oldest_go_first_past_the_size_bound(tmp_path):
    store = ResponseStore(tmp_path, ttl=3600, max_bytes=3000)
    for n in range(10):
        store.put("k", response(n, "y" * 500), [])
    kept = [n for n in range(10) if store.get(f"resp_{n}", "k") is not None]
    assert kept == list(range(10 - len(kept), 10)) and 2 <= len(kept) <= 5  # the newest, within 3000 bytes


def test_one_key_cannot_push_out_anothers_responses(tmp_path):
    """Issue 23, 3: 16 large responses of one key pushed out another key's."""
    store = ResponseStore(tmp_path, ttl=3600, max_bytes=400_000, owners=2)  # 200,000 bytes a key
    store.put("bob", response("bob"), [item("bob")])
    for n in range(16):
        assert store.put("alice", response(n, "y" * 30_000), [item(n, "z" * 30_000)])
    assert store.get("resp_bob", "bob") == response("bob")
    kept = [n for n in range(16) if store.get(f"resp_{n}", "alice") is not None]
    assert kept == list(range(16 - len(kept), 16)) and 2 <= len(kept) <= 3  # alice's own newest, in her share


def test_a_key_over_its_share_drops_its_conversation_continued_longest_ago(tmp_path):
    store = ResponseStore(tmp_path, ttl=3600, max_bytes=100_000)
    chain(store, "k", 2, "a" * 5_000)  # resp_0, resp_1: the older conversation...
    chain(store, "k", 2, "b" * 5_000, first=10)  # resp_10, resp_11
    store.put("k", response(2, "a" * 5_000), [item(2)], "resp_1", 0)  # ...continued last
    for n in range(20, 26):
        store.put("k", response(n, "c" * 10_000), [])
    assert store.conversation("resp_2", "k") is not None  # whole
    assert store.get("resp_10", "k") is None and store.get("resp_11", "k") is None  # whole too


def test_a_conversation_larger_than_the_share_is_not_stored(tmp_path):
    store = ResponseStore(tmp_path, ttl=3600, max_bytes=20_000)
    chain(store, "k", 2, "a" * 4_000)
    assert not store.put("k", response(2, "a" * 8_000), [item(2)], "resp_1", 0)
    assert store.get("resp_2", "k") is None and store.conversation("resp_1", "k") is not None


def test_continuations_store_only_their_new_items(tmp_path):
    """Issue 23, 3: each continuation stored the whole history again (a chain grew quadratically)."""
    store = ResponseStore(tmp_path, ttl=3600, max_bytes=1 << 30)
    items = chain(store, "k", 60, "w" * 1_000)
    db = sqlite3.connect(store.path)
    stored = [len(json.loads(row[0])) for row in db.execute("SELECT input_items FROM responses")]
    total = db.execute("SELECT SUM(size) FROM responses").fetchone()[0]
    assert stored == [1] * 60 and total < 60 * 2 * 1_300  # each its own input; 60 turns, linear
    assert store.conversation("resp_59", "k").input_items == items and len(items) == 60 + 59


def test_a_conversation_is_read_back_only_so_far(tmp_path):
    store = ResponseStore(tmp_path, ttl=3600, max_bytes=1 << 20, max_links=5)
    chain(store, "k", 6)
    assert len(store.conversation("resp_4", "k").input_items) == 5 + 4  # 5 responses: within the bound
    with pytest.raises(ConversationTooLong):
        store.conversation("resp_5", "k")


def test_deleting_a_response_in_the_middle_leaves_what_continues_it_whole(tmp_path):
    store = ResponseStore(tmp_path, ttl=3600, max_bytes=1 << 20)
    items = chain(store, "k", 4)
    branch = [*items[:3], *response(1)["output"], item("b")]  # a second answer to resp_1
    store.put("k", response("b"), branch, "resp_1", 4)
    assert store.delete("resp_1", "k")
    assert store.get("resp_1", "k") is None and store.conversation("resp_1", "k") is None
    assert store.conversation("resp_3", "k").input_items == items
    assert store.conversation("resp_b", "k").input_items == branch
    assert store.delete("resp_0", "k") and store.delete("resp_3", "k")  # the first, and the last
    assert store.conversation("resp_2", "k").input_items == items[:-2]
    for n in ("2", "b"):
        assert store.delete(f"resp_{n}", "k")
    db = sqlite3.connect(store.path)
    assert db.execute("SELECT COUNT(*) FROM responses").fetchone() == db.execute(
        "SELECT COUNT(*) FROM conversations").fetchone() == (0,)


def test_ids_sqlite_cannot_hold_are_not_found(tmp_path):
    store = ResponseStore(tmp_path, ttl=60, max_bytes=1 << 20)
    assert store.get("\ud800", "k") is None and store.conversation("\ud800", "k") is None
    assert not store.delete("\ud800", "k")
    assert store.put("k", response(1, "\ud800"), [item(1, "\udfff")], "\ud800", 0)  # a lone surrogate as text
    assert store.conversation("resp_1", "k").input_items == [item(1, "\udfff")]


def test_the_file_is_private_and_made_again_when_removed(tmp_path):
    state = tmp_path / "state"
    store = ResponseStore(state, ttl=60, max_bytes=1 << 20)
    reader = sqlite3.connect(store.path)  # open: SQLite keeps the -wal and -shm files meanwhile
    reader.execute("SELECT COUNT(*) FROM responses").fetchone()
    store.put("k", response(1), [])
    files = sorted(p.name for p in state.iterdir())
    assert files == ["responses.sqlite3", "responses.sqlite3-shm", "responses.sqlite3-wal"]
    assert {stat.S_IMODE(p.stat().st_mode) for p in state.iterdir()} == {0o600}
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    reader.close()
    for p in state.iterdir():
        p.unlink()
    state.rmdir()
    assert store.readiness() is None and store.get("resp_1", "k") is None  # made again, empty
    assert store.put("k", response(2), []) and store.get("resp_2", "k") is not None
    assert {stat.S_IMODE(p.stat().st_mode) for p in state.iterdir()} == {0o600}


def test_a_state_dir_that_cannot_be_made_again_is_unavailable_not_an_error(tmp_path):
    state = tmp_path / "state"
    store = ResponseStore(state, ttl=60, max_bytes=1 << 20)
    for p in state.iterdir():
        p.unlink()
    state.rmdir()
    state.write_text("in the way")
    assert "responses cannot be stored" in (store.readiness() or "")
    for call in (lambda: store.get("resp_1", "k"), lambda: store.put("k", response(1), [])):
        with pytest.raises(StoreError, match="STATE_DIR"):
            call()
    state.unlink()
    assert store.readiness() is None


def test_a_store_of_the_first_schema_is_brought_up_to_date(tmp_path):
    db = sqlite3.connect(tmp_path / "responses.sqlite3")
    db.execute("CREATE TABLE responses (id TEXT PRIMARY KEY, owner TEXT NOT NULL, created REAL NOT NULL, "
               "size INTEGER NOT NULL, response TEXT NOT NULL, input_items TEXT NOT NULL)")
    db.execute("INSERT INTO responses VALUES ('resp_1', 'k', ?, 10, ?, ?)",
               (time.time(), json.dumps(response(1)), json.dumps([item(1)])))
    db.commit()
    db.close()
    (tmp_path / "responses.sqlite3").chmod(0o644)
    store = ResponseStore(tmp_path, ttl=60, max_bytes=1 << 20)
    assert stat.S_IMODE((tmp_path / "responses.sqlite3").stat().st_mode) == 0o600
    assert store.conversation("resp_1", "k").input_items == [item(1)]
    store.put("k", response(2), [item(1), *response(1)["output"], item(2)], "resp_1", 2)
    assert store.conversation("resp_2", "k").input_items == [item(1), *response(1)["output"], item(2)]


def test_an_unwritable_state_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="STATE_DIR"):
        ResponseStore(blocker / "state", ttl=60, max_bytes=1000)
