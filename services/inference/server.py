"""Builds and runs the gRPC server: servicer, health, reflection, auth/metrics hooks, shutdown.

    python -m services.inference.server      # configured by services.settings.Settings (RAZOR_*)

Graceful shutdown, a drain (SIGTERM/SIGINT or ``RazorServer.stop``): health turns NOT_SERVING at
once, for Check and for every open Watch stream, while streams in flight go on; for
``RAZOR_DRAIN_DELAY_S`` the server still takes new RPCs, so load balancers that poll health take it
out of rotation before it refuses connections; then no new RPCs are taken (a proxy sends new calls
to another replica), Watch streams end, running turns get most of the grace period to finish and
are then cancelled (their streams end with finish reason CANCELLED), and every resident session is
spilled to Redis so a restarted service continues it.
"""
from __future__ import annotations

import logging
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import redis
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from services.engine import (CompressionParams, HeadMap, HeadMapError, LoadedModel, ProfileParams, SchedulerConfig,
                             load_model, profile_model, threads)
from services import observability
from services.engine.headmap import shipped_head_map
from services.headmap_store import HeadMapStore
from services.model_refs import ModelRefPolicy
from services.settings import Settings, get_settings

from . import auth
from .headmaps import HeadMapRegistry
from .profile_jobs import ProfileJobs
from .runtime import FixedHeadMaps, Runtime
from .servicer import SERVICE_NAME, RazorServeServicer, pb_grpc
from .sessions import SessionStore
from .errors import StoreUnavailable
from .local_spill import LocalSpills
from .spill import Spill
from .spilled_header import ModelShape

log = logging.getLogger(__name__)


class RuntimeHealth(health.HealthServicer):
    """Standard health service whose Check really touches the engine thread and the device."""

    def __init__(self, runtime: Runtime):
        super().__init__(experimental_non_blocking=True)
        self.runtime = runtime

    def Check(self, request, context):
        if request.service not in ("", SERVICE_NAME):
            context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {request.service!r}")
        ok = not self._shutting_down and self.runtime.healthy()
        status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
        return health_pb2.HealthCheckResponse(status=status)

    def Watch(self, request, context, send_response_callback=None):
        if send_response_callback is not None:
            send_response_callback = _closed_once(send_response_callback)
        return super().Watch(request, context, send_response_callback)

    def end_watches(self) -> None:
        """End every Watch stream with OK (each has been sent NOT_SERVING by then): an open watch is an
        RPC in flight, which would hold a graceful stop for the whole grace period. The open watches
        are grpcio-health-checking's own registry (pinned; tests/test_loadbalancer.py covers it)."""
        with self._lock:
            callbacks = [cb for per_service in self._send_response_callbacks.values() for cb in per_service]
        for callback in callbacks:
            callback(None)

    @property
    def _shutting_down(self) -> bool:
        return getattr(self, "_gracefully_shutting_down", False)


def _closed_once(send_response):
    """A Watch's response callback that ends its stream once: `end_watches` ends it, and the
    stream's own close callback then ends it again, which gRPC would do twice."""
    closed = threading.Event()

    def send(response) -> None:
        if response is None:
            if closed.is_set():
                return
            closed.set()
        send_response(response)

    return send


def wire_metrics(metrics, runtime: Runtime) -> None:
    """Tokens are counted as turns finish; session gauges are read from the store at scrape time, so
    spills, restores and deletes show without a turn. (One process-wide registry: the last runtime
    wired is the one reported, which only matters to tests that build several servers.)"""
    runtime.on_turn = lambda result, seconds: metrics.observe_generation(result.generated_tokens, seconds)
    store = runtime.store
    metrics.resident_sessions.set_function(lambda: store.usage()[1])
    metrics.spilled_sessions.set_function(lambda: store.usage()[2])
    metrics.resident_kv_bytes.set_function(store.resident_bytes)
    metrics.kv_bytes_saved.set_function(
        lambda: sum(e.full_nbytes - e.stored_nbytes for e in store.owned() if e.location == "device"))


class CountedJobs:
    """ProfileJobs that count each job once per state the service sees it in (queued at submit;
    running / succeeded / failed when GetProfileJob first reads them)."""

    _REMEMBERED = 10_000   # job ids whose last counted state is kept, oldest forgotten first

    def __init__(self, jobs, counter):
        self.jobs, self.counter = jobs, counter
        self._seen: dict[str, str] = {}
        self._lock = threading.Lock()

    def submit(self, *args, **kwargs) -> str:
        job_id = self.jobs.submit(*args, **kwargs)
        self._count(job_id, "queued")
        return job_id

    def status(self, job_id: str) -> dict:
        status = self.jobs.status(job_id)
        self._count(job_id, status["state"])
        return status

    def _count(self, job_id: str, state: str) -> None:
        with self._lock:
            if self._seen.get(job_id) == state:
                return
            self._seen.pop(job_id, None)
            self._seen[job_id] = state
            while len(self._seen) > self._REMEMBERED:
                self._seen.pop(next(iter(self._seen)))
        self.counter.labels(state=state).inc()


def initial_head_map(settings: Settings, loaded: LoadedModel) -> HeadMap:
    """The head map from RAZOR_HEAD_MAP_PATH, else the one shipped for this model, else one profiled now."""
    if settings.head_map_path:
        text = Path(settings.head_map_path).read_text()
        return HeadMap.from_json(text, expect=loaded.fingerprint)
    try:
        shipped = shipped_head_map(loaded.fingerprint)
    except HeadMapError as exc:  # a shipped file this engine version cannot read: profile instead
        log.warning("ignoring the shipped head map: %s", exc)
        shipped = None
    if shipped is not None:
        log.info("using the head map shipped for %s (version %s)", loaded.ref, shipped.version)
        return shipped
    log.info("no head map configured: profiling %s now", loaded.ref)

    def progress(done: int, total: int, stage: str) -> None:
        log.info("profiling %s: %s %d/%d", loaded.ref, stage, done, total)

    compression = CompressionParams(sink=settings.sink, min_window=settings.min_window, ratio=settings.ratio,
                                    retrieval_bits=settings.retrieval_bits,
                                    retrieval_value_bits=settings.retrieval_value_bits or None)
    return profile_model(loaded, ProfileParams(), compression, progress=progress)


def resolve_head_maps(settings: Settings, loaded: LoadedModel, store=None):
    """The head-map registry hot-loading from Redis when available, else a fixed map.

    Redis's active map wins; else RAZOR_HEAD_MAP_PATH; else a map profiled now.
    """
    if store is None:
        return FixedHeadMaps(initial_head_map(settings, loaded))
    try:
        in_redis = store.active_version(loaded.fingerprint) is not None
    except redis.RedisError as exc:
        log.warning("head maps: Redis unreachable at start (%s)", exc)
        in_redis = False
    initial = None if in_redis and not settings.head_map_path else initial_head_map(settings, loaded)
    # A refused active pointer falls back to Redis's newest valid map, then this chain (never to no map).
    return HeadMapRegistry(store, loaded.fingerprint, initial=initial,
                           fallback=lambda: initial_head_map(settings, loaded)).start()


def _profiling(settings: Settings, redis_client) -> tuple[ProfileJobs, HeadMapStore]:
    """The profiling-job client and the head-map store, both over Redis."""
    jobs = ProfileJobs(settings.redis_dsn(), stale_after_s=settings.profile_lease_s,
                       models=ModelRefPolicy.from_settings(settings))
    return jobs, HeadMapStore(redis_client)


class RazorServer:
    """A started-or-startable grpc.Server and the runtime behind it."""

    def __init__(self, settings: Settings, runtime: Runtime, jobs=None, head_map_store=None):
        auth.check_bind(settings)
        self.settings, self.runtime = settings, runtime
        interceptors = [*auth.server_interceptors(settings), observability.MetricsInterceptor()]
        self._metrics_http = None
        wire_metrics(observability.METRICS, runtime)
        jobs = CountedJobs(jobs, observability.METRICS.profiling_jobs) if jobs is not None else None
        # Handlers run serial torch (an import's tensors): only the model loop may own an OpenMP team (threads.py).
        self.handlers = ThreadPoolExecutor(settings.max_workers, thread_name_prefix="grpc", initializer=threads.serial)
        self.server = grpc.server(self.handlers, interceptors=interceptors)
        pb_grpc.add_RazorServeServicer_to_server(RazorServeServicer(runtime, jobs, head_map_store), self.server)
        self.health = RuntimeHealth(runtime)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        names = (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, self.server)
        self.port = auth.bind(self.server, f"{settings.host}:{settings.port}", settings)   # TLS when configured
        self._stop_lock = threading.Lock()
        self.shutdown_counts = {"spilled": 0, "saved_locally": 0, "lost": 0}
        self._stopped = False

    @property
    def target(self) -> str:
        return f"{self.settings.host}:{self.port}"

    def start(self) -> "RazorServer":
        if self.settings.metrics_port:
            self._metrics_http = observability.start_metrics_server(self.settings.metrics_port,
                                                                    host=self.settings.host)
        self.server.start()
        for name in ("", SERVICE_NAME):
            self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("RazorServe listening on %s (model %s, device %s)", self.target, self.runtime.loaded.ref,
                 self.runtime.loaded.device)
        return self

    def stop(self, grace_s: float | None = None) -> None:
        """Finish or cancel in-flight streams, then spill resident sessions to Redis.

        Idempotent; a second caller waits until the first one has finished.
        """
        with self._stop_lock:
            if not self._stopped:
                self._stop(grace_s)
                self._stopped = True

    def _stop(self, grace_s: float | None) -> None:
        grace = self.settings.grace_s if grace_s is None else grace_s
        self.health.enter_graceful_shutdown()  # NOT_SERVING now, to Check and every Watch stream
        if self.settings.drain_delay_s > 0:
            log.info("draining: health is NOT_SERVING; still serving for %.1f s", self.settings.drain_delay_s)
            time.sleep(self.settings.drain_delay_s)
        done = self.server.stop(grace)  # takes no new RPCs; running ones get `grace` seconds
        self.health.end_watches()
        if not self.runtime.wait_idle(grace * 0.8):
            log.warning("cancelling turns still running after %.1f s", grace * 0.8)
            self.runtime.cancel_all()  # streams end with finish reason CANCELLED
        done.wait()
        self.shutdown_counts = self.runtime.close()
        stop_registry = getattr(self.runtime.head_maps, "stop", None)
        if stop_registry:
            stop_registry()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()

    def wait(self) -> None:
        self.server.wait_for_termination()


_AUTO = object()


def build_server(settings: Settings, *, loaded: LoadedModel | None = None, head_maps=None,
                 jobs=_AUTO, head_map_store=_AUTO) -> RazorServer:
    """Everything but start(). Tests pass a loaded model and head maps to skip loading/profiling,
    and ``jobs=None`` / ``head_map_store=None`` to run without the profiling worker."""
    auth.check_bind(settings)   # before the slow part: an open port without keys never starts
    loaded = loaded or load_model(settings.model or None, device=settings.device,
                                 threads=settings.torch_threads, dtype=settings.dtype)
    auto_jobs, auto_store = _profiling(settings, redis.Redis.from_url(settings.redis_dsn()))
    jobs = auto_jobs if jobs is _AUTO else jobs
    head_map_store = auto_store if head_map_store is _AUTO else head_map_store
    head_maps = head_maps or resolve_head_maps(settings, loaded, head_map_store)
    spill = Spill(settings.sessions_redis_url or settings.redis_dsn(), settings.session_ttl_s,
                  password=settings.redis_password, cluster=settings.sessions_redis_cluster)
    local = LocalSpills(settings.local_spill_dir) if settings.local_spill_dir else None
    store = SessionStore(spill, loaded.fingerprint.id, loaded.device, settings.kv_budget_bytes, settings.max_sessions,
                         dtype=loaded.dtype_name, replica_id=settings.replica_id, lease_ttl_s=settings.lease_ttl_s,
                         handoff_timeout_s=settings.handoff_timeout_s, local_spills=local,
                         spill_key=settings.spill_key_bytes(), shape=ModelShape.of(loaded),
                         max_pinned=settings.max_pinned_sessions)
    try:
        uploaded = store.upload_local_spills()
        if uploaded:
            log.info("uploaded %d sessions saved locally at the last shutdown", uploaded)
    except StoreUnavailable as exc:
        log.warning("Redis unreachable at start (%s); locally saved sessions stay in %s until the next start",
                    exc, settings.local_spill_dir)
    scheduler = SchedulerConfig(max_running=settings.max_running, step_tokens=settings.step_tokens)
    runtime = Runtime(loaded, head_maps, store, scheduler, max_input_chars=settings.max_input_chars,
                      max_turns=settings.max_turns())
    runtime.max_import_bytes = settings.max_import_bytes
    return RazorServer(settings, runtime, jobs, head_map_store)


def main() -> None:
    settings = get_settings()
    observability.setup_logging(settings)   # the metrics endpoint starts with the server
    try:
        server = build_server(settings).start()
    except auth.InsecureBind as exc:
        log.error("%s", exc)
        raise SystemExit(f"razorserve: {exc}") from None
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: threading.Thread(target=server.stop, daemon=True).start())
    server.wait()
    server.stop()  # waits for a signal-driven stop to finish spilling
    raise SystemExit(exit_status(server.shutdown_counts))


def exit_status(counts: dict) -> int:
    """0: every session reached Redis; 75 (EX_TEMPFAIL): some were saved to the local spill directory and are
    uploaded at the next start; 1: some were lost (Redis down and no local spill directory)."""
    return 1 if counts["lost"] else (75 if counts["saved_locally"] else 0)


if __name__ == "__main__":
    main()
