"""HeadMapStore and HeadMapRegistry against a real redis-server (no worker, no model load)."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import replace

import pytest
import redis

from conftest import RedisServer, announce_raw
from services.engine import CompressionParams, HeadMap, HeadMapError, ModelFingerprint
from services.engine.headmap import SHIPPED_DIR
from services.headmap_store import (CHANNEL, HeadMapStore, InvalidProfileParams, map_key, params_digest,
                                    parse_profile_params, redis_time)
from services.inference.headmaps import HeadMapRegistry

FP = ModelFingerprint("llama", 4, 4, 2, 16, "a" * 64)
OTHER_FP = ModelFingerprint("llama", 4, 4, 2, 16, "b" * 64)


def make_map(fp: ModelFingerprint = FP, kept: int = 1) -> HeadMap:
    """A valid map keeping `kept` KV heads per layer in full."""
    scores = [[0.1 * h for h in range(fp.n_heads)] for _ in range(fp.n_layers)]
    return HeadMap(fp, scores, scores, [(layer, 0) for layer in range(fp.n_layers)],
                   [list(range(kept)) for _ in range(fp.n_layers)], CompressionParams())


@pytest.fixture
def store(redis_url):
    client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + "/5")
    client.flushdb()
    yield HeadMapStore(client)
    client.close()


@pytest.fixture
def registry(store):
    reg = HeadMapRegistry(store, FP, initial=make_map(kept=2), poll_s=0.1).start()
    yield reg
    reg.stop()


def test_publish_get_activate_list(store):
    first, second = make_map(kept=1), make_map(kept=2)
    v1 = store.publish(first, b"\x89PNG fake")
    v2 = store.publish(second, None)
    assert v1 != v2 and store.active(FP) is None
    store.activate(FP, v1)
    assert store.active(FP).version == v1 and store.get(FP.id, v2).kv_fraction == 1.0
    assert store.png(FP, v1) == b"\x89PNG fake" and store.png(FP, v2) is None
    rows = store.list_versions(FP)
    assert [r["version"] for r in rows] == [v1, v2]
    assert [r["active"] for r in rows] == [True, False]
    assert rows[0]["kv_fraction"] == pytest.approx(0.5)


def test_publish_is_idempotent(store):
    assert store.publish(make_map(), None) == store.publish(make_map(), None)
    assert len(store.list_versions(FP)) == 1


def test_unknown_version_is_a_key_error(store):
    with pytest.raises(KeyError):
        store.get(FP, "nope")
    with pytest.raises(KeyError):
        store.activate(FP, "nope")


def test_get_refuses_another_models_map_stored_under_ours(store):
    other = make_map(OTHER_FP)
    store.client.set(map_key(FP.id, other.version), other.to_json())
    with pytest.raises(HeadMapError, match="is for model"):
        store.get(FP, other.version)


def test_params_digest_and_lookup(store):
    pp, cp, targets = parse_profile_params({"seq_len": 32, "sink": 2})
    assert pp.seq_len == 32 and cp.sink == 2 and cp.min_window == CompressionParams().min_window and targets == {}
    digest = params_digest(pp, cp, calibrate=False)
    assert digest == params_digest(*parse_profile_params({"sink": 2, "seq_len": 32})[:2], calibrate=False)
    # the compression as a map records it: fields at their defaults name the same job, others another
    assert digest == params_digest(pp, replace(cp, recent_rows=0, local_recent_rows=None), calibrate=False)
    assert digest != params_digest(pp, replace(cp, recent_rows=8), calibrate=False)
    # calibration targets name another job only when it calibrates
    _, _, targets = parse_profile_params({"max_kl": 0.2, "max_accuracy_drop": 0.05})
    assert targets == {"max_kl": 0.2, "max_accuracy_drop": 0.05}
    assert params_digest(pp, cp, True, targets) != params_digest(pp, cp, True)
    assert params_digest(pp, cp, False, targets) == params_digest(pp, cp, False)
    version = store.publish(make_map(), None, params_digest=digest)
    assert store.version_for_params(FP, digest) == version
    assert store.version_for_params(FP, "other") is None


@pytest.mark.parametrize("params, words", [
    ({"induction_fraction": 1.5}, "induction_fraction"),
    ({"echo_fraction": -0.1}, "echo_fraction"),
    ({"seq_len": 0}, "seq_len"),
    ({"n_samples": 0}, "n_samples"),
    ({"seq_len": "long"}, "must be a number"),
    ({"bogus": 1}, "unknown profiling parameter"),
    ({"ratio": 0.5}, "ratio"),
    ({"retrieval_bits": 4}, "retrieval_bits must be one of"),
    ({"retrieval_value_bits": 4}, "one of 16/16, 8/8, 8/4, 6/4 bits, got 16/4"),
    ({"retrieval_bits": 8, "retrieval_value_bits": 2}, "got 8/2"),
    ({"max_kl": 0}, "max_kl"),
    ({"max_accuracy_drop": 1.5}, "max_accuracy_drop"),
    ({"seq_len": 8193}, "seq_len must be at most 8192"),
    ({"repeats": 17}, "repeats must be at most 16"),
    ({"n_samples": 33}, "n_samples must be at most 32"),
    ({"seq_len": 4096, "repeats": 9}, r"seq_len x repeats must be at most 32768"),
    ({"seq_len": 8192, "repeats": 5}, r"got 8192 x 5"),
    ({"seed": -1}, "seed must be within"),
    ({"recent_rows": -4}, "recent_rows must be a count"),
    ({"local_recent_rows": 2.5}, "local_recent_rows must be a count"),
])
def test_bad_profile_params_are_value_errors(params, words):
    with pytest.raises(InvalidProfileParams, match=words):
        parse_profile_params(params)


def test_a_job_may_keep_recent_rows_and_the_local_group_follows_unless_named():
    service = CompressionParams(recent_rows=0, local_recent_rows=8)
    _, cp, _ = parse_profile_params({"retrieval_bits": 8, "local_bits": 8, "recent_rows": 16.0}, service)
    assert (cp.recent_rows, cp.local_recent_rows, cp.recent) == (16, None, (16, 16))
    _, cp, _ = parse_profile_params({"recent_rows": 16, "local_recent_rows": 4}, service)
    assert (cp.recent_rows, cp.local_recent_rows) == (16, 4)


def test_a_job_may_store_values_in_4_bits_beside_8_bit_keys():
    _, cp, _ = parse_profile_params({"retrieval_bits": 8, "retrieval_value_bits": 4})
    assert (cp.retrieval_bits, cp.value_bits) == (8, 4)
    _, eight, _ = parse_profile_params({"retrieval_bits": 8})
    assert eight.value_bits == 8 and eight != cp
    # a service whose default is 8/4: a job naming 16 bits gets 16 for its values too, not a refusal
    _, sixteen, _ = parse_profile_params({"retrieval_bits": 16}, cp)
    assert (sixteen.retrieval_bits, sixteen.value_bits) == (16, 16)
    _, default, _ = parse_profile_params({}, cp)
    assert default == cp


def test_profile_sizes_at_their_bounds_are_accepted():
    pp, _, _ = parse_profile_params({"seq_len": 2048, "repeats": 16, "n_samples": 32})
    assert (pp.seq_len, pp.repeats, pp.n_samples) == (2048, 16, 32)


# --- registry ---------------------------------------------------------------------------------
def test_registry_finds_map_activated_while_it_was_down(store):
    version = store.publish(make_map(kept=1), None)
    store.activate(FP, version)   # nobody listening: the notification is lost
    reg = HeadMapRegistry(store, FP, initial=make_map(kept=2)).start()
    try:
        assert reg.active.version == version
    finally:
        reg.stop()


def test_registry_hot_loads_and_keeps_old_maps_reachable(store, registry):
    old = registry.active.version
    new = store.publish(make_map(kept=1), None)
    store.activate(FP, new)
    assert registry.wait_processed(new) == "activated"
    assert registry.active.version == new
    assert registry.get(old).version == old   # sessions made under the old map still find it


@pytest.mark.parametrize("corrupt", ["not json", "other model", "wrong shapes"])
def test_registry_refuses_bad_map_and_keeps_the_old(store, registry, corrupt):
    good = registry.active.version
    text = json.loads(make_map(kept=1).to_json())
    if corrupt == "other model":
        text = json.loads(make_map(OTHER_FP, kept=1).to_json())
    elif corrupt == "wrong shapes":
        text["induction"] = [[0.0] * 3] * 4
    version = f"bad-{corrupt.replace(' ', '-')}"
    store.client.set(map_key(FP.id, version), "{{{" if corrupt == "not json" else json.dumps(text))
    with pytest.raises(HeadMapError):
        store.activate(FP, version)               # the store refuses to activate it ...
    assert store.active_version(FP) != version
    announce_raw(store.client, FP.id, version)    # ... a raw writer announces it anyway
    assert registry.wait_processed(version).startswith("rejected")
    assert registry.active.version == good
    row = {r["version"]: r for r in store.list_versions(FP)}[version]   # reported, with the reason
    assert row["refused"] and not row["active"] and row["refused_reason"] == registry.refused[version]


def test_registry_ignores_other_models_and_junk_notifications(store, registry):
    good = registry.active.version
    other = store.publish(make_map(OTHER_FP), None)
    store.activate(OTHER_FP, other)
    store.client.publish(CHANNEL, "junk")
    mine = store.publish(make_map(kept=1), None)
    store.activate(FP, mine)   # processed after the two above: they changed nothing
    assert registry.wait_processed(mine) == "activated"
    assert other not in registry._outcomes and good != mine


def test_registry_without_initial_map_keeps_every_head(store):
    reg = HeadMapRegistry(store, FP)
    assert reg.active.kv_fraction == 1.0


def test_registry_reconnects_after_redis_restart():
    server = RedisServer().start()
    try:
        store = HeadMapStore(redis.Redis.from_url(server.url, socket_connect_timeout=0.5))
        reg = HeadMapRegistry(store, FP, initial=make_map(kept=2), poll_s=0.1).start()
        try:
            server.stop()
            server.start()   # same port, empty data
            version = store.publish(make_map(kept=1), None)
            store.activate(FP, version)   # may be published before the registry resubscribed:
            assert reg.wait_processed(version) == "activated"   # then its catch-up read finds it
            assert reg.active.version == version
        finally:
            reg.stop()
    finally:
        server.stop()


# --- a refused active pointer falls back, never to no compression ---------------------------------
def _bad_pointer(store: HeadMapStore, kind: str) -> str:
    """Point the active pointer at a version that cannot be loaded; returns that version."""
    version = f"bad-{kind}"
    if kind == "corrupt json":
        store.client.set(map_key(FP.id, version), "{{{")
    elif kind == "other model":
        store.client.set(map_key(FP.id, version), make_map(OTHER_FP).to_json())
    elif kind == "wrong shapes":
        doc = json.loads(make_map().to_json())
        doc["retrieval_kv_heads"] = doc["retrieval_kv_heads"][:-1]
        store.client.set(map_key(FP.id, version), json.dumps(doc))
    store.client.set(f"razor:headmaps:{FP.id}:active", version)   # "missing": named, never stored
    return version


@pytest.mark.parametrize("kind, reason", [("missing", "no head map version"), ("corrupt json", "not valid JSON"),
                                          ("other model", "is for model"), ("wrong shapes", "one list per layer")])
def test_bad_pointer_at_start_falls_back_to_the_newest_valid_map(store, kind, reason, caplog):
    older = store.publish(make_map(kept=2), None)
    newest = store.publish(make_map(kept=1), None)
    store.client.zadd(f"razor:headmaps:{FP.id}:versions", {older: 1.0, newest: 2.0})   # publication order
    bad = _bad_pointer(store, kind)
    with caplog.at_level(logging.ERROR, logger="services.inference.headmaps"):
        reg = HeadMapRegistry(store, FP, initial=None).start()
    try:
        assert reg.active.version == newest and reg.active.kv_fraction == 0.5   # still compressing
        assert reason in reg.refused[bad]
    finally:
        reg.stop()
    logged = [r.getMessage() for r in caplog.records if bad in r.getMessage()]
    assert logged and reason in logged[0] and newest in logged[0], logged
    rows = {r["version"]: r for r in store.list_versions(FP)}
    assert rows[bad]["refused"] and reason in rows[bad]["refused_reason"]
    assert not any(r["active"] for r in rows.values()), "a refused pointer is never reported active"


def test_bad_pointer_without_valid_maps_in_redis_uses_the_configured_map(store):
    bad = _bad_pointer(store, "corrupt json")
    configured = make_map(kept=1)
    reg = HeadMapRegistry(store, FP, initial=configured).start()
    try:
        assert reg.active.version == configured.version and bad in reg.refused
    finally:
        reg.stop()


def test_bad_pointer_falls_back_to_the_shipped_map(store):
    shipped = HeadMap.from_json(next(SHIPPED_DIR.glob("*.headmap.json")).read_text())
    fp = shipped.fingerprint
    store.client.set(map_key(fp.id, "garbage"), "not json")
    store.client.set(f"razor:headmaps:{fp.id}:active", "garbage")
    reg = HeadMapRegistry(store, fp, fallback=lambda: pytest.fail("the shipped map comes first")).start()
    try:
        assert reg.active.version == shipped.version and reg.active.kv_fraction < 1.0
    finally:
        reg.stop()
    assert {r["version"]: r["refused"] for r in store.list_versions(fp)} == {"garbage": True}


def test_bad_pointer_with_nothing_shipped_uses_the_fallback_then_says_compression_is_off(store, caplog):
    _bad_pointer(store, "missing")
    profiled = make_map(kept=1)
    reg = HeadMapRegistry(store, FP, fallback=lambda: profiled).start()
    try:
        assert reg.active.version == profiled.version
    finally:
        reg.stop()
    with caplog.at_level(logging.ERROR, logger="services.inference.headmaps"):
        bare = HeadMapRegistry(store, FP).start()
        bare.stop()
    assert bare.active.kv_fraction == 1.0
    assert any("COMPRESSION IS OFF" in r.getMessage() for r in caplog.records)


def test_a_refusal_is_cleared_once_the_version_loads(store, registry):
    version = make_map(kept=1).version
    announce_raw(store.client, FP.id, version)   # named before it was published
    assert registry.wait_processed(version).startswith("rejected: no head map version")
    assert {r["version"]: r["refused"] for r in store.list_versions(FP)}[version]
    store.publish(make_map(kept=1), None)
    store.activate(FP, version)
    deadline = time.monotonic() + 30
    while registry.wait_processed(version) != "activated" and time.monotonic() < deadline:
        time.sleep(0.05)   # the earlier outcome stays until the new notification is handled
    assert registry.active.version == version
    row = {r["version"]: r for r in store.list_versions(FP)}[version]
    assert row["active"] and not row["refused"] and version not in registry.refused


def test_listing_checks_the_active_pointer_even_when_no_service_refused_it(store):
    good = store.publish(make_map(kept=1), None)
    store.activate(FP, good)
    assert [r["active"] for r in store.list_versions(FP)] == [True]
    bad = _bad_pointer(store, "other model")
    rows = {r["version"]: r for r in store.list_versions(FP)}
    assert rows[bad]["refused"] and "is for model" in rows[bad]["refused_reason"]
    assert not rows[good]["active"] and not rows[bad]["active"]


# --- activation order: maps go live in the order their jobs were submitted ---------------------------
def _notifications(store: HeadMapStore):
    pubsub = store.client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(CHANNEL)
    while pubsub.get_message(timeout=0.1) is not None:
        pass
    return pubsub


def _drain(pubsub) -> list[str]:
    seen = []
    while (message := pubsub.get_message(timeout=0.2)) is not None:
        seen.append(json.loads(message["data"])["version"])
    return seen


def test_an_older_job_finishing_last_leaves_the_newer_jobs_map_active(store):
    older, newer = store.publish(make_map(kept=2), None), store.publish(make_map(kept=1), None)
    pubsub = _notifications(store)
    try:
        done = store.activate_if_newer(FP, newer, order=2000.0, job="job-new")   # the newer job finishes first
        assert (done.activated, done.active, done.by_job) == (True, newer, "job-new")
        late = store.activate_if_newer(FP, older, order=1000.0, job="job-old")   # then the older one (retried)
        assert (late.activated, late.active, late.by_job) == (False, newer, "job-new")
        assert store.active_version(FP) == newer
        assert _drain(pubsub) == [newer], "subscribers hear of the newer map only"
        assert [r["version"] for r in store.list_versions(FP) if r["active"]] == [newer]
        # an equal or later order moves it (the later of two equal calls wins)
        assert store.activate_if_newer(FP, older, order=2000.0, job="job-same").activated
        assert store.active_version(FP) == older
        assert store.activate_if_newer(FP, newer, order=3000.0, job="job-3").activated
        assert _drain(pubsub) == [older, newer]
    finally:
        pubsub.close()


def test_explicit_activation_is_unconditional_and_outranks_jobs_submitted_before_it(store):
    older, newer = store.publish(make_map(kept=2), None), store.publish(make_map(kept=1), None)
    before = time.time()
    assert store.activate_if_newer(FP, newer, order=before + 3600, job="job-future").activated
    store.activate(FP, older)   # explicit: moves the pointer even over a job's newer order
    assert store.active_version(FP) == older
    late = store.activate_if_newer(FP, newer, order=before, job="job-before")   # submitted before that choice
    assert (late.activated, late.active, late.by_job) == (False, older, "")
    assert store.activate_if_newer(FP, newer, order=time.time() + 1, job="job-after").activated


def test_activation_and_submission_times_are_redis_s_clock_not_the_hosts(store, monkeypatch, redis_url):
    """Replicas and workers on hosts whose clocks drift apart order jobs and explicit choices by one clock:
    Redis's. An explicit activation on a host an hour fast must not outrank a job submitted after it elsewhere,
    and a job submitted on a host an hour slow is still ordered after one submitted before it."""
    from services.inference.profile_jobs import ProfileJobs, _record_key

    older, newer = store.publish(make_map(kept=2), None), store.publish(make_map(kept=1), None)
    skewed = time.time() + 3600
    monkeypatch.setattr("services.headmap_store.time.time", lambda: skewed)
    store.activate(FP, older)                                    # on the fast host
    monkeypatch.undo()
    later = redis_time(store.client) + 1                         # a job submitted a second later, on a true clock
    assert store.activate_if_newer(FP, newer, order=later, job="job-after").activated
    slow = time.time() - 3600
    monkeypatch.setattr("time.time", lambda: slow)                      # the submitting host
    jobs = ProfileJobs(redis_url)
    monkeypatch.setattr(jobs.app, "send_task", lambda *args, **kwargs: None)   # no worker here: the record is all
    job = jobs.submit("smollm2")
    submitted = float(jobs.redis.hget(_record_key(job), "submitted_at"))
    assert abs(submitted - redis_time(store.client)) < 5, "the slow host's clock did not stamp it"
    assert submitted > later - 1


def test_a_running_jobs_heartbeat_and_a_workers_sign_of_life_are_read_by_redis_s_clock(monkeypatch, redis_url):
    """A worker on a host an hour slow still counts as alive, and its running job as running, to a service on a
    true clock: both sides stamp and compare by Redis's clock."""
    import functools
    import json as json_
    from types import SimpleNamespace

    from services.inference.profile_jobs import WORKERS_KEY, ProfileJobs, _record_key
    from worker.tasks import Heartbeat
    from worker.watchdog import Watchdog

    jobs = ProfileJobs(redis_url, stale_after_s=30)
    client, job, written = jobs.redis, f"job-skew-{time.monotonic_ns()}", {}
    client.hset(_record_key(job), mapping={"model_ref": "smollm2", "params": "{}", "calibrate": "null"})
    task = SimpleNamespace(request=SimpleNamespace(id=job), backend=SimpleNamespace(
        store_result=lambda task_id, meta, state, request: written.update(meta=meta)))
    slow = time.time() - 3600
    monkeypatch.setattr("time.time", lambda: slow)                      # the worker's host
    Heartbeat(task, 1, 60.0, clock=functools.partial(redis_time, client)).update(1, 4, "scoring heads")
    watchdog = Watchdog(client, f"worker-skew-{job}", 60.0, resend=lambda *args: None)
    watchdog.tick()
    monkeypatch.undo()                                                  # the service's host
    client.set(f"celery-task-meta-{job}", json_.dumps({"status": "PROGRESS", "result": written["meta"]}))
    assert jobs.status(job)["state"] == "running"
    assert abs(client.zscore(WORKERS_KEY, watchdog.name) - redis_time(client)) < 5
    client.zrem(WORKERS_KEY, watchdog.name)


def test_conditional_activation_checks_the_map_first(store):
    with pytest.raises(KeyError):
        store.activate_if_newer(FP, "nope", order=1.0, job="j")
    bad = _bad_pointer(store, "wrong shapes")
    store.client.delete(f"razor:headmaps:{FP.id}:active")
    with pytest.raises(HeadMapError):
        store.activate_if_newer(FP, bad, order=1.0, job="j")
    assert store.active_version(FP) is None


def test_a_pointer_without_a_recorded_order_is_replaced(store):
    old, new = store.publish(make_map(kept=2), None), store.publish(make_map(kept=1), None)
    announce_raw(store.client, FP.id, old)   # set by a writer that records no order (or before this existed)
    assert store.activate_if_newer(FP, new, order=1.0, job="j").activated
    assert store.active_version(FP) == new


# --- the listener survives a notification whose handling fails --------------------------------------
def test_a_failing_notification_is_logged_and_later_activations_still_hot_load(store, caplog):
    calls = []

    def fallback():   # the service profiles the model: the first time fine, the second out of memory
        calls.append(1)
        if len(calls) > 1:
            raise MemoryError("CUDA out of memory while profiling the fallback map")
        return make_map(kept=2)

    reg = HeadMapRegistry(store, FP, poll_s=0.1, fallback=fallback).start()
    try:
        assert reg.active.version == make_map(kept=2).version and len(calls) == 1
        with caplog.at_level(logging.ERROR, logger="services.inference.headmaps"):
            announce_raw(store.client, FP.id, "never-published")   # refused -> falls back -> fallback raises
            outcome = reg.wait_processed("never-published")
        assert outcome and outcome.startswith("failed: MemoryError"), outcome
        failed = [r for r in caplog.records if "never-published" in r.getMessage()]
        assert failed and failed[-1].exc_info, "logged with its traceback"
        assert reg.active.version == make_map(kept=2).version   # still serving the map it had
        good = store.publish(make_map(kept=1), None)
        store.activate(FP, good)
        assert reg.wait_processed(good) == "activated"   # the listener is still alive
        assert reg.active.version == good
        assert reg._thread is not None and reg._thread.is_alive()
    finally:
        reg.stop()


def test_a_failure_while_catching_up_does_not_end_the_listener(store, monkeypatch):
    reg = HeadMapRegistry(store, FP, initial=make_map(kept=2), poll_s=0.1)
    real, failures = reg._load_active, []

    def flaky():   # the start's read and the listener's first catch-up read raise
        if len(failures) < 2:
            failures.append(1)
            raise RuntimeError("unexpected")
        real()

    monkeypatch.setattr(reg, "_load_active", flaky)
    reg.start()   # logged, not raised: it serves the configured map
    try:
        good = store.publish(make_map(kept=1), None)
        store.activate(FP, good)
        deadline = time.monotonic() + 30
        while reg.active.version != good and time.monotonic() < deadline:
            time.sleep(0.05)
        assert reg.active.version == good and len(failures) == 2
    finally:
        reg.stop()
