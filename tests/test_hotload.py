"""Issue 4 end to end: ProfileModel over gRPC -> a real Celery worker -> Redis -> the running service
hot-loads the new head map, while sessions made under the old map keep it.

A private Redis database, a real worker process (`celery -A worker.app worker`, as in test_worker.py)
and the real gRPC server on loopback, wired to the Redis head-map store, registry and ProfileJobs.
Outputs are compared with the engine run in-process with the map each session was made under.
"""
from __future__ import annotations

import json
import time

import grpc
import pytest
import redis
import torch

from conftest import announce_raw, flushed_db
from replay import replay_logprobs
from services.api.razorserve.v1 import razorserve_pb2 as pb
from services.engine import HeadMap, HeadMapError, SamplingParams, load_model
from services.headmap_store import HeadMapStore, map_key
from services.inference.client import RazorClient
from services.inference.headmaps import HeadMapRegistry
from services.inference.profile_jobs import ProfileJobs
from services.inference.server import build_server
from services.observability import METRICS
from services.settings import Settings
from test_service import PROMPT, SAMPLED, TURNS, rpc_error
from test_worker import JOB_DEADLINE_S, StateRecorder, start_worker, stop_worker

# Small enough for seconds of profiling (plus calibration, on by default); compression keys included.
FAST = {"seq_len": 32, "repeats": 2, "n_samples": 2, "sink": 4, "min_window": 16, "ratio": 5.0}
CALIBRATION_STAGES = {"prefilling calibration tasks", "training KV-head gates"}
FINISHED = (pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED)
# Sessions sample with a fixed seed and report each token's logprob: the tiny random model's tokens barely depend
# on its attention (greedy or seeded, the two maps here give the same tokens), so a session moved to the new map
# would go unnoticed by its tokens alone; its logprobs follow the map.
SAMPLING = dict(max_new_tokens=SAMPLED.max_new_tokens, temperature=SAMPLED.temperature, seed=SAMPLED.seed,
                logprobs=True)
LOGPROB_ATOL = 1e-4   # tests/test_engine_batching.py's: batched and alone agree this closely


def engine_turns(loaded, head_map) -> list[tuple[list[int], list[float]]]:
    """The conversation run in-process on the engine with `head_map`, sampling as the sessions do:
    (tokens, logprobs) of the first reply and of each turn."""
    return replay_logprobs(loaded, head_map, PROMPT, TURNS, SamplingParams(**SAMPLING))


def assert_same_turns(replies, control) -> None:
    assert [r.token_ids for r in replies] == [tokens for tokens, _ in control]
    got = torch.tensor([lp for r in replies for lp in r.logprobs])
    torch.testing.assert_close(got, torch.tensor([lp for _, lps in control for lp in lps]), atol=LOGPROB_ATOL, rtol=0)


def max_logprob_gap(a, b) -> float:
    return float((torch.tensor([lp for _, lps in a for lp in lps]) - torch.tensor([lp for _, lps in b for lp in lps]))
                 .abs().max())


@pytest.fixture(scope="module")
def url(redis_url) -> str:
    return flushed_db(redis_url, 8)


@pytest.fixture(scope="module")
def worker(url):
    proc = start_worker(url, RAZOR_MODEL="tiny-random")
    yield proc
    stop_worker(proc)


@pytest.fixture(scope="module")
def store(url) -> HeadMapStore:
    return HeadMapStore(redis.Redis.from_url(url))


def _settings(url: str) -> Settings:
    return Settings(host="127.0.0.1", port=0, redis_url=url, grace_s=2.0, auth_token="", tls_cert="",
                    tls_key="", metrics_port=0)


@pytest.fixture(scope="module")
def service(url, store, tiny_loaded, tiny_head_map):
    """(server, registry): the service starts on `tiny_head_map` and listens for new active maps."""
    registry = HeadMapRegistry(store, tiny_loaded.fingerprint, initial=tiny_head_map, poll_s=0.1).start()
    server = build_server(_settings(url), loaded=tiny_loaded, head_maps=registry, jobs=ProfileJobs(url),
                          head_map_store=store).start()
    yield server, registry
    server.stop(0)   # also stops the registry


def _poll_job(client: RazorClient, job_id: str) -> list[pb.ProfileJob]:
    """Every status GetProfileJob returned until the job finished (fails, never hangs, at the deadline)."""
    seen, end = [], time.monotonic() + JOB_DEADLINE_S
    while time.monotonic() < end:
        seen.append(client.get_profile_job(job_id))
        if seen[-1].state in FINISHED:
            return seen
        time.sleep(0.05)
    pytest.fail(f"profiling job {job_id} did not finish; last status: {seen[-1]}")


def test_profile_job_hot_loads_while_old_sessions_keep_their_map(worker, service, store, url, tiny_loaded,
                                                                 tiny_head_map):
    server, registry = service
    succeeded_before = METRICS.registry.get_sample_value("razor_profiling_jobs_total", {"state": "succeeded"}) or 0
    recorder = StateRecorder(url)
    try:
        with RazorClient(server.target) as client:
            old = client.generate(prompt=PROMPT, **SAMPLING)
            assert client.get_session(old.session_id).head_map_version == tiny_head_map.version
            job = client.profile_model("tiny-random", **FAST, max_kl=5.0)   # a KL target reaches the worker
            assert job.state == pb.JOB_STATE_QUEUED and job.job_id
            statuses = _poll_job(client, job.job_id)
            final = statuses[-1]
            assert final.state == pb.JOB_STATE_SUCCEEDED, final.error
            version = final.head_map_version
            assert version and version != tiny_head_map.version and final.timings["total_s"] > 0

            # progress observed through GetProfileJob
            running = [(s.stage, s.done, s.total) for s in statuses if s.state == pb.JOB_STATE_RUNNING]
            assert len(set(running)) >= 2, f"progress did not move: {running}"
            assert all(0 <= done <= total for _, done, total in running)

            # published, active, and hot-loaded by the running service
            listed = client.list_head_maps()
            assert [v.version for v in listed if v.active] == [version]
            assert registry.wait_processed(version) == "activated"
            assert client.server_info().head_map.version == version

            # the old session keeps its map and keeps generating as the engine does with that map
            old_outs = [old] + [client.continue_session(old.session_id, text=t, **SAMPLING) for t in TURNS]
            assert client.get_session(old.session_id).head_map_version == tiny_head_map.version

            new = client.generate(prompt=PROMPT, **SAMPLING)
            new_outs = [new] + [client.continue_session(new.session_id, text=t, **SAMPLING) for t in TURNS]
            assert client.get_session(new.session_id).head_map_version == version
    finally:
        recorder.close()
    published = store.get(tiny_loaded.fingerprint, version)
    old_control, new_control = engine_turns(tiny_loaded, tiny_head_map), engine_turns(tiny_loaded, published)
    # the two maps must tell the sessions apart: else a service that moved the old session to the new map passes
    assert max_logprob_gap(old_control, new_control) > 2 * LOGPROB_ATOL, "the maps give the same turns: untested"
    assert_same_turns(old_outs, old_control)
    assert_same_turns(new_outs, new_control)
    assert published.calibration["params"]["max_kl"] == 5.0 and published.calibration["chosen"]["kl"] <= 5.0
    # on the tasks the worker's settings name (tests/test_worker.py's start_worker)
    assert (published.calibration["params"]["families"], published.calibration["params"]["lengths"]) == \
        (["digits", "word"], [128, 256])
    # the worker reported progress across every stage, calibration's included (RAZOR_CALIBRATE defaults on)
    stages = {s["result"]["stage"] for s in recorder.states
              if s["task_id"] == job.job_id and s["status"] == "PROGRESS"}
    assert {"loading model", "scoring heads", "validating", "storing"} | CALIBRATION_STAGES <= stages, stages
    assert METRICS.registry.get_sample_value("razor_profiling_jobs_total", {"state": "succeeded"}) == \
        succeeded_before + 1


def _wrong_shapes(head_map: HeadMap) -> str:
    """The map's JSON with one layer's KV heads dropped, still claiming the map's version."""
    doc = json.loads(head_map.to_json())
    doc["retrieval_kv_heads"] = doc["retrieval_kv_heads"][:-1]
    return json.dumps(doc)


def test_bad_maps_are_refused_and_the_active_map_stays(service, store, tiny_loaded, tiny_head_map):
    server, registry = service
    fp = tiny_loaded.fingerprint
    other = HeadMap.full(load_model("tiny-random:1", device="cpu").fingerprint)
    bad = {"corrupt0json0000": ("{not json", "not valid JSON"),               # version: (stored text, reason)
           other.version: (other.to_json(), f"is for model {other.fingerprint.id}"),
           "shapes0000000000": (_wrong_shapes(tiny_head_map), "one list per layer")}
    with RazorClient(server.target) as client:
        active = client.server_info().head_map.version
        for version, (text, reason) in bad.items():
            store.client.set(map_key(fp.id, version), text)   # what a faulty publisher could leave
            with pytest.raises(HeadMapError, match=reason):    # the store will not activate it ...
                store.activate(fp, version)
            announce_raw(store.client, fp.id, version)         # ... but a raw writer can still announce it
            outcome = registry.wait_processed(version)
            assert outcome and outcome.startswith("rejected") and reason in outcome, (version, outcome)
            assert client.server_info().head_map.version == active, "the previous map stays active"
        session = client.generate(prompt="Hello there", max_new_tokens=2)
        assert client.get_session(session.session_id).head_map_version == active
        listed = {v.version: v for v in client.list_head_maps()}
    for version, (_, reason) in bad.items():   # reported refused, with why, never active
        assert listed[version].refused and not listed[version].active, listed[version]
        assert reason in listed[version].refused_reason


def test_invalid_profile_params_are_refused_before_queueing(service, url):
    server, _ = service
    r = redis.Redis.from_url(url)
    queued, records = r.llen("profiling"), len(r.keys("razor:profile:job:*"))
    with RazorClient(server.target) as client:
        for params, hint in (({"induction_fraction": 2.0}, "induction_fraction"), ({"seq_len": 0}, "seq_len"),
                             ({"echo_fraction": -0.1}, "echo_fraction"), ({"repeats": 1}, "repeats"),
                             ({"max_kl": -1.0}, "max_kl"),
                             ({"max_kl": 0.5, "calibrate": False}, "calibration targets"),
                             ({"seq_len": 100000}, "seq_len must be at most"),
                             ({"repeats": 1000}, "repeats must be at most"),
                             ({"n_samples": 1000}, "n_samples must be at most")):
            error = rpc_error(lambda: client.profile_model("tiny-random", **params))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and hint in error.details(), error.details()
    assert (r.llen("profiling"), len(r.keys("razor:profile:job:*"))) == (queued, records)


def test_broker_down_makes_profile_model_unavailable(tiny_loaded, tiny_head_map, url):
    from conftest import free_port
    from services.inference.runtime import FixedHeadMaps

    dead = f"redis://127.0.0.1:{free_port()}/0"
    server = build_server(_settings(url), loaded=tiny_loaded, head_maps=FixedHeadMaps(tiny_head_map),
                          jobs=ProfileJobs(dead), head_map_store=None).start()
    try:
        with RazorClient(server.target) as client:
            error = rpc_error(lambda: client.profile_model("tiny-random", **FAST))
    finally:
        server.stop(0)
    assert error.code() == grpc.StatusCode.UNAVAILABLE and "cannot reach Redis" in error.details()


def test_model_refs_outside_the_deployment_are_refused_before_queueing(service, url):
    server, _ = service
    r = redis.Redis.from_url(url)
    queued, records = r.llen("profiling"), len(r.keys("razor:profile:job:*"))
    details = set()
    with RazorClient(server.target) as client:
        for ref in ("/etc/passwd", "/no/such/model", "../../etc", "llama-3b"):   # exists or not: one answer
            error = rpc_error(lambda: client.profile_model(ref, **FAST))
            assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()
            details.add(error.details())
    assert len(details) == 1 and "RAZOR_PROFILE_ALLOWED_MODELS" in details.pop()
    assert (r.llen("profiling"), len(r.keys("razor:profile:job:*"))) == (queued, records)
