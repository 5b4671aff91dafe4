"""The stored responses' bounds: per key, by age, by size, and shared by separate connections
(as gunicorn's workers are separate processes)."""

from __future__ import annotations

import time

import pytest

from response_store import ResponseStore, StoreError


def response(n: int, text: str = "x") -> dict:
    return {"id": f"resp_{n}", "object": "response", "output": [{"type": "message", "text": text}]}


def test_a_response_belongs_to_the_key_that_stored_it(tmp_path):
    store = ResponseStore(tmp_path, ttl=60, max_bytes=1 << 20)
    store.put("alice", response(1), [{"id": "msg_1", "type": "message"}])
    assert store.get("resp_1", "bob") is None and not store.delete("resp_1", "bob")
    other_worker = ResponseStore(tmp_path, ttl=60, max_bytes=1 << 20)
    got = other_worker.get("resp_1", "alice")
    assert got is not None and got.response == response(1) and got.input_items == [{"id": "msg_1", "type": "message"}]
    assert store.delete("resp_1", "alice") and other_worker.get("resp_1", "alice") is None


def test_old_responses_expire(tmp_path, monkeypatch):
    store = ResponseStore(tmp_path, ttl=60, max_bytes=1 << 20)
    store.put("k", response(1), [])
    now = time.time()
    monkeypatch.setattr(time, "time", lambda: now + 61)
    assert store.get("resp_1", "k") is None  # past its age, even before a prune
    store.put("k", response(2), [])  # each write prunes
    monkeypatch.setattr(time, "time", lambda: now)
    assert store.get("resp_1", "k") is None and store.get("resp_2", "k") is not None


def test_the_oldest_go_first_past_the_size_bound(tmp_path):
    store = ResponseStore(tmp_path, ttl=3600, max_bytes=3000)
    for n in range(10):
        store.put("k", response(n, "y" * 500), [])
    kept = [n for n in range(10) if store.get(f"resp_{n}", "k") is not None]
    assert kept == list(range(10 - len(kept), 10)) and 2 <= len(kept) <= 5  # the newest, within 3000 bytes


def test_an_unwritable_state_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(StoreError, match="STATE_DIR"):
        ResponseStore(blocker / "state", ttl=60, max_bytes=1000)
