"""The session store: bounded, idle sessions expire, busy ones never do."""

import time

import pytest

from app.sessions import Session, SessionLimitError, SessionStore
from h2o_cache import CachePolicy

POLICY = CachePolicy.parse("h2o_4_8_32")


def test_the_store_is_bounded_and_expires_only_idle_sessions():
    store = SessionStore(max_sessions=2, ttl_s=60)
    idle, busy = Session("idle", POLICY, turns=1), Session("busy", POLICY, active=object())
    idle.updated_at = busy.updated_at = time.time() - 120
    store.add(idle)
    store.add(busy)
    store.add(Session("new", POLICY, active=object()))  # makes room by expiring the idle one
    assert sorted(s.id for s in store) == ["busy", "new"]
    with pytest.raises(SessionLimitError):
        store.add(Session("one-too-many", POLICY))


def test_a_zero_ttl_keeps_sessions_forever():
    store = SessionStore(max_sessions=1, ttl_s=0)
    old = Session("old", POLICY, turns=1)
    old.updated_at = 0
    store.add(old)
    with pytest.raises(SessionLimitError):
        store.add(Session("new", POLICY))
    assert store.get("old") is old


def test_a_session_whose_first_turn_never_started_is_forgotten():
    """Queued, then abandoned before anything was fed: nothing to keep, and it must not hold a place."""
    store = SessionStore(max_sessions=1, ttl_s=60)
    abandoned = Session("abandoned", POLICY)
    store.add(abandoned)
    assert [s["id"] for s in store.summaries()] == []  # no turn, nothing running: gone
    store.add(Session("next", POLICY, active=object()))  # the place is free again
    assert store.get("abandoned") is None and abandoned.deleted
