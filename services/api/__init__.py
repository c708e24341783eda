"""Generated gRPC code for the RazorServe API (``proto/razorserve/v1/razorserve.proto``).

The modules under ``services/api/razorserve/`` are produced by ``python -m services.api.generate``
and are never edited or committed. Import them as::

    from services.api.razorserve.v1 import razorserve_pb2, razorserve_pb2_grpc

``ensure_generated()`` runs the generator when they are missing (tests and the server call it).
"""
from __future__ import annotations

from pathlib import Path

GENERATED_DIR = Path(__file__).resolve().parent / "razorserve" / "v1"


def ensure_generated() -> None:
    """Generate the gRPC modules if they are missing or older than the proto file."""
    from services.api.generate import PROTO_FILE, generate

    target = GENERATED_DIR / "razorserve_pb2_grpc.py"
    if not target.exists() or target.stat().st_mtime < PROTO_FILE.stat().st_mtime:
        generate()
