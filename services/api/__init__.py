"""Generated gRPC code for the RazorServe API (``proto/razorserve/v1/razorserve.proto``).

The modules under ``services/api/razorserve/`` are produced by ``make proto`` (``python -m services.api.generate``;
``make run``, ``make test``, ``make bench`` and the Dockerfiles run it too) and are never edited or committed.
Nothing generates them at import time. Import them as::

    from services.api.razorserve.v1 import razorserve_pb2, razorserve_pb2_grpc

``require_generated()`` turns missing or stale code into an ImportError that says what to run.
"""
from __future__ import annotations

from pathlib import Path

GENERATED_DIR = Path(__file__).resolve().parent / "razorserve" / "v1"
PROTO_ROOT = Path(__file__).resolve().parents[2] / "proto"
_HOW = "run `make proto` (or `.venv/bin/python -m services.api.generate`) from the repository root"


def require_generated() -> None:
    """Raise ImportError when the generated modules are missing, or older than a proto file beside them."""
    target = GENERATED_DIR / "razorserve_pb2_grpc.py"
    if not target.exists():
        raise ImportError(f"the gRPC code generated from proto/ is missing ({target}): {_HOW}")
    protos = list(PROTO_ROOT.rglob("*.proto"))   # none in an install without the sources: nothing to compare
    newest = max(protos, key=lambda p: p.stat().st_mtime, default=None)
    if newest is not None and target.stat().st_mtime < newest.stat().st_mtime:
        raise ImportError(f"the gRPC code generated from proto/ is older than {newest.name}: {_HOW}")
