"""Structured logs and Prometheus metrics for the service (and anything else that wants them).

- ``setup_logging(settings)``: root logger at ``settings.log_level``; one JSON object per line
  when ``settings.log_json`` (what log shippers parse), else a plain human format.
- ``METRICS``: every metric on its own ``CollectorRegistry`` (no process/platform collectors
  from the global default, and tests can build a fresh ``Metrics()`` without name clashes).
- ``start_metrics_server(port)``: the ``/metrics`` HTTP endpoint; port 0 means off.
- ``MetricsInterceptor``: a gRPC server interceptor counting requests by RPC and status code.
"""
from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import dataclass, field

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Attributes every LogRecord has; anything else was passed through ``extra=`` and is logged.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ts, level, logger, msg, plus ``extra=`` fields and exc."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD_ATTRS and not key.startswith("_"):
                entry[key] = value
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(settings) -> None:
    """Configure the root logger from ``settings.log_level`` and ``settings.log_json``."""
    handler = logging.StreamHandler(sys.stderr)
    if settings.log_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)


# Buckets for decode throughput of one request, tokens/s: tiny CPU models to big GPUs.
_TPS_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)


@dataclass
class Metrics:
    """The service's Prometheus metrics, all on ``registry``."""

    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r = self.registry
        self.requests = Counter(
            "razor_requests", "gRPC requests finished, by RPC and status code", ["rpc", "code"], registry=r
        )
        self.request_seconds = Histogram("razor_request_seconds", "gRPC request duration", ["rpc"], registry=r)
        self.generated_tokens = Counter("razor_generated_tokens", "tokens generated", registry=r)
        self.tokens_per_second = Histogram(
            "razor_tokens_per_second", "decode throughput of one request", buckets=_TPS_BUCKETS, registry=r
        )
        self.resident_sessions = Gauge("razor_resident_sessions", "sessions whose cache is in device memory", registry=r)
        self.spilled_sessions = Gauge("razor_spilled_sessions", "sessions whose cache is spilled to Redis", registry=r)
        self.resident_kv_bytes = Gauge("razor_resident_kv_bytes", "device bytes held by resident caches", registry=r)
        self.kv_bytes_saved = Gauge(
            "razor_kv_bytes_saved", "full-cache bytes minus compressed bytes over resident sessions", registry=r
        )
        self.profiling_jobs = Counter(
            "razor_profiling_jobs", "profiling jobs seen by the service, by state", ["state"], registry=r
        )

    def observe_generation(self, tokens: int, seconds: float) -> None:
        """Record one finished generation: ``tokens`` new tokens in ``seconds`` of decoding."""
        self.generated_tokens.inc(tokens)
        if tokens > 0 and seconds > 0:
            self.tokens_per_second.observe(tokens / seconds)


METRICS = Metrics()


def start_metrics_server(port: int, host: str | None = None, metrics: Metrics = METRICS):
    """Serve ``/metrics`` on ``host:port`` in a daemon thread; ``port == 0`` means off (returns None).

    ``host`` defaults to the gRPC bind address (``RAZOR_HOST``): loopback locally, all
    interfaces in a container.
    """
    if port == 0:
        return None
    if host is None:
        from services.settings import get_settings

        host = get_settings().host
    server, _thread = start_http_server(port, addr=host, registry=metrics.registry)
    logging.getLogger(__name__).info("metrics on http://%s:%d/metrics", host, server.server_port)
    return server


class MetricsInterceptor(grpc.ServerInterceptor):
    """Counts every RPC by method name and final status code, and times it.

    Streaming responses are counted when the stream ends (or the handler raises).
    """

    def __init__(self, metrics: Metrics = METRICS):
        self._metrics = metrics

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        rpc = handler_call_details.method.rsplit("/", 1)[-1]
        if handler.unary_unary:
            return handler._replace(unary_unary=self._wrap_unary(handler.unary_unary, rpc))
        if handler.unary_stream:
            return handler._replace(unary_stream=self._wrap_stream(handler.unary_stream, rpc))
        if handler.stream_unary:
            return handler._replace(stream_unary=self._wrap_unary(handler.stream_unary, rpc))
        return handler._replace(stream_stream=self._wrap_stream(handler.stream_stream, rpc))

    def _record(self, rpc: str, context, started: float, failed: bool) -> None:
        code = context.code() if hasattr(context, "code") else None
        if code is None:
            code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
        name = code.name if isinstance(code, grpc.StatusCode) else str(code)
        self._metrics.requests.labels(rpc=rpc, code=name).inc()
        self._metrics.request_seconds.labels(rpc=rpc).observe(time.perf_counter() - started)

    def _wrap_unary(self, behavior, rpc: str):
        def wrapped(request, context):
            started, failed = time.perf_counter(), True
            try:
                response = behavior(request, context)
                failed = False
                return response
            finally:
                self._record(rpc, context, started, failed)

        return wrapped

    def _wrap_stream(self, behavior, rpc: str):
        def wrapped(request, context):
            started, failed = time.perf_counter(), True
            try:
                yield from behavior(request, context)
                failed = False
            finally:
                self._record(rpc, context, started, failed)

        return wrapped
