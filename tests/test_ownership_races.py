"""Ownership under races between a replica's threads: a hand-over's spill, a request on the same session, a
late lease renewal or summary note. Each case holds one thread at the step where the race bit (as a 2-core CI
machine does by descheduling it) and checks that no turn runs on a copy Redis no longer lets this replica own,
and that no lease or copy is taken or dropped by a stale generation.

SessionStores (replicas "a" and "b") on one real Redis, real engine states of the tiny random model.
"""
from __future__ import annotations

import threading
import time

import pytest
import redis
import torch

from services.engine import Engine, SamplingParams
from services.inference.sessions import SessionBusy, SessionNotFound, SessionStore
from services.inference.spill import Spill, lease_key, meta_key, spill_key


@pytest.fixture
def engine(tiny_loaded, tiny_head_map):
    return Engine(tiny_loaded, tiny_head_map)


@pytest.fixture
def replicas(service_redis_url, engine):
    def replica(name: str) -> SessionStore:
        return SessionStore(Spill(service_redis_url, ttl_s=3600), engine.loaded.fingerprint.id, "cpu", 10**9,
                            replica_id=name, handoff_timeout_s=2.0)
    return replica("a"), replica("b")


def new_state(engine, text: str = "The fox and the river and the hills at sunset"):
    state, _ = engine.generate(engine.encode(text=text), SamplingParams(max_new_tokens=4))
    return state


def resident(store: SessionStore, state, **create) -> str:
    """A new session holding ``state``, resident and idle on ``store``."""
    sid = store.create(**create)
    store.put(sid, state)
    store.release(sid)
    return sid


def one_turn(store: SessionStore, sid: str, state) -> None:
    """What the runtime does around a turn: acquire, restore, record the grown state, release."""
    store.acquire(sid)
    store.load(sid, lambda n: store.make_room(n, keep=sid))
    store.put(sid, state)
    store.release(sid)


def lease_holder(url: str, sid: str) -> str | None:
    holder = redis.Redis.from_url(url).get(lease_key(sid))
    return None if holder is None else holder.decode()


def wait_for(predicate, timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_request_woken_by_a_hand_over_takes_the_session_back_from_redis(replicas, engine, service_redis_url,
                                                                        monkeypatch):
    a, _ = replicas
    state = new_state(engine)
    sid = resident(a, state)
    after_spill = a.spiller._after_spill

    def descheduled(*args, **kwargs):   # the I/O thread paused between the spill's write and its bookkeeping
        time.sleep(0.3)
        after_spill(*args, **kwargs)

    monkeypatch.setattr(a.spiller, "_after_spill", descheduled)
    handing = threading.Thread(target=a.hand_over, args=(sid,))
    handing.start()
    wait_for(lambda: a.table.entries[sid].spilling)
    taken = a.acquire(sid)   # waits for the hand-over to end, then claims the session again
    handing.join()
    entry = a.table.entries.get(sid)
    assert entry is not None and entry.busy and entry.gen == taken.gen, "the turn's entry stays in the table"
    assert lease_holder(service_redis_url, sid) == "a"
    restored = a.load(sid, lambda n: a.make_room(n, keep=sid))
    (got, got_meta), (want, want_meta) = restored.to_tensors(), state.to_tensors()
    assert got_meta == want_meta and all(torch.equal(got[k], want[k]) for k in want), "the handed-over state"


def test_a_late_note_of_an_old_generation_leaves_the_session_that_came_back(replicas, engine, service_redis_url):
    a, b = replicas
    sid = resident(a, new_state(engine))
    first = a.table.entries[sid].snapshot()
    a.hand_over(sid)
    one_turn(b, sid, new_state(engine, "The fox and the river, a second turn"))
    b.hand_over(sid)
    one_turn(a, sid, new_state(engine, "The fox and the river, a third turn"))
    back = a.table.entries[sid]
    assert back.gen > first.gen
    a.ownership.note(sid, first.gen, {"length": first.length}, {})   # queued behind the first turn, run late
    assert a.table.entries.get(sid) is back and not back.fenced, "only a copy of the refused generation goes"
    assert lease_holder(service_redis_url, sid) == "a"
    assert int(redis.Redis.from_url(service_redis_url).hget(meta_key(sid), "length")) == back.length


def test_a_renewal_from_before_a_hand_over_does_not_take_the_lease_back(replicas, engine, service_redis_url,
                                                                      monkeypatch):
    a, b = replicas
    sid = resident(a, new_state(engine))
    walked = a.table.snapshot()   # the renewal walk began before the hand-over ...
    a.hand_over(sid)               # ... which gave the lease back
    monkeypatch.setattr(a.table, "snapshot", lambda: walked)
    a.ownership.renew_leases()
    assert lease_holder(service_redis_url, sid) is None, "no replica holds it: another may claim it at once"
    one_turn(b, sid, new_state(engine, "The fox and the river, taken by b"))
    assert lease_holder(service_redis_url, sid) == "b"


def test_a_renewal_racing_a_delete_does_not_register_the_session_again(replicas, engine, service_redis_url,
                                                                     monkeypatch):
    a, _ = replicas
    sid = resident(a, new_state(engine))
    fenced = a.directory.fenced

    def delete_lands_first(sid_, gen, mode, *args, **kwargs):
        if mode == "renew":   # DeleteSession began after the renewal's check, and its Redis work landed first
            with a.table.mu:
                a.table.entries[sid].deleting = True
            a.directory.delete(sid, "")
        return fenced(sid_, gen, mode, *args, **kwargs)

    monkeypatch.setattr(a.directory, "fenced", delete_lands_first)
    a.ownership.renew_leases()
    client = redis.Redis.from_url(service_redis_url)
    assert not client.exists(meta_key(sid)) and not client.exists(lease_key(sid)), "no zombie of a deleted session"
    assert a.directory.count() == 0


def test_a_request_arriving_while_its_session_expires_is_refused_not_run(service_redis_url, engine, monkeypatch):
    now = [1000.0]
    store = SessionStore(Spill(service_redis_url, ttl_s=3600), engine.loaded.fingerprint.id, "cpu", 10**9,
                         replica_id="a", clock=lambda: now[0])
    sid = resident(store, new_state(engine), ttl_s=60)
    now[0] += 61
    refused, delete = [], store.directory.delete

    def request_lands(sid_, tenant):   # a turn's request arrives while Redis deletes the expired session
        with pytest.raises(SessionBusy) as info:
            store.acquire(sid)
        refused.append(str(info.value))
        return delete(sid_, tenant)

    monkeypatch.setattr(store.directory, "delete", request_lands)
    store.ownership.renew_leases()
    assert refused and "busy" in refused[0]
    with pytest.raises(SessionNotFound):
        store.acquire(sid)


def assert_gone(url: str, store: SessionStore, sid: str) -> None:
    """No trace of ``sid`` in Redis: no zombie meta, lease or spill, and not listed or counted."""
    client = redis.Redis.from_url(url)
    assert [client.exists(k(sid)) for k in (meta_key, lease_key, spill_key)] == [0, 0, 0], "a deleted session is back"
    assert store.directory.count() == 0 and store.page("", "", 10) == ([], False)


def test_a_spill_chosen_while_its_session_is_deleted_does_not_bring_it_back(replicas, engine, service_redis_url,
                                                                           monkeypatch):
    a, _ = replicas
    sid = resident(a, new_state(engine))
    chosen, spill_one = [], a.residency._spill_one
    monkeypatch.setattr(a.residency, "_spill_one", lambda victim: chosen.append(victim) or spill_one(victim))
    delete = a.directory.delete

    def io_thread_settles_after(sid_, tenant):   # the delete's Redis DEL lands before the I/O thread's spill
        found = delete(sid_, tenant)
        a.budget_bytes = 0
        a.settle()
        return found

    monkeypatch.setattr(a.directory, "delete", io_thread_settles_after)
    assert a.delete(sid)
    assert_gone(service_redis_url, a, sid)
    assert chosen == [], "a session being deleted is no spill victim"


def test_a_spill_landing_after_a_delete_does_not_register_the_session_again(replicas, engine, service_redis_url,
                                                                          monkeypatch):
    a, _ = replicas
    sid = resident(a, new_state(engine))
    delete = a.directory.delete

    def spill_lands_after(sid_, tenant):   # a spill picked just before the delete marked it, written after its DEL
        found = delete(sid_, tenant)
        a.spiller.spill_one(sid_)
        return found

    monkeypatch.setattr(a.directory, "delete", spill_lands_after)
    assert a.delete(sid)
    assert_gone(service_redis_url, a, sid)


@pytest.mark.parametrize("ends_by", ["DeleteSession", "expiry"])
def test_a_summary_note_queued_before_a_delete_does_not_bring_the_session_back(service_redis_url, engine, ends_by):
    now = [1000.0]
    store = SessionStore(Spill(service_redis_url, ttl_s=3600), engine.loaded.fingerprint.id, "cpu", 10**9,
                         replica_id="a", clock=lambda: now[0])
    sid = resident(store, new_state(engine), ttl_s=60)
    queued = []
    store.defer = lambda fn, *args: queued.append((fn, args))   # the I/O thread, busy elsewhere for now
    store.acquire(sid)
    store.put(sid, new_state(engine, "The fox and the river, a second turn"))   # queues the turn's summary note
    store.release(sid)
    if ends_by == "DeleteSession":
        assert store.delete(sid)
    else:
        now[0] += 61
        store.renew_leases()
    assert store.table.get(sid) is None
    for fn, args in queued:   # the note runs at last
        fn(*args)
    assert_gone(service_redis_url, store, sid)


def test_a_renewal_landing_after_a_hand_over_does_not_take_the_lease_back(replicas, engine, service_redis_url,
                                                                         monkeypatch):
    a, b = replicas
    sid = resident(a, new_state(engine))
    fenced = a.directory.fenced

    def hand_over_lands_first(sid_, gen, mode, *args, **kwargs):
        if mode == "renew":   # the renewal passed its check; the hand-over's release reached Redis before it
            a.hand_over(sid_)
        return fenced(sid_, gen, mode, *args, **kwargs)

    monkeypatch.setattr(a.directory, "fenced", hand_over_lands_first)
    a.ownership.renew_leases()
    assert lease_holder(service_redis_url, sid) is None, "no replica holds it: another may claim it at once"
    assert a.table.get(sid) is None
    one_turn(b, sid, new_state(engine, "The fox and the river, taken by b"))
    assert lease_holder(service_redis_url, sid) == "b"


def test_a_lease_that_lapsed_unclaimed_is_renewed_not_dropped(replicas, engine, service_redis_url):
    """Only a lease given back ends its generation: one that lapsed (Redis unreachable past its TTL) while no
    replica claimed the session is taken again, so the resident turns Redis has not saved are not lost."""
    a, _ = replicas
    sid = resident(a, new_state(engine))
    redis.Redis.from_url(service_redis_url).delete(lease_key(sid))
    a.ownership.renew_leases()
    assert lease_holder(service_redis_url, sid) == "a" and a.table.get(sid) is not None
