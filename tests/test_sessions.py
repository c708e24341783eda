"""SessionStore against a real Redis server and real engine states (tiny random model)."""
from __future__ import annotations

import pytest
import redis
import torch

from services.engine import Engine, SamplingParams
from services.inference.sessions import (BudgetExhausted, SessionBusy, SessionLost, SessionModelMismatch,
                                         SessionNotFound, SessionStore, StoreUnavailable)
from services.inference.spill import Spill


@pytest.fixture
def engine(tiny_loaded, tiny_head_map):
    return Engine(tiny_loaded, tiny_head_map)


def new_state(engine, text="The fox and the river and the hills at sunset", n=4):
    state, _ = engine.generate(engine.encode(text=text), SamplingParams(max_new_tokens=n))
    return state


def make_store(url, engine, budget=10**9, ttl=3600, max_sessions=100, fingerprint=None, dtype="float32"):
    spill = Spill(url, ttl_s=ttl)
    return SessionStore(spill, fingerprint or engine.loaded.fingerprint.id, "cpu", budget, max_sessions, dtype=dtype)


def add(store, state) -> str:
    sid = store.create()
    store.put(sid, state)
    store.release(sid)
    return sid


def same_tensors(a, b) -> bool:
    (ta, ma), (tb, mb) = a.to_tensors(), b.to_tensors()
    return ma == mb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


# Three texts of the same token count (so the same cache bytes) and different greedy continuations: each session's
# cache differs from the others', so a restore that read another session's spill cannot pass for its own.
TEXTS = ("The fox and the river and the hills at sunset", "A bird over the lake and the trees at dawn",
         "The dog by the mill and the fields at noon")


def test_lru_idle_sessions_spill_first_and_restore_bit_exact(service_redis_url, engine):
    # Each session's own original, generated again apart from what the store holds (no aliasing with its object).
    originals = [new_state(engine, text) for text in TEXTS]
    assert len({s.nbytes() for s in originals}) == 1, "the budget below assumes equal sizes"
    assert not any(same_tensors(a, b) for i, a in enumerate(originals) for b in originals[i + 1:]), \
        "the sessions must be told apart by their tensors"
    store = make_store(service_redis_url, engine, budget=int(originals[0].nbytes() * 2.5))
    old, mid, new = (add(store, new_state(engine, text)) for text in TEXTS)
    expected = dict(zip((old, mid, new), originals))
    store.settle()
    assert [store.info(s).location for s in (old, mid, new)] == ["redis", "device", "device"]
    key_ttl = redis.Redis.from_url(service_redis_url).ttl(Spill.key(old))
    assert 0 < key_ttl <= 3600
    store.acquire(old)
    restored = store.load(old, lambda n: store.make_room(n, keep=old))
    assert same_tensors(restored, expected[old]), "restore gives back exactly what was spilled, its own session's"
    assert store.info(mid).location == "redis", "restoring made room by spilling the next LRU session"
    assert redis.Redis.from_url(service_redis_url).exists(Spill.key(old)), "the spill stays: a crash loses nothing"
    store.release(old)
    # The session spilled to make room restores as its own state too (not old's, nor new's).
    store.acquire(mid)
    restored_mid = store.load(mid, lambda n: store.make_room(n, keep=mid))
    assert same_tensors(restored_mid, expected[mid]), "each spilled session restores its own state"
    store.release(mid)


def test_one_request_per_session_and_pinned_sessions_never_spill(service_redis_url, engine):
    store = make_store(service_redis_url, engine, budget=0)
    sid = add(store, new_state(engine))
    store.acquire(sid)
    with pytest.raises(SessionBusy, match="busy"):
        store.acquire(sid)
    assert store.pin(sid) is not None   # its turn joined the running batch
    store.settle()
    assert store.info(sid).location == "device"
    store.release(sid)                   # the turn ended: unpinned and idle
    store.settle()
    assert store.info(sid).location == "redis"
    assert store.pin(sid) is None        # spilled: the runtime restores it before pinning


def test_a_busy_session_whose_turn_still_waits_may_spill(service_redis_url, engine):
    """A queued turn must not hold the budget hostage: only the running batch is pinned."""
    store = make_store(service_redis_url, engine, budget=0)
    sid = add(store, new_state(engine))
    store.acquire(sid)
    store.settle()
    assert store.info(sid).location == "redis" and store.info(sid).busy


def test_corrupt_blob_is_refused_and_reported_lost(service_redis_url, engine):
    store = make_store(service_redis_url, engine, budget=0)
    sid = add(store, new_state(engine))
    store.settle()
    r = redis.Redis.from_url(service_redis_url)
    r.hset(Spill.key(sid), "c0", b"garbage")
    store.acquire(sid)
    with pytest.raises(SessionLost, match="corrupt"):
        store.load(sid, lambda n: None)
    assert store.info(sid).location == "lost" and "corrupt" in store.info(sid).lost_reason
    assert not r.exists(Spill.key(sid))
    with pytest.raises(SessionLost):
        store.acquire(sid)


def test_another_models_session_is_refused_but_left_in_redis(service_redis_url, engine):
    theirs = make_store(service_redis_url, engine, budget=0, fingerprint=engine.loaded.fingerprint.id)
    sid = add(theirs, new_state(engine))
    theirs.settle()
    ours = make_store(service_redis_url, engine, fingerprint="llama-other-model")
    with pytest.raises(SessionModelMismatch, match="another model"):
        ours.acquire(sid)
    assert redis.Redis.from_url(service_redis_url).exists(Spill.key(sid)), "it may belong to another service"


def test_expired_session_is_not_found_with_a_hint(service_redis_url, engine):
    store = make_store(service_redis_url, engine, budget=0)
    sid = add(store, new_state(engine))
    store.settle()
    redis.Redis.from_url(service_redis_url).delete(Spill.key(sid))  # what the TTL does
    with pytest.raises(SessionNotFound, match="RAZOR_SESSION_TTL_S"):
        store.acquire(sid)


def test_redis_down_refuses_needed_spill_without_dropping_and_reconnects(engine, make_redis):
    server = make_redis().start()
    store = make_store(server.url, engine, budget=10**9)
    a, b = add(store, new_state(engine)), add(store, new_state(engine))
    store.budget_bytes = 0
    server.stop()
    with pytest.raises(BudgetExhausted, match="Redis is unreachable"):
        store.make_room(1)
    assert [store.info(s).location for s in (a, b)] == ["device", "device"]
    with pytest.raises(StoreUnavailable):
        store.acquire("0" * 32)  # an unknown id needs Redis to look it up
    server.start()
    store.make_room(1)
    assert [store.info(s).location for s in (a, b)] == ["redis", "redis"]
    server.stop()


def test_session_limit_and_delete(service_redis_url, engine):
    store = make_store(service_redis_url, engine, max_sessions=2, budget=0)
    a, b = add(store, new_state(engine)), add(store, new_state(engine))
    with pytest.raises(BudgetExhausted, match="limit"):
        store.create()
    store.settle()
    assert store.delete(a) and not redis.Redis.from_url(service_redis_url).exists(Spill.key(a))
    assert not store.delete(a)
    assert store.create() and store.info(b).location == "redis"


def test_a_session_spilled_in_another_dtype_is_refused_clearly(service_redis_url, engine):
    bf16 = make_store(service_redis_url, engine, budget=0, dtype="bfloat16")
    sid = add(bf16, new_state(engine))
    bf16.settle()
    assert bf16.info(sid).location == "redis"
    f32 = make_store(service_redis_url, engine, dtype="float32")
    with pytest.raises(SessionModelMismatch, match="spilled in bfloat16 and this service runs float32.*RAZOR_DTYPE"):
        f32.acquire(sid)
