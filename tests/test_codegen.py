"""The generated gRPC code: made by `make proto` (and make run/test/bench, the Dockerfiles), never at import time.

Missing or stale code is an ImportError that says to run `make proto`; importing the service and the clients runs
no generator.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

import services.api as api
from tests.conftest import REPO_ROOT


def test_missing_generated_code_is_an_import_error_that_says_to_run_make_proto(tmp_path, monkeypatch):
    monkeypatch.setattr(api, "GENERATED_DIR", tmp_path / "v1")
    with pytest.raises(ImportError, match="missing .*run `make proto`"):
        api.require_generated()


def test_code_older_than_a_proto_file_is_refused_until_regenerated(tmp_path, monkeypatch):
    generated, protos = tmp_path / "v1", tmp_path / "proto" / "razorserve" / "v1"
    generated.mkdir()
    protos.mkdir(parents=True)
    target = generated / "razorserve_pb2_grpc.py"
    target.write_text("")
    (protos / "razorserve.proto").write_text("")
    monkeypatch.setattr(api, "GENERATED_DIR", generated)
    monkeypatch.setattr(api, "PROTO_ROOT", tmp_path / "proto")
    os.utime(target, (1, 1))
    with pytest.raises(ImportError, match="older than razorserve.proto: run `make proto`"):
        api.require_generated()
    os.utime(target)   # as the generator leaves it: newer than every proto
    api.require_generated()


MODULES = ("services.inference.client", "services.inference.aio_client", "services.inference.server")
IMPORT_WITHOUT_CODE = f"""
import importlib
import services.api as api
import services.api.generate as generator

def refuse():
    raise AssertionError("gRPC code generated at import time")

generator.generate = refuse
api.GENERATED_DIR = api.GENERATED_DIR.parent / "absent"   # as on a fresh checkout
for name in {MODULES!r}:
    try:
        importlib.import_module(name)
        print(name, "imported")
    except ImportError as exc:
        print(name, "ImportError:", exc)
"""


def test_importing_the_service_and_the_clients_without_the_code_says_make_proto_and_generates_nothing():
    done = subprocess.run([sys.executable, "-c", IMPORT_WITHOUT_CODE], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert [line.split()[0] for line in lines] == list(MODULES), done.stdout
    assert all("ImportError:" in line and "run `make proto`" in line for line in lines), done.stdout
