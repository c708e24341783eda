"""One settings object for the service, the worker and the local stack.

Every field has a default, an environment variable (``RAZOR_<NAME>``, except ``REDIS_URL``
which is also accepted under its common name) and validation; README.md has the table.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import AliasChoices, Field, PrivateAttr, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


HANDLER_HEADROOM = 8          # handler threads beyond RAZOR_MAX_RUNNING, for calls that are not turns
DEFAULT_TENANT = "default"   # the tenant of RAZOR_AUTH_TOKEN
# Tenant names go into logs and Redis headers: keep them plain.
_TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class Settings(BaseSettings):
    # hide_input_in_errors: a settings error must not print API keys or the Redis password to the log.
    model_config = SettingsConfigDict(env_prefix="RAZOR_", extra="ignore", frozen=True, hide_input_in_errors=True)
    _tenant_of_key: dict[str, str] = PrivateAttr(default_factory=dict)   # API key -> tenant, parsed at start

    # --- model and engine -------------------------------------------------------------
    model: str = Field("", description="model reference: empty = embedded SmolLM2, a HF directory or a .gguf file")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="where model and resident caches live")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="weights and KV cache dtype: auto = bfloat16 on CUDA, float32 on CPU")
    torch_threads: int = Field(0, ge=0, description="torch CPU threads per process (0 = torch's default)")
    head_map_path: str = Field("", description="JSON head map to activate at start when Redis has none")
    sink: int = Field(4, ge=0, description="sink tokens kept by local heads (paper N0)")
    min_window: int = Field(256, ge=1, description="smallest recent window of local heads (paper S0)")
    ratio: float = Field(5.0, ge=1.0, description="compression ratio C: local window = max(S0, N/C)")
    retrieval_bits: int = Field(
        16, description="retrieval heads' key storage in maps profiled here: 16 = the model's dtype, 8 = int8 + "
                        "scales, 6 = four in three bytes + scales (with RAZOR_RETRIEVAL_VALUE_BITS=4)")
    retrieval_value_bits: int = Field(
        0, description="their values' bits in maps profiled here: 0 = as retrieval_bits, 4 = two a byte (with "
                       "RAZOR_RETRIEVAL_BITS=8 or 6)")

    # --- gRPC server ----------------------------------------------------------------
    host: str = Field("127.0.0.1", description="address the gRPC server binds")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = pick a free one)")
    max_workers: int = Field(64, ge=1, description="gRPC handler threads (at least RAZOR_MAX_RUNNING + "
                             "RAZOR_MAX_WAITING + 8: each streaming turn holds one for its whole life)")
    grace_s: float = Field(10.0, ge=0, description="seconds in-flight streams get on shutdown")
    drain_delay_s: float = Field(
        0.0, ge=0, description="seconds a stopping service keeps serving with health NOT_SERVING, so polling "
                               "load balancers take it out before it refuses connections")
    auth_token: str = Field("", description="one API key, of tenant \"default\" (kept from before tenants)")
    api_keys: str = Field("", description="comma-separated tenant:key pairs; any one of them authenticates a call")
    api_keys_file: str = Field("", description="file of tenant:key lines (# starts a comment line)")
    allow_unauthenticated: bool = Field(False, description="serve without API keys on a non-loopback host")
    tls_cert: str = Field("", description="PEM certificate file; TLS is on when cert and key are set")
    tls_key: str = Field("", description="PEM private key file")
    tls_ca_cert: str = Field("", description="PEM file of the CA that signed RAZOR_TLS_CERT, which the service's own "
                             "health probes trust (empty: the certificate itself, as when it is self-signed)")
    tls_server_name: str = Field("", description="a name RAZOR_TLS_CERT is issued for, which the health probes check "
                                 "on 127.0.0.1 (empty: the certificate must name 127.0.0.1)")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus metrics port (0 = off)")
    log_level: str = Field("INFO", description="logging level")
    log_json: bool = Field(True, description="one JSON object per log line")

    # --- sessions ---------------------------------------------------------------------
    kv_budget_bytes: int = Field(512 * 2**20, ge=0, description="device bytes for resident session caches")
    session_ttl_s: int = Field(7 * 86400, ge=1, description="default and largest TTL of every session, counted "
                               "from its last use, resident or spilled")
    max_sessions: int = Field(10_000, ge=1, description="sessions known to one service")
    max_running: int = Field(32, ge=1, description="turns decoding together in one batch (at most "
                             "RAZOR_MAX_WORKERS - RAZOR_MAX_WAITING - 8: raise them together)")
    max_waiting: int = Field(0, ge=0, description="turns waiting for a batch slot; more are refused with "
                             "RESOURCE_EXHAUSTED (0 = what the handler threads leave: RAZOR_MAX_WORKERS - "
                             "RAZOR_MAX_RUNNING - 8)")
    step_tokens: int = Field(256, ge=2, description="tokens per model step: one per decoding turn + prefill chunks")
    max_input_chars: int = Field(0, ge=0, description="longest prompt or turn in characters (0 = 32 per context token)")
    max_import_bytes: int = Field(2**30, ge=1, description="largest session export ImportSession accepts, in bytes")
    spill_key: SecretStr = Field(SecretStr(""), description=(
        "secret shared by every replica: spilled sessions carry an HMAC-SHA256 under it (empty = SHA-256 only)"))

    # --- replicas: session ownership through Redis ------------------------------------------
    replica_id: str = Field("", max_length=64, pattern=r"^[A-Za-z0-9_.-]*$",
                            description="this replica's name in session leases (empty = a random one per process)")
    lease_ttl_s: float = Field(10.0, gt=0, le=3600,
                               description="session lease TTL; a dead replica's sessions free up after it")
    max_pinned_sessions: int = Field(16, ge=0, description="sessions one replica keeps pinned resident (UpdateSession / pin_session)")
    handoff_timeout_s: float = Field(10.0, ge=0, description="how long a request waits for another replica to hand a session over")
    local_spill_dir: str = Field("~/.cache/razorserve/spill",
                                 description="where sessions go at shutdown while Redis is unreachable (empty = nowhere)")
    sessions_redis_url: str = Field("", description="Redis (or a Redis Cluster node) for sessions (empty = RAZOR_REDIS_URL)")
    sessions_redis_cluster: bool = Field(False, description="sessions_redis_url names a Redis Cluster")

    # --- Redis and the profiling worker ---------------------------------------------------
    redis_url: str = Field(
        "redis://127.0.0.1:6379/0",
        validation_alias=AliasChoices("RAZOR_REDIS_URL", "REDIS_URL"),
        description="Redis for spilled sessions, head maps, Celery broker and results",
    )
    redis_password: str = Field("", description="Redis password (overrides one in the URL)")
    profile_time_limit_s: int = Field(3600, ge=10, description="hard time limit of one profiling job")
    profile_max_retries: int = Field(2, ge=0, description="retries of a profiling job whose worker was lost")
    calibrate: bool = Field(True, description="run head-set calibration in profiling jobs")
    calibration_families: str = Field(
        "", description="comma-separated task families calibration measures (empty = all: digits, word, multi, "
                        "turn, edge): the retrieval skills your traffic needs")
    calibration_lengths: str = Field(
        "", description="comma-separated document lengths in tokens calibration measures (empty = 400,1000,2000): "
                        "the lengths you serve")
    profile_heartbeat_s: float = Field(5.0, gt=0, description="how often a running profiling job reports it is alive")
    profile_visibility_timeout_s: int = Field(
        0, ge=0, description="seconds before the broker redelivers a job whose worker died (0 = time limit + 300)")
    profile_lease_s: float = Field(
        30.0, gt=0, description="a running job without a heartbeat for this long is re-queued by a live worker")
    profile_models_dir: str = Field("", description="directory of models a profiling job may name (relative names)")
    profile_allowed_models: str = Field("", description="comma-separated model refs a profiling job may name verbatim")

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, v: str) -> str:
        v = v.upper()
        if v not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"unknown log level {v!r}; use DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return v

    @field_validator("retrieval_bits")
    @classmethod
    def _known_bits(cls, v):
        if v not in (16, 8, 6):
            raise ValueError(f"RAZOR_RETRIEVAL_BITS {v!r} is not supported; use 16 (the model's dtype), 8 (int8) "
                             f"or 6 (with RAZOR_RETRIEVAL_VALUE_BITS=4)")
        return v

    @field_validator("calibration_families")
    @classmethod
    def _family_names(cls, v: str) -> str:
        # The names themselves are checked where the engine is imported (worker/tasks.py, at start).
        if not all(re.fullmatch(r"[a-z][a-z-]*", f) for f in _items(v)):
            raise ValueError(f"RAZOR_CALIBRATION_FAMILIES {v!r} must be comma-separated family names, e.g. digits,word")
        return v

    @field_validator("calibration_lengths")
    @classmethod
    def _token_lengths(cls, v: str) -> str:
        if not all(x.isdigit() and int(x) >= 32 for x in _items(v)):
            raise ValueError(f"RAZOR_CALIBRATION_LENGTHS {v!r} must be comma-separated token counts of at least 32")
        return v

    def calibration_overrides(self) -> dict:
        """CalibrationParams fields these settings set (none when left empty: the engine's defaults)."""
        families, lengths = _items(self.calibration_families), _items(self.calibration_lengths)
        return {**({"families": tuple(families)} if families else {}),
                **({"lengths": tuple(map(int, lengths))} if lengths else {})}

    @field_validator("dtype", mode="before")
    @classmethod
    def _known_dtype(cls, v):
        name = v.strip().lower() if isinstance(v, str) else v
        if name not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"RAZOR_DTYPE {v!r} is not supported; use auto, float32, bfloat16 or float16")
        return name

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(f"REDIS_URL {v!r} must start with redis://, rediss:// or unix://")
        return v

    @field_validator("spill_key")
    @classmethod
    def _spill_key_length(cls, v: SecretStr) -> SecretStr:
        if 0 < len(v.get_secret_value()) < 16:
            raise ValueError("RAZOR_SPILL_KEY must be at least 16 characters (e.g. `openssl rand -hex 32`), or empty")
        return v

    def spill_key_bytes(self) -> bytes:
        """The spill MAC key (b"" when none is set)."""
        return self.spill_key.get_secret_value().encode()

    def redis_dsn(self) -> str:
        """`redis_url` with `redis_password` in it (the password setting overrides one in the URL)."""
        if not self.redis_password or self.redis_url.startswith("unix://"):
            return self.redis_url
        parts = urlsplit(self.redis_url)
        host = parts.netloc.rsplit("@", 1)[-1]
        return urlunsplit(parts._replace(netloc=f":{quote(self.redis_password, safe='')}@{host}"))

    @model_validator(mode="after")
    def _value_bits(self) -> "Settings":
        pair = (self.retrieval_bits, self.retrieval_value_bits or self.retrieval_bits)
        if pair not in ((16, 16), (8, 8), (8, 4), (6, 4)):   # kv_quant.STORAGES (settings import no torch)
            raise ValueError(f"RAZOR_RETRIEVAL_VALUE_BITS {self.retrieval_value_bits} does not go with "
                             f"RAZOR_RETRIEVAL_BITS {self.retrieval_bits}: use 0 (as RAZOR_RETRIEVAL_BITS) with 16 "
                             f"or 8, or 4 with RAZOR_RETRIEVAL_BITS=8 or 6")
        return self

    @model_validator(mode="after")
    def _step_room(self) -> "Settings":
        if self.step_tokens <= self.max_running:
            raise ValueError(f"RAZOR_STEP_TOKENS ({self.step_tokens}) must exceed RAZOR_MAX_RUNNING "
                             f"({self.max_running}): a step needs room for prefill after every decode token")
        return self

    @model_validator(mode="after")
    def _handler_room(self) -> "Settings":
        # A Generate or ContinueSession stream holds a handler thread while its turn waits and runs: with fewer
        # threads than turns, health checks, Abort and listings would queue behind the streams.
        if self.max_workers < self.max_running + HANDLER_HEADROOM:
            raise ValueError(f"RAZOR_MAX_WORKERS ({self.max_workers}) must be at least RAZOR_MAX_RUNNING "
                             f"({self.max_running}) + {HANDLER_HEADROOM}: each streaming turn holds a gRPC handler "
                             "thread, and health checks, Abort and listings need threads beside them")
        if self.max_waiting > self._threads_for_waiting():
            raise ValueError(f"RAZOR_MAX_WAITING ({self.max_waiting}) leaves too few handler threads: a waiting turn "
                             f"holds one too, so RAZOR_MAX_WORKERS ({self.max_workers}) must be at least "
                             f"RAZOR_MAX_RUNNING ({self.max_running}) + RAZOR_MAX_WAITING + {HANDLER_HEADROOM}; "
                             "raise RAZOR_MAX_WORKERS or leave RAZOR_MAX_WAITING at 0")
        return self

    def max_turns(self) -> int:
        """Turns one replica takes at once, running and waiting; more are refused rather than queued where
        health checks would wait behind them."""
        return self.max_running + (self.max_waiting or self._threads_for_waiting())

    def _threads_for_waiting(self) -> int:
        """Handler threads left for waiting turns: those neither running turns nor kept for other calls hold."""
        return self.max_workers - self.max_running - HANDLER_HEADROOM

    @model_validator(mode="after")
    def _api_keys_table(self) -> "Settings":
        self._tenant_of_key = _tenant_of_key(self._api_key_entries())
        return self

    def _api_key_entries(self) -> list[tuple[str, str, str]]:
        """(tenant, key, where it was configured) for every configured API key."""
        entries = [(DEFAULT_TENANT, self.auth_token, "RAZOR_AUTH_TOKEN")] if self.auth_token else []
        for n, item in enumerate(self.api_keys.split(","), 1):
            if item.strip():
                entries.append(_parse_api_key(item, f"RAZOR_API_KEYS entry {n}"))
        if self.api_keys_file:
            entries += _read_api_keys_file(self.api_keys_file)
        return entries

    def api_key_tenants(self) -> dict[str, str]:
        """API key -> tenant name; empty when auth is off."""
        return dict(self._tenant_of_key)

    @model_validator(mode="after")
    def _lease_room(self) -> "Settings":
        if self.profile_lease_s < 2 * self.profile_heartbeat_s:
            raise ValueError(f"RAZOR_PROFILE_LEASE_S ({self.profile_lease_s}) must be at least twice "
                             f"RAZOR_PROFILE_HEARTBEAT_S ({self.profile_heartbeat_s}): one late heartbeat "
                             f"must not make a live job look dead")
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> "Settings":
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("set both RAZOR_TLS_CERT and RAZOR_TLS_KEY, or neither")
        if (self.tls_ca_cert or self.tls_server_name) and not self.tls_cert:
            raise ValueError("RAZOR_TLS_CA_CERT and RAZOR_TLS_SERVER_NAME describe RAZOR_TLS_CERT: set the "
                             "certificate and key too, or leave them empty")
        return self


def _items(csv: str) -> list[str]:
    """The non-empty, stripped items of a comma-separated setting."""
    return [x.strip() for x in csv.split(",") if x.strip()]


def _parse_api_key(item: str, where: str) -> tuple[str, str, str]:
    """(tenant, key, where) from one ``tenant:key`` item. Messages never repeat the key."""
    tenant, colon, key = (part.strip() for part in item.partition(":"))
    if not colon:
        raise ValueError(f"{where} has no ':'; write tenant:key")
    if not tenant or not key:
        raise ValueError(f"{where} has an empty {'tenant name' if not tenant else 'key'}; write tenant:key")
    if not _TENANT_NAME.fullmatch(tenant):
        raise ValueError(f"{where}: tenant {tenant!r} must be 1-64 letters, digits, '.', '_' or '-', "
                         "starting with a letter or digit")
    if any(c.isspace() for c in key):
        raise ValueError(f"{where}: the key of tenant {tenant!r} contains whitespace")
    return tenant, key, where


def _read_api_keys_file(path: str) -> list[tuple[str, str, str]]:
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise ValueError(f"RAZOR_API_KEYS_FILE {path!r} cannot be read ({exc}); fix the path or its permissions")
    return [_parse_api_key(line, f"RAZOR_API_KEYS_FILE {path} line {n}")
            for n, line in enumerate(lines, 1) if line.strip() and not line.lstrip().startswith("#")]


def _tenant_of_key(entries: list[tuple[str, str, str]]) -> dict[str, str]:
    """API key -> tenant. A tenant may have several keys (rotation); a key names exactly one tenant."""
    table: dict[str, tuple[str, str]] = {}
    for tenant, key, where in entries:
        if key in table:
            raise ValueError(f"{where} repeats the key of {table[key][1]} (tenant {table[key][0]!r}); "
                             "every API key must be unique")
        table[key] = (tenant, where)
    return {key: tenant for key, (tenant, _) in table.items()}


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()
