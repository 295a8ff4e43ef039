"""The session store: bounded, idle sessions expire, busy ones never do."""

import time

import pytest
from h2o_cache import CachePolicy

from app.sessions import Session, SessionLimitError, SessionStore

POLICY = CachePolicy.parse("h2o_4_8_32")


def test_the_store_is_bounded_and_expires_only_idle_sessions():
    store = SessionStore(max_sessions=2, ttl_s=60)
    idle, busy = Session("idle", POLICY), Session("busy", POLICY, active=object())
    idle.updated_at = busy.updated_at = time.time() - 120
    store.add(idle)
    store.add(busy)
    store.add(Session("new", POLICY))  # makes room by expiring the idle one
    assert sorted(s.id for s in store) == ["busy", "new"]
    with pytest.raises(SessionLimitError):
        store.add(Session("one-too-many", POLICY))


def test_a_zero_ttl_keeps_sessions_forever():
    store = SessionStore(max_sessions=1, ttl_s=0)
    old = Session("old", POLICY)
    old.updated_at = 0
    store.add(old)
    with pytest.raises(SessionLimitError):
        store.add(Session("new", POLICY))
    assert store.get("old") is old
