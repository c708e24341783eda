"""Structured logs and Prometheus metrics (services/observability.py)."""
from __future__ import annotations

import json
import logging
import urllib.request
from concurrent import futures

import grpc
import pytest

from services.observability import JsonFormatter, Metrics, MetricsInterceptor, setup_logging, start_metrics_server
from services.settings import Settings


def test_json_log_line_has_fields_and_extras():
    record = logging.LogRecord("razor.test", logging.WARNING, __file__, 1, "spilled %d sessions", (3,), None)
    record.session_id = "abc"
    entry = json.loads(JsonFormatter().format(record))
    assert entry["level"] == "WARNING" and entry["logger"] == "razor.test"
    assert entry["msg"] == "spilled 3 sessions" and entry["session_id"] == "abc"


def test_setup_logging_sets_level_and_format():
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    try:
        setup_logging(Settings(log_level="debug", log_json=True))
        assert root.level == logging.DEBUG
        assert isinstance(root.handlers[0].formatter, JsonFormatter)
        setup_logging(Settings(log_json=False))
        assert not isinstance(root.handlers[0].formatter, JsonFormatter)
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])


def test_metrics_endpoint_serves_every_metric():
    metrics = Metrics()
    metrics.observe_generation(tokens=20, seconds=0.5)
    metrics.resident_sessions.set(2)
    metrics.spilled_sessions.set(1)
    metrics.kv_bytes_saved.set(4096)
    metrics.profiling_jobs.labels(state="succeeded").inc()
    server = start_metrics_server(_free_port(), host="127.0.0.1", metrics=metrics)
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=5).read().decode()
    finally:
        server.shutdown()
    assert "razor_generated_tokens_total 20.0" in body
    assert "razor_tokens_per_second_count 1.0" in body
    assert "razor_resident_sessions 2.0" in body and "razor_spilled_sessions 1.0" in body
    assert "razor_kv_bytes_saved 4096.0" in body
    assert 'razor_profiling_jobs_total{state="succeeded"} 1.0' in body


def test_metrics_port_zero_is_off():
    assert start_metrics_server(0) is None


def test_interceptor_counts_requests_by_rpc_and_code():
    metrics = Metrics()

    def ok(request, _ctx):
        return request

    def denied(_request, ctx):
        ctx.abort(grpc.StatusCode.PERMISSION_DENIED, "no")

    def stream(request, _ctx):
        yield request
        yield request

    handlers = {
        "Ok": grpc.unary_unary_rpc_method_handler(ok),
        "Denied": grpc.unary_unary_rpc_method_handler(denied),
        "Stream": grpc.unary_stream_rpc_method_handler(stream),
    }
    server = grpc.server(futures.ThreadPoolExecutor(2), interceptors=[MetricsInterceptor(metrics)])
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("t.S", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            assert channel.unary_unary("/t.S/Ok")(b"x", timeout=5) == b"x"
            with pytest.raises(grpc.RpcError):
                channel.unary_unary("/t.S/Denied")(b"x", timeout=5)
            assert list(channel.unary_stream("/t.S/Stream")(b"y", timeout=5)) == [b"y", b"y"]
    finally:
        server.stop(grace=None)
    value = metrics.registry.get_sample_value
    assert value("razor_requests_total", {"rpc": "Ok", "code": "OK"}) == 1
    assert value("razor_requests_total", {"rpc": "Denied", "code": "PERMISSION_DENIED"}) == 1
    assert value("razor_requests_total", {"rpc": "Stream", "code": "OK"}) == 1


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> str:
    return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()


def _sample(body: str, name: str, **labels) -> float:
    """The value of one scraped sample (0 when the series is absent)."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return sample.value
    return 0.0


def test_running_server_exports_its_metrics(service_redis_url, tiny_loaded, tiny_head_map):
    from services.inference.client import RazorClient
    from services.inference.profile_jobs import ProfileJobs
    from services.inference.runtime import FixedHeadMaps
    from services.inference.server import build_server

    fp = tiny_loaded.fingerprint
    per_token = 2 * fp.n_layers * fp.n_kv_heads * fp.head_dim * 4
    port = _free_port()
    settings = Settings(host="127.0.0.1", port=0, redis_url=service_redis_url, grace_s=2.0, auth_token="",
                        tls_cert="", tls_key="", metrics_port=port, kv_budget_bytes=per_token * 40)
    # No worker listens: a submitted job stays queued, which is all this test counts.
    server = build_server(settings, loaded=tiny_loaded, head_maps=FixedHeadMaps(tiny_head_map),
                          jobs=ProfileJobs(service_redis_url), head_map_store=None).start()
    try:
        before = _scrape(port)
        with RazorClient(server.target) as client:
            client.generate(prompt="Hello there, my friend", max_new_tokens=8)
            # Longer than the local window (sink 4 + 16), so compressed; the first session spills for it.
            second = client.generate(prompt=" ".join(["fox"] * 22), max_new_tokens=8)
            job = client.profile_model("tiny-random", seq_len=16, repeats=2)
            client.get_profile_job(job.job_id)   # still queued: counted once
            assert client.get_session(second.session_id).kv_bytes < client.get_session(second.session_id).kv_bytes_full
        after = _scrape(port)
    finally:
        server.stop(0)

    def moved(name: str, **labels) -> float:
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    assert moved("razor_requests_total", rpc="Generate", code="OK") == 2
    assert moved("razor_requests_total", rpc="ProfileModel", code="OK") == 1
    assert moved("razor_generated_tokens_total") == 16
    assert moved("razor_tokens_per_second_count") == 2
    assert _sample(after, "razor_resident_sessions") == 1 and _sample(after, "razor_spilled_sessions") == 1
    assert _sample(after, "razor_resident_kv_bytes") > 0 and _sample(after, "razor_kv_bytes_saved") > 0
    assert moved("razor_profiling_jobs_total", state="queued") == 1
