"""One settings object for the service, the worker and the local stack.

Every field has a default, an environment variable (``RAZOR_<NAME>``, except ``REDIS_URL``
which is also accepted under its common name) and validation; README.md has the table.
"""
from __future__ import annotations

from functools import lru_cache
from typing import Literal
from urllib.parse import quote, urlsplit, urlunsplit

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="RAZOR_", extra="ignore", frozen=True)

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

    # --- gRPC server ----------------------------------------------------------------
    host: str = Field("127.0.0.1", description="address the gRPC server binds")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 = pick a free one)")
    max_workers: int = Field(16, ge=1, description="gRPC handler threads")
    grace_s: float = Field(10.0, ge=0, description="seconds in-flight streams get on shutdown")
    drain_delay_s: float = Field(
        0.0, ge=0, description="seconds a stopping service keeps serving with health NOT_SERVING, so polling "
                               "load balancers take it out before it refuses connections")
    auth_token: str = Field("", description="bearer token required on every call when set")
    tls_cert: str = Field("", description="PEM certificate file; TLS is on when cert and key are set")
    tls_key: str = Field("", description="PEM private key file")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus metrics port (0 = off)")
    log_level: str = Field("INFO", description="logging level")
    log_json: bool = Field(True, description="one JSON object per log line")

    # --- sessions ---------------------------------------------------------------------
    kv_budget_bytes: int = Field(512 * 2**20, ge=0, description="device bytes for resident session caches")
    session_ttl_s: int = Field(7 * 86400, ge=1, description="TTL of spilled sessions in Redis")
    max_sessions: int = Field(10_000, ge=1, description="sessions known to one service")
    max_running: int = Field(32, ge=1, description="turns decoding together in one batch")
    step_tokens: int = Field(256, ge=2, description="tokens per model step: one per decoding turn + prefill chunks")
    max_input_chars: int = Field(0, ge=0, description="longest prompt or turn in characters (0 = 32 per context token)")

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
    profile_heartbeat_s: float = Field(5.0, gt=0, description="how often a running profiling job reports it is alive")
    profile_visibility_timeout_s: int = Field(
        0, ge=0, description="seconds before the broker redelivers a job whose worker died (0 = time limit + 300)")

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, v: str) -> str:
        v = v.upper()
        if v not in {"DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"}:
            raise ValueError(f"unknown log level {v!r}; use DEBUG, INFO, WARNING, ERROR or CRITICAL")
        return v

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

    def redis_dsn(self) -> str:
        """`redis_url` with `redis_password` in it (the password setting overrides one in the URL)."""
        if not self.redis_password or self.redis_url.startswith("unix://"):
            return self.redis_url
        parts = urlsplit(self.redis_url)
        host = parts.netloc.rsplit("@", 1)[-1]
        return urlunsplit(parts._replace(netloc=f":{quote(self.redis_password, safe='')}@{host}"))

    @model_validator(mode="after")
    def _step_room(self) -> "Settings":
        if self.step_tokens <= self.max_running:
            raise ValueError(f"RAZOR_STEP_TOKENS ({self.step_tokens}) must exceed RAZOR_MAX_RUNNING "
                             f"({self.max_running}): a step needs room for prefill after every decode token")
        return self

    @model_validator(mode="after")
    def _tls_pair(self) -> "Settings":
        if bool(self.tls_cert) != bool(self.tls_key):
            raise ValueError("set both RAZOR_TLS_CERT and RAZOR_TLS_KEY, or neither")
        return self


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()
