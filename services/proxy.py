"""The gRPC proxy in front of several inference replicas: nginx with session affinity.

``deploy/nginx/*.conf.template`` is the one configuration; docker-compose.yml renders it with the
nginx image's envsubst, and this module renders it the same way (only ``${PROXY_*}`` placeholders)
for ``make run ARGS="--replicas N"`` and the tests, then runs the ``nginx`` binary from the
system's packages in the foreground with every file under one runtime directory.

Affinity: nginx hashes the ``x-razor-session`` header (``services.inference.client.AFFINITY_HEADER``),
which the client library sends on every call that names a session; calls without it are balanced
round-robin.
"""
from __future__ import annotations

import re
import shutil
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
TEMPLATE_DIR = REPO_ROOT / "deploy" / "nginx"
MAIN_TEMPLATE = "nginx.conf.template"
SITE_TEMPLATE = "razorserve.conf.template"
INSTALL_HINT = "install nginx (Debian/Ubuntu: apt-get install nginx; `make test` does it when run as root)"

_PLACEHOLDER = re.compile(r"\$\{(PROXY_\w+)\}")
_TARGET = re.compile(r"^[\w.\-]+:\d{1,5}$|^\[[0-9a-fA-F:.]+\]:\d{1,5}$")


def nginx_binary() -> str | None:
    """The nginx binary on PATH, or in /usr/sbin (not on a non-root PATH on Debian)."""
    return shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")


def render(template: str, values: dict[str, str]) -> str:
    """``${PROXY_NAME}`` replaced by ``values[NAME]``, as envsubst does; nginx's own ``$variables`` stay."""
    missing = sorted({name for name in _PLACEHOLDER.findall(template) if name not in values})
    if missing:
        raise ValueError(f"no value for the proxy template placeholders {missing}")
    return _PLACEHOLDER.sub(lambda m: values[m.group(1)], template)


@dataclass(frozen=True)
class ProxyConfig:
    """One local proxy: where it listens, the replicas behind it, where its files go."""

    listen: str                   # "127.0.0.1:50051"
    upstreams: tuple[str, ...]    # replicas' "host:port"
    runtime_dir: Path             # rendered config, pid, temp files, access.log
    workers: int = 1

    def __post_init__(self) -> None:
        if not self.upstreams:
            raise ValueError("the proxy needs at least one replica")
        bad = [t for t in (self.listen, *self.upstreams) if not _TARGET.match(t)]
        if bad:
            raise ValueError(f"not host:port addresses: {bad}")
        if self.workers < 1:
            raise ValueError("the proxy needs at least one worker process")

    @property
    def access_log(self) -> Path:
        return self.runtime_dir / "access.log"

    def values(self) -> dict[str, str]:
        return {
            "PROXY_WORKERS": str(self.workers),
            "PROXY_RUNTIME_DIR": str(self.runtime_dir),
            "PROXY_CONF_DIR": str(self.runtime_dir),
            "PROXY_LISTEN": self.listen,
            "PROXY_UPSTREAM_SERVERS": " ".join(f"server {target};" for target in self.upstreams),
            "PROXY_RESOLVER": "",
            "PROXY_ACCESS_LOG": str(self.access_log),
        }


def write_config(config: ProxyConfig, template_dir: Path = TEMPLATE_DIR) -> Path:
    """Render both templates into ``config.runtime_dir``; returns the main configuration file."""
    config.runtime_dir.mkdir(parents=True, exist_ok=True)
    values = config.values()
    for name in (MAIN_TEMPLATE, SITE_TEMPLATE):
        text = render((template_dir / name).read_text(), values)
        (config.runtime_dir / name.removesuffix(".template")).write_text(text)
    return config.runtime_dir / MAIN_TEMPLATE.removesuffix(".template")


def proxy_argv(config: ProxyConfig, binary: str | None = None) -> list[str]:
    """The command that runs the proxy in the foreground (configuration written first).

    Stop it with SIGQUIT to let calls in flight finish, SIGTERM to cut them.
    """
    binary = binary or nginx_binary()
    if binary is None:
        raise RuntimeError(f"the gRPC proxy needs nginx, which is not installed; {INSTALL_HINT}")
    main_conf = write_config(config)
    return [binary, "-p", str(config.runtime_dir), "-e", "stderr", "-c", str(main_conf), "-g", "daemon off;"]
