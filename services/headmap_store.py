"""HeadMapStore: the Redis side of head maps, shared by the profiling worker and the service.

Keys (one model fingerprint ``fp``, one content-hash ``version``):

    razor:headmap:{fp}:{version}          the map's JSON (written once: SET NX)
    razor:headmap:{fp}:{version}:png      its heatmap PNG (raw bytes)
    razor:headmaps:{fp}:versions          sorted set version -> created_at (publication order)
    razor:headmaps:{fp}:info              hash version -> {"created_at", "kv_fraction"} as JSON
    razor:headmaps:{fp}:active            the active version
    razor:headmaps:{fp}:active_by         hash {"order", "job", "at"}: what set the active pointer; "order" is the
                                          submission time of the job that set it (or the time of an explicit
                                          `activate`), so an older job's map never replaces a newer one's;
                                          every such time is Redis's clock (`redis_time`), one for all hosts
    razor:headmaps:{fp}:params:{digest}   version produced by one set of profiling parameters
    razor:headmaps:{fp}:refused           hash version -> {"reason", "at"} as JSON: active pointers a
                                          service could not load (cleared when one later loads)

Activation publishes ``{"fingerprint": fp, "version": v}`` on channel ``razor:headmaps``. A profiling job
activates with ``activate_if_newer`` (one Lua script: compare its order with ``active_by``, then move the pointer
and notify), so maps go live in the order their jobs were submitted, not the order they finished; ``activate``
is the explicit, unconditional path.
Only JSON and raw PNG bytes are stored; nothing is ever pickled. Every map read back is validated
with ``HeadMap.from_json`` (raises ``HeadMapError``, a ``ValueError``).
"""
from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, fields

import redis

from services.engine import (CalibrationParams, CompressionParams, HeadMap, HeadMapError, ModelFingerprint,
                             ProfileParams)

CHANNEL = "razor:headmaps"
CALIBRATION_TARGETS = ("max_accuracy_drop", "max_kl")   # the CalibrationParams a job may set
# Upper bounds of the profiling sizes a job may ask for: profiling cost grows with each (and with the
# square of seq_len x repeats), so one request must not occupy a worker for hours or exhaust its memory.
PROFILE_LIMITS = {"seq_len": 8192, "repeats": 16, "n_samples": 32}
MAX_PROFILE_TOKENS = 32768   # seq_len x repeats: the longest sequence one profiling forward pass sees
MAX_SEED = 2**63 - 1


class InvalidProfileParams(ValueError):
    """A profiling job's parameters are unknown, of the wrong type, out of range or over a bound."""


def parse_profile_params(params: dict, compression: CompressionParams | None = None
                         ) -> tuple[ProfileParams, CompressionParams, dict]:
    """Split a job's flat parameter dict into profiling parameters, compression parameters and calibration
    targets.

    Keys are the fields of `ProfileParams` and `CompressionParams` plus `CALIBRATION_TARGETS`; absent ones keep
    their defaults (`compression` gives the compression defaults). InvalidProfileParams (a ValueError) names an
    unknown key, a bad value or a size over its bound."""
    if not isinstance(params, dict):
        raise InvalidProfileParams(f"profiling parameters must be a mapping, got {type(params).__name__}")
    profile_keys = {f.name for f in fields(ProfileParams)}
    compression_keys = {f.name for f in fields(CompressionParams)}
    known = profile_keys | compression_keys | set(CALIBRATION_TARGETS)
    unknown = sorted(set(params) - known)
    if unknown:
        raise InvalidProfileParams(f"unknown profiling parameter(s) {unknown}; known: {sorted(known)}")
    for key, value in params.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidProfileParams(f"profiling parameter {key} must be a number, got {value!r}")
    _check_limits(params)
    base = asdict(compression or CompressionParams())
    for group in ("retrieval", "local"):
        if f"{group}_bits" in params and f"{group}_value_bits" not in params:
            base[f"{group}_value_bits"] = None   # values follow the keys' bits a job names, not the service's default
    if "recent_rows" in params and "local_recent_rows" not in params:
        base["local_recent_rows"] = None   # likewise the local group's recent rows
    targets = {k: float(v) for k, v in params.items() if k in CALIBRATION_TARGETS}
    try:
        CalibrationParams(**targets)   # validates the targets' ranges
        return (ProfileParams(**{k: v for k, v in params.items() if k in profile_keys}),
                CompressionParams(**{**base, **{k: v for k, v in params.items() if k in compression_keys}}),
                targets)
    except TypeError as e:
        raise InvalidProfileParams(f"bad profiling parameters: {e}") from None
    except ValueError as e:   # a dataclass's own range check; its message names the field
        raise InvalidProfileParams(str(e)) from None


def _check_limits(params: dict) -> None:
    """InvalidProfileParams naming the first size over its bound (see PROFILE_LIMITS)."""
    for key, limit in PROFILE_LIMITS.items():
        if key in params and params[key] > limit:
            raise InvalidProfileParams(f"{key} must be at most {limit}, got {params[key]}")
    defaults = ProfileParams()
    seq_len, repeats = params.get("seq_len", defaults.seq_len), params.get("repeats", defaults.repeats)
    if seq_len * repeats > MAX_PROFILE_TOKENS:
        raise InvalidProfileParams(f"seq_len x repeats must be at most {MAX_PROFILE_TOKENS} tokens, got "
                                   f"{seq_len} x {repeats}; lower one of them")
    if not 0 <= params.get("seed", 0) <= MAX_SEED:
        raise InvalidProfileParams(f"seed must be within 0..{MAX_SEED}, got {params['seed']}")


def params_digest(profile: ProfileParams, compression: CompressionParams, calibrate: bool,
                  targets: dict | None = None) -> str:
    """Names one set of profiling parameters (the store remembers which version it produced)."""
    # the compression as a map records it (fields at their defaults left out): a field added later with a default
    # names the same jobs as before
    body = {"profile": asdict(profile), "compression": compression.to_dict(), "calibrate": bool(calibrate)}
    if calibrate and targets:
        body["targets"] = targets
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]


def map_key(fingerprint_id: str, version: str) -> str:
    return f"razor:headmap:{fingerprint_id}:{version}"


def png_key(fingerprint_id: str, version: str) -> str:
    return f"{map_key(fingerprint_id, version)}:png"


def _versions_key(fingerprint_id: str) -> str:
    return f"razor:headmaps:{fingerprint_id}:versions"


def _info_key(fingerprint_id: str) -> str:
    return f"razor:headmaps:{fingerprint_id}:info"


def _active_key(fingerprint_id: str) -> str:
    return f"razor:headmaps:{fingerprint_id}:active"


def _params_key(fingerprint_id: str, params_digest: str) -> str:
    return f"razor:headmaps:{fingerprint_id}:params:{params_digest}"


def _active_by_key(fingerprint_id: str) -> str:
    return f"razor:headmaps:{fingerprint_id}:active_by"


def _refused_key(fingerprint_id: str) -> str:
    return f"razor:headmaps:{fingerprint_id}:refused"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _info(raw) -> dict:
    """A version's info note; an unreadable one reads as empty (it only decorates the listing)."""
    try:
        info = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    return info if isinstance(info, dict) else {}


def _fp_id(fingerprint: ModelFingerprint | str) -> str:
    return fingerprint if isinstance(fingerprint, str) else fingerprint.id


# KEYS: the active pointer, its active_by hash. ARGV: version, order, job, now, channel, notification.
# The pointer moves (and subscribers hear of it) only when no pointer is set or this order is at least the one
# that set it. Returns {1, version, job} when it moved, else {0, the active version, the job that set it}.
_ACTIVATE_IF_NEWER = """
local current = redis.call('GET', KEYS[1])
if current then
  local by = redis.call('HGET', KEYS[2], 'order')
  if by and tonumber(by) and tonumber(by) > tonumber(ARGV[2]) then
    return {0, current, redis.call('HGET', KEYS[2], 'job') or ''}
  end
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('HSET', KEYS[2], 'order', ARGV[2], 'job', ARGV[3], 'at', ARGV[4])
redis.call('PUBLISH', ARGV[5], ARGV[6])
return {1, ARGV[1], ARGV[3]}
"""


def redis_time(client) -> float:
    """Seconds since the epoch by the Redis server's clock: the one clock every replica and worker shares, so
    the order of submissions and activations does not depend on how far apart the hosts' clocks drift."""
    seconds, microseconds = client.time()
    return seconds + microseconds / 1e6


@dataclass(frozen=True)
class Activation:
    """What `activate_if_newer` did: `activated`, else `active` is the version a newer job (`by_job`; "" for an
    explicit activation) set."""
    activated: bool
    active: str
    by_job: str


class HeadMapStore:
    """Versioned head maps per model fingerprint, one of them active; see the module docstring."""

    def __init__(self, client: redis.Redis):
        self.client = client
        self._activate_if_newer = client.register_script(_ACTIVATE_IF_NEWER)

    # --- writing (the worker) ---------------------------------------------------------------
    def publish(self, head_map: HeadMap, png_bytes: bytes | None = None,
                params_digest: str | None = None) -> str:
        """Store `head_map` (and its PNG) under its content version; idempotent. Returns the version.

        `params_digest` remembers which profiling parameters produced it (see `version_for_params`)."""
        text = head_map.to_json()
        HeadMap.from_json(text, expect=head_map.fingerprint)  # never store what a reader would refuse
        fp, version = head_map.fingerprint.id, head_map.version
        info = json.dumps({"created_at": time.time(), "kv_fraction": round(head_map.kv_fraction, 6)})
        pipe = self.client.pipeline(transaction=True)
        pipe.set(map_key(fp, version), text, nx=True)
        if png_bytes is not None:
            pipe.set(png_key(fp, version), png_bytes, nx=True)
        pipe.hsetnx(_info_key(fp), version, info)
        pipe.zadd(_versions_key(fp), {version: time.time()}, nx=True)
        if params_digest:
            pipe.set(_params_key(fp, params_digest), version)
        pipe.execute()
        return version

    def activate(self, fingerprint: ModelFingerprint | str, version: str) -> None:
        """Mark `version` active and notify subscribers, unconditionally (an explicit choice: a job submitted
        before it does not override it, see `activate_if_newer`). KeyError if it was never published,
        HeadMapError if the stored map is unusable (then nothing changes: a map no reader would load never
        becomes active)."""
        fp = _fp_id(fingerprint)
        self.get(fingerprint, version)
        now = redis_time(self.client)
        pipe = self.client.pipeline(transaction=True)
        pipe.set(_active_key(fp), version)
        pipe.hset(_active_by_key(fp), mapping={"order": repr(now), "job": "", "at": repr(now)})
        pipe.publish(CHANNEL, json.dumps({"fingerprint": fp, "version": version}))
        pipe.execute()

    def activate_if_newer(self, fingerprint: ModelFingerprint | str, version: str, order: float,
                          job: str) -> Activation:
        """Mark `version` active for job `job`, submitted at `order` (seconds since the epoch), unless the active
        pointer was set by a job submitted later (or explicitly activated later); one Lua script, so of two jobs
        finishing together the one submitted last wins whatever order they finish in. Equal orders: the later
        call wins. KeyError / HeadMapError as `activate` (then nothing changes)."""
        fp = _fp_id(fingerprint)
        self.get(fingerprint, version)
        note = json.dumps({"fingerprint": fp, "version": version})
        moved, active, by_job = self._activate_if_newer(
            keys=[_active_key(fp), _active_by_key(fp)],
            args=[version, repr(float(order)), job, repr(redis_time(self.client)), CHANNEL, note])
        return Activation(bool(moved), _text(active), _text(by_job))

    # --- reading (the service and the worker) -----------------------------------------------
    def active_version(self, fingerprint: ModelFingerprint | str) -> str | None:
        v = self.client.get(_active_key(_fp_id(fingerprint)))
        return v.decode() if isinstance(v, bytes) else v

    def active(self, fingerprint: ModelFingerprint | str) -> HeadMap | None:
        """The active map, validated; None when none is active. HeadMapError when it is unusable."""
        version = self.active_version(fingerprint)
        return None if version is None else self.get(fingerprint, version)

    def get(self, fingerprint: ModelFingerprint | str, version: str) -> HeadMap:
        """One published map, validated against `fingerprint` (a full fingerprint checks shapes
        and digest; an id checks the id). KeyError if absent, HeadMapError if unusable."""
        fp = _fp_id(fingerprint)
        text = self.client.get(map_key(fp, version))
        if text is None:
            raise KeyError(f"no head map version {version!r} for model {fp}")
        expect = None if isinstance(fingerprint, str) else fingerprint
        head_map = HeadMap.from_json(text, expect=expect)
        if head_map.fingerprint.id != fp:
            raise HeadMapError(f"head map stored for model {fp} is for model {head_map.fingerprint.id}")
        if head_map.version != version:
            raise HeadMapError(f"head map stored as version {version} says it is {head_map.version}")
        return head_map

    def png(self, fingerprint: ModelFingerprint | str, version: str) -> bytes | None:
        return self.client.get(png_key(_fp_id(fingerprint), version))

    def version_for_params(self, fingerprint: ModelFingerprint | str, params_digest: str) -> str | None:
        """The version an earlier job with the same parameters published, if it is still stored."""
        fp = _fp_id(fingerprint)
        v = self.client.get(_params_key(fp, params_digest))
        if v is None:
            return None
        v = v.decode() if isinstance(v, bytes) else v
        return v if self.client.exists(map_key(fp, v)) else None

    def versions_newest_first(self, fingerprint: ModelFingerprint | str) -> list[str]:
        """Published versions, the most recently published first."""
        return [_text(v) for v in self.client.zrevrange(_versions_key(_fp_id(fingerprint)), 0, -1)]

    # --- refused active pointers (written by services that could not load them) ----------------
    def record_refusal(self, fingerprint: ModelFingerprint | str, version: str, reason: str) -> None:
        """Remember that `version` was named active but could not be loaded, and why."""
        note = json.dumps({"reason": reason, "at": time.time()})
        self.client.hset(_refused_key(_fp_id(fingerprint)), version, note)

    def clear_refusal(self, fingerprint: ModelFingerprint | str, version: str) -> None:
        self.client.hdel(_refused_key(_fp_id(fingerprint)), version)

    def refusals(self, fingerprint: ModelFingerprint | str) -> dict[str, dict]:
        """version -> {"reason", "at"} for every refusal recorded (malformed notes read as no reason)."""
        out = {}
        for version, raw in self.client.hgetall(_refused_key(_fp_id(fingerprint))).items():
            try:
                note = json.loads(raw)
            except ValueError:
                note = None
            out[_text(version)] = note if isinstance(note, dict) else {"reason": "unreadable refusal note"}
        return out

    def list_versions(self, fingerprint: ModelFingerprint | str) -> list[dict]:
        """Published versions, oldest first, then refused versions never published:
        {version, created_at, active, kv_fraction, refused, refused_reason}.

        The active pointer's map is loaded to report it: one that fails (or that a service recorded as
        refused) is listed refused with the reason, and no version is then reported active."""
        fp = _fp_id(fingerprint)
        refused = {v: str(note.get("reason", "")) for v, note in self.refusals(fp).items()}
        active = self.active_version(fp)
        if active is not None and active not in refused:
            try:
                self.get(fingerprint, active)
            except (HeadMapError, KeyError) as e:
                refused[active] = str(e.args[0] if isinstance(e, KeyError) else e)
        versions = [_text(v) for v in self.client.zrange(_versions_key(fp), 0, -1)]
        infos = self.client.hmget(_info_key(fp), versions) if versions else []
        rows = [self._row(v, _info(raw), active, refused) for v, raw in zip(versions, infos)]
        rows += [self._row(v, {}, active, refused) for v in refused if v not in set(versions)]
        return rows

    @staticmethod
    def _row(version: str, info: dict, active: str | None, refused: dict[str, str]) -> dict:
        return {"version": version, "created_at": info.get("created_at", 0.0),
                "active": version == active and version not in refused, "kv_fraction": info.get("kv_fraction"),
                "refused": version in refused, "refused_reason": refused.get(version, "")}
