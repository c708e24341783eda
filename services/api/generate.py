"""Generate the Python gRPC modules from ``proto/`` with grpcio-tools.

    python -m services.api.generate

protoc runs with ``-I proto`` and writes into ``services/api``, so the proto package
``razorserve/v1`` becomes ``services/api/razorserve/v1/razorserve_pb2{,_grpc}.py`` (+ ``.pyi``).
protoc's gRPC plugin imports the message module by its proto path (``from razorserve.v1 import
...``); the one import line is rewritten to ``from services.api.razorserve.v1 import ...`` so
the code works as part of the ``services`` package. That rewrite is the only change made.
"""
from __future__ import annotations

import re
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
PROTO_ROOT = REPO_ROOT / "proto"
PROTO_FILE = PROTO_ROOT / "razorserve" / "v1" / "razorserve.proto"
OUT_ROOT = REPO_ROOT / "services" / "api"

_GRPC_IMPORT = re.compile(r"^from razorserve\.v1 import ", re.MULTILINE)


def generate() -> list[Path]:
    """Run protoc on every proto file; return the files written."""
    import grpc_tools
    from grpc_tools import protoc

    well_known = Path(grpc_tools.__file__).parent / "_proto"
    protos = sorted(PROTO_ROOT.rglob("*.proto"))
    args = [
        "protoc",
        f"-I{PROTO_ROOT}",
        f"-I{well_known}",
        f"--python_out={OUT_ROOT}",
        f"--pyi_out={OUT_ROOT}",
        f"--grpc_python_out={OUT_ROOT}",
        *map(str, protos),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {', '.join(map(str, protos))}")
    written = []
    for proto in protos:
        out_dir = OUT_ROOT / proto.parent.relative_to(PROTO_ROOT)
        _add_package_inits(out_dir)
        written += sorted(out_dir.glob(f"{proto.stem}_pb2*"))
    for path in written:
        if path.name.endswith("_grpc.py"):
            text = _GRPC_IMPORT.sub("from services.api.razorserve.v1 import ", path.read_text())
            path.write_text(text)
    return written


def _add_package_inits(out_dir: Path) -> None:
    # Regular packages (not namespace packages), so tools and type checkers find them.
    for folder in [out_dir, *out_dir.parents]:
        if folder == OUT_ROOT:
            break
        (folder / "__init__.py").touch()


def main() -> int:
    for path in generate():
        print(path.relative_to(REPO_ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
