"""The RazorServe servicer: translates proto <-> runtime calls, nothing more.

Every handler goes through ``_grpc_errors``, the one place where exceptions become status
codes, by explicit class in ``_STATUS`` (bad input -> INVALID_ARGUMENT, unknown session -> NOT_FOUND,
busy session or another model's session -> FAILED_PRECONDITION, corrupt spill -> DATA_LOSS, full
budget with Redis down -> RESOURCE_EXHAUSTED, Redis unreachable -> UNAVAILABLE, ...). Anything else,
a bare ``ValueError`` or ``KeyError`` included, is a bug: INTERNAL with an incident id in the log.
"""
from __future__ import annotations

import functools
import inspect
import logging
import threading
import uuid
from collections.abc import Iterator
from datetime import datetime

import grpc
import redis
import redis.exceptions as redis_errors
from google.protobuf.timestamp_pb2 import Timestamp

from services.api import require_generated

require_generated()  # `make proto` generates the code; say so rather than fail on a missing module
from services.api.razorserve.v1 import razorserve_pb2 as pb  # noqa: E402
from services.api.razorserve.v1 import razorserve_pb2_grpc as pb_grpc  # noqa: E402
from services.engine import SamplingParams  # noqa: E402
from services.engine.errors import InvalidRequest, SessionDamagedError, SessionMismatchError  # noqa: E402
from services.headmap_store import InvalidProfileParams  # noqa: E402
from services.model_refs import ModelRefRefused  # noqa: E402

from . import validation
from .auth import tenant_of
from .errors import (BudgetExhausted, Cancelled, InvalidArgument, NotConfigured, NotFound, Overloaded, SessionBusy,
                     SessionLost, SessionModelMismatch, SessionNotFound, ShuttingDown, StoreUnavailable)
from .profile_jobs import BrokerUnavailable
from .requests import DuplicateRequest, RequestNotFound
from .runtime import Finished, Runtime, Turn
from .spill import SpillUnavailable
from .transfer import ExportDamaged, ExportIncompatible, ImportTooLarge, messages

log = logging.getLogger(__name__)
SERVER_VERSION = "0.1.0"
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RazorServe"].full_name


Code = grpc.StatusCode
_REDIS_DOWN = "Redis cannot be reached or refused the command; retry when it is back"

# Exception class -> (status, prefix of the message). Most specific first: the first match decides.
# No row names ValueError, KeyError or another base class: an unlisted exception is a bug (INTERNAL).
_STATUS = (
    # sessions
    (SessionBusy, Code.FAILED_PRECONDITION, ""),
    (SessionModelMismatch, Code.FAILED_PRECONDITION, ""),
    (SessionMismatchError, Code.FAILED_PRECONDITION, ""),
    (SessionNotFound, Code.NOT_FOUND, ""),
    (NotFound, Code.NOT_FOUND, ""),
    (SessionLost, Code.DATA_LOSS, ""),
    (SessionDamagedError, Code.DATA_LOSS, ""),   # the service marks such a session lost first; kept for safety
    # session exports
    (ExportDamaged, Code.DATA_LOSS, ""),
    (ExportIncompatible, Code.FAILED_PRECONDITION, ""),
    (ImportTooLarge, Code.RESOURCE_EXHAUSTED, ""),
    # capacity and availability of the service and its stores
    (BudgetExhausted, Code.RESOURCE_EXHAUSTED, ""),
    (Overloaded, Code.RESOURCE_EXHAUSTED, ""),
    (StoreUnavailable, Code.UNAVAILABLE, ""),
    (SpillUnavailable, Code.UNAVAILABLE, ""),
    (ShuttingDown, Code.UNAVAILABLE, ""),
    (NotConfigured, Code.UNAVAILABLE, ""),
    (BrokerUnavailable, Code.UNAVAILABLE, ""),
    # Redis errors that reach a handler unwrapped (head maps, profiling jobs, the session directory)
    (redis_errors.OutOfMemoryError, Code.RESOURCE_EXHAUSTED, "Redis is out of memory: "),
    (redis_errors.WatchError, Code.ABORTED, "a concurrent change won in Redis, retry: "),
    (redis_errors.ConnectionError, Code.UNAVAILABLE, f"{_REDIS_DOWN}: "),    # + authentication, loading
    (redis_errors.TimeoutError, Code.UNAVAILABLE, f"{_REDIS_DOWN}: "),
    (redis_errors.ReadOnlyError, Code.UNAVAILABLE, f"{_REDIS_DOWN} (a read-only replica answered): "),
    (redis_errors.ClusterDownError, Code.UNAVAILABLE, f"{_REDIS_DOWN} (cluster down): "),
    (redis_errors.TryAgainError, Code.UNAVAILABLE, f"{_REDIS_DOWN} (cluster resharding): "),
    (redis_errors.NoPermissionError, Code.UNAVAILABLE, f"{_REDIS_DOWN} (its ACL refuses this service): "),
    (redis_errors.InvalidResponse, Code.UNAVAILABLE, f"{_REDIS_DOWN} (unreadable reply): "),
    # requests
    (RequestNotFound, Code.NOT_FOUND, ""),
    (DuplicateRequest, Code.ALREADY_EXISTS, ""),
    (Cancelled, Code.CANCELLED, ""),
    (InvalidArgument, Code.INVALID_ARGUMENT, ""),
    (InvalidRequest, Code.INVALID_ARGUMENT, ""),
    (InvalidProfileParams, Code.INVALID_ARGUMENT, ""),
    (ModelRefRefused, Code.INVALID_ARGUMENT, ""),
)


def status_for(exc: BaseException) -> tuple[grpc.StatusCode, str]:
    for cls, code, prefix in _STATUS:
        if isinstance(exc, cls):
            return code, prefix + str(exc)
    incident = uuid.uuid4().hex[:12]
    log.exception("internal error %s", incident, exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"internal error (incident {incident} in the server log)"


def _grpc_errors(handler):
    """Wrap a unary or server-streaming handler so exceptions abort with the mapped status."""
    if inspect.isgeneratorfunction(handler):
        @functools.wraps(handler)
        def streaming(self, request, context):
            try:
                yield from handler(self, request, context)
            except Exception as exc:  # noqa: BLE001 - mapped, never swallowed
                context.abort(*status_for(exc))
        return streaming

    @functools.wraps(handler)
    def unary(self, request, context):
        try:
            return handler(self, request, context)
        except Exception as exc:  # noqa: BLE001
            context.abort(*status_for(exc))
    return unary


class RazorServeServicer(pb_grpc.RazorServeServicer):
    def __init__(self, runtime: Runtime, jobs=None, head_map_store=None):
        self.runtime, self.jobs, self.head_map_store = runtime, jobs, head_map_store

    # ---- generation -------------------------------------------------------------------------
    @_grpc_errors
    def Generate(self, request: pb.GenerateRequest, context):
        validation.check_generate(request, self.runtime.limits)
        keep = request.keep_session if request.HasField("keep_session") else True
        turn = Turn(params=sampling_params(request), keep_session=keep, tenant=tenant_of(context),
                    session_ttl_s=request.session_ttl_s, pin_session=request.pin_session,
                    request_id=request.request_id, **_input(request, "prompt"))
        yield from self._stream(turn, context)

    @_grpc_errors
    def ContinueSession(self, request: pb.ContinueSessionRequest, context):
        validation.check_continue(request, self.runtime.limits)
        turn = Turn(params=sampling_params(request), session_id=request.session_id, tenant=tenant_of(context),
                    request_id=request.request_id, **_input(request, "text"))
        yield from self._stream(turn, context)

    def _stream(self, turn: Turn, context):
        cancel = threading.Event()
        context.add_callback(cancel.set)  # fires on client cancel, deadline and server stop
        try:
            stream = self.runtime.start_turn(turn, cancel)
            for item in stream:
                yield _response(stream.session_id, stream.request_id, item)
        finally:
            cancel.set()  # the stream is gone: stop generating within one step

    # ---- sessions ---------------------------------------------------------------------------
    @_grpc_errors
    def GetSession(self, request: pb.GetSessionRequest, context):
        validation.check_session_id(request.session_id)
        return session_pb(self.runtime.store.info(request.session_id, tenant_of(context)))

    @_grpc_errors
    def ListSessions(self, request: pb.ListSessionsRequest, context):
        validation.check_list_sessions(request)
        page, next_token = self.runtime.list_sessions(request.page_size, request.page_token, tenant_of(context))
        return pb.ListSessionsResponse(sessions=[session_pb(e) for e in page], next_page_token=next_token)

    @_grpc_errors
    def DeleteSession(self, request: pb.DeleteSessionRequest, context):
        validation.check_session_id(request.session_id)
        sid = request.session_id
        if not self.runtime.store.delete(sid, tenant_of(context)):
            raise SessionNotFound(f"no session {sid} to delete")
        return pb.DeleteSessionResponse(deleted=True)

    @_grpc_errors
    def UpdateSession(self, request: pb.UpdateSessionRequest, context):
        ttl = request.ttl_s if request.HasField("ttl_s") else None
        if ttl == 0:
            raise InvalidArgument("ttl_s must be at least 1 second; leave it unset to keep the session's TTL")
        pinned = request.pinned if request.HasField("pinned") else None
        validation.check_session_id(request.session_id)
        entry = self.runtime.store.update(request.session_id, tenant_of(context), ttl_s=ttl, pin=pinned)
        return session_pb(entry)

    @_grpc_errors
    def GetLoad(self, request, context):
        return pb.Load(**self.runtime.load())

    @_grpc_errors
    def GetServerInfo(self, request, context):
        return server_info_pb(self.runtime)

    # ---- profiling (delegated) -----------------------------------------------------------------
    @_grpc_errors
    def ProfileModel(self, request: pb.ProfileModelRequest, context):
        params = {field.name: value for field, value in request.params.ListFields()}
        calibrate = {"calibrate": params.pop("calibrate")} if "calibrate" in params else {}
        job_id = self._jobs().submit(request.model_ref, params, **calibrate)   # refusals: rows of _STATUS
        return pb.ProfileJob(job_id=job_id, state=pb.JOB_STATE_QUEUED)

    @_grpc_errors
    def GetProfileJob(self, request: pb.GetProfileJobRequest, context):
        validation.check_job_id(request.job_id)
        try:
            status = self._jobs().status(request.job_id)
        except KeyError:   # ProfileJobs.status's documented "no such job"
            raise NotFound(f"no profiling job {request.job_id}; check the id ProfileModel returned") from None
        return profile_job_pb(request.job_id, status)

    @_grpc_errors
    def ListHeadMaps(self, request: pb.ListHeadMapsRequest, context):
        validation.check_fingerprint_id(request.fingerprint_id)
        if self.head_map_store is None:
            raise NotConfigured("head-map store not configured")
        own = self.runtime.loaded.fingerprint
        fingerprint = own if request.fingerprint_id in ("", own.id) else request.fingerprint_id
        try:
            versions = self.head_map_store.list_versions(fingerprint)
        except redis.RedisError as e:
            raise StoreUnavailable(f"head maps are unavailable: cannot reach Redis ({type(e).__name__}); "
                                   f"retry when it is back") from e
        return pb.ListHeadMapsResponse(versions=[head_map_version_pb(v) for v in versions])

    def _jobs(self):
        if self.jobs is None:
            raise NotConfigured("profiling worker not configured")
        return self.jobs

    # ---- request ids (issue 16, item 1) ------------------------------------------------------
    @_grpc_errors
    def Abort(self, request: pb.AbortRequest, context):
        self.runtime.abort(tenant_of(context), request.request_id)
        return pb.AbortResponse(found=True)
    # ---- export, import and fork ---------------------------------------------------------------
    @_grpc_errors
    def ExportSession(self, request: pb.ExportSessionRequest, context):
        validation.check_session_id(request.session_id)
        parts = self.runtime.export_session(request.session_id, tenant_of(context))
        total = sum(len(part) for part in parts)
        for i, piece in enumerate(messages(parts)):
            yield pb.ExportSessionResponse(chunk=piece, total_bytes=total if i == 0 else 0)

    @_grpc_errors
    def ImportSession(self, request_iterator, context):
        options, pieces = _import_parts(request_iterator, context)
        tenant = tenant_of(context)
        sid, meta = self.runtime.import_session(pieces, tenant, options.size_bytes)
        return pb.ImportSessionResponse(session=session_pb(self.runtime.store.info(sid, tenant)),
                                        source_session_id=meta["session_id"])

    @_grpc_errors
    def ForkSession(self, request: pb.ForkSessionRequest, context):
        tenant = tenant_of(context)
        validation.check_session_id(request.session_id)
        sid = self.runtime.fork_session(request.session_id, tenant)
        return pb.ForkSessionResponse(session=session_pb(self.runtime.store.info(sid, tenant)))


# ---- proto -> domain --------------------------------------------------------------------------
def sampling_params(request) -> SamplingParams:
    s = request.sampling
    kwargs = {name: getattr(s, name) for name in ("temperature", "top_p", "top_k", "seed") if s.HasField(name)}
    if request.HasField("max_new_tokens"):
        kwargs["max_new_tokens"] = request.max_new_tokens
    return SamplingParams(**kwargs, stop_token_ids=tuple(request.stop.stop_token_ids),
                          stop_strings=tuple(request.stop.stop_strings), logprobs=request.logprobs,
                          top_logprobs=request.top_logprobs)


def _input(request, text_field: str) -> dict:
    if request.WhichOneof("input") == "chat":
        return {"messages": tuple({"role": m.role, "content": m.content} for m in request.chat.messages)}
    return {"text": getattr(request, text_field)}


def _import_parts(requests, context) -> tuple[pb.ImportOptions, Iterator[bytes]]:
    """The options of an ImportSession stream (its first message) and the export's bytes that follow."""
    try:
        first = next(requests, None)
    except grpc.RpcError:   # cancelled before its first message
        raise _import_cancelled() from None
    if first is None or first.WhichOneof("part") != "options":
        raise InvalidArgument("the first ImportSession message must carry `options` (it may be empty); then send "
                              "the export's bytes as `chunk`s")

    def pieces() -> Iterator[bytes]:
        try:
            for message in requests:
                if message.WhichOneof("part") != "chunk":
                    raise InvalidArgument("after the first ImportSession message, send only `chunk`s of the export")
                yield message.chunk
        except grpc.RpcError:   # what grpc's request iterator may raise once the client has cancelled the call
            raise _import_cancelled() from None
        if not context.is_active():   # or it just ends: a cancelled stream, not a damaged export
            raise _import_cancelled()
    return first.options, pieces()


def _import_cancelled() -> Cancelled:
    return Cancelled("the client cancelled ImportSession before the export's last chunk; nothing was imported")


# ---- domain -> proto --------------------------------------------------------------------------
_FINISH = {"length": pb.FINISH_REASON_LENGTH, "stop": pb.FINISH_REASON_STOP, "cancelled": pb.FINISH_REASON_CANCELLED}
_LOCATION = {"device": pb.SESSION_LOCATION_DEVICE, "redis": pb.SESSION_LOCATION_REDIS, "lost": pb.SESSION_LOCATION_LOST}
_JOB_STATE = {"queued": pb.JOB_STATE_QUEUED, "running": pb.JOB_STATE_RUNNING,
              "succeeded": pb.JOB_STATE_SUCCEEDED, "failed": pb.JOB_STATE_FAILED}


def _response(session_id: str, request_id: str, item) -> pb.GenerateResponse:
    if isinstance(item, Finished):
        r = item.result
        usage = pb.Usage(prompt_tokens=r.prompt_tokens, generated_tokens=r.generated_tokens,
                         cached_tokens=r.cached_tokens)
        completion = pb.Completion(finish_reason=_FINISH[r.finish_reason], usage=usage, text=r.text)
        return pb.GenerateResponse(session_id=session_id, request_id=request_id, completion=completion)
    chunk = pb.TokenChunk(text=item.text, token_ids=[item.token_id],
                          logprobs=[] if item.logprob is None else [item.logprob],
                          top_logprobs=[_top_logprobs_pb(item.top_logprobs)] if item.top_logprobs else [])
    return pb.GenerateResponse(session_id=session_id, request_id=request_id, chunk=chunk)


def _top_logprobs_pb(candidates) -> pb.TopLogprobs:
    return pb.TopLogprobs(candidates=[pb.TopLogprob(token_id=t, logprob=lp, text=text) for t, lp, text in candidates])


def timestamp(value) -> Timestamp | None:
    """A Timestamp from epoch seconds or an ISO-8601 string (None when unset)."""
    if value in (None, "", 0, 0.0):
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value).timestamp()
    ts = Timestamp()
    ts.FromNanoseconds(int(float(value) * 1e9))
    return ts


def session_pb(e) -> pb.Session:
    return pb.Session(session_id=e.session_id, length=e.length, kv_bytes=e.stored_nbytes, kv_bytes_full=e.full_nbytes,
                      kv_bytes_allocated=e.nbytes,
                      location=_LOCATION[e.location], head_map_version=e.head_map_version,
                      model_fingerprint=e.fingerprint_id, created_at=timestamp(e.created_at),
                      last_used_at=timestamp(e.last_used), busy=e.busy, lost_reason=e.lost_reason, owner=e.owner,
                      expires_at=timestamp(e.last_used + e.ttl_s if e.ttl_s else 0), ttl_s=e.ttl_s,
                      pinned=e.keep_resident)


def server_info_pb(runtime: Runtime) -> pb.ServerInfo:
    loaded, hm = runtime.loaded, runtime.head_maps.active
    resident_bytes, resident, spilled = runtime.store.usage()
    c = hm.compression
    return pb.ServerInfo(
        model_ref=loaded.ref, fingerprint=pb.ModelFingerprint(id=loaded.fingerprint.id, **loaded.fingerprint.to_dict()),
        device=str(loaded.device), max_context=loaded.max_context, server_version=SERVER_VERSION,
        head_map=pb.HeadMapInfo(version=hm.version, method=hm.method, kv_fraction=hm.kv_fraction,
                                retrieval_q_heads=len(hm.retrieval_q_heads),
                                compression=pb.CompressionParams(sink=c.sink, min_window=c.min_window, ratio=c.ratio,
                                                                 retrieval_bits=c.retrieval_bits,
                                                                 retrieval_value_bits=c.value_bits,
                                                                 local_bits=c.local_bits,
                                                                 local_value_bits=c.local_storage_bits[1],
                                                                 recent_rows=c.recent_rows,
                                                                 local_recent_rows=c.recent[1])),
        memory=pb.MemoryInfo(kv_budget_bytes=runtime.store.budget_bytes, kv_resident_bytes=resident_bytes,
                             resident_sessions=resident, spilled_sessions=spilled,
                             kv_bytes_per_token_full=runtime.full_bytes_per_token,
                             redis_reachable=runtime.store.spill.reachable()),
    )


def profile_job_pb(job_id: str, status: dict) -> pb.ProfileJob:
    return pb.ProfileJob(
        job_id=job_id, state=_JOB_STATE.get(status.get("state"), pb.JOB_STATE_UNSPECIFIED),
        done=int(status.get("done") or 0), total=int(status.get("total") or 0), stage=status.get("stage") or "",
        timings={k: float(v) for k, v in (status.get("timings") or {}).items()},
        head_map_version=status.get("head_map_version") or "", error=status.get("error") or "",
        activation=status.get("activation") or "")


def head_map_version_pb(v: dict) -> pb.HeadMapVersion:
    return pb.HeadMapVersion(version=v["version"], created_at=timestamp(v.get("created_at")),
                             active=bool(v.get("active")), kv_fraction=float(v.get("kv_fraction") or 0.0),
                             refused=bool(v.get("refused")), refused_reason=v.get("refused_reason") or "")
