"""LocalSpills: sessions saved to a local directory when Redis is unreachable at shutdown, uploaded at the next start.

One file per session, ``<id>.razorspill``: a JSON line (format, session id, the replica and generation that owned
it, its directory summary, the size of the codec header and of each chunk), then the codec header and chunks —
the same bytes a Redis spill holds, so a restore checks them the same way. An upload is fenced like any spill: it
lands only while Redis still names that replica and generation (or no one) as the owner, so a session that moved
on meanwhile is never rolled back. Files are written to a temporary name and renamed, so a crash mid-write
leaves no half file behind.
"""
from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .codec import is_count

log = logging.getLogger(__name__)
FORMAT = "razorserve-local-spill/1"
SUFFIX = ".razorspill"


@dataclass(frozen=True)
class LocalSpill:
    sid: str
    owner: str
    gen: int
    tenant: str
    created_at: float
    fields: dict
    header: bytes
    chunks: list[bytes]
    ttl_s: int = 0          # the session's own TTL (0: the replica's default), which the upload keeps
    pinned: bool = False


class LocalSpills:
    def __init__(self, directory: str | Path):
        self.directory = Path(directory).expanduser()

    def save(self, spill: LocalSpill) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        intro = {"format": FORMAT, "session_id": spill.sid, "owner": spill.owner, "gen": spill.gen,
                 "tenant": spill.tenant, "created_at": spill.created_at, "fields": spill.fields,
                 "ttl_s": spill.ttl_s, "pinned": spill.pinned,
                 "header_bytes": len(spill.header), "chunk_bytes": [len(c) for c in spill.chunks]}
        path = self.directory / f"{spill.sid}{SUFFIX}"
        tmp = path.with_suffix(".tmp")
        with open(tmp, "wb") as f:
            f.write(json.dumps(intro).encode() + b"\n")
            f.write(spill.header)
            for chunk in spill.chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
        return path

    def paths(self) -> list[Path]:
        return sorted(self.directory.glob(f"*{SUFFIX}")) if self.directory.is_dir() else []

    @staticmethod
    def load(path: Path) -> LocalSpill:
        """Read one file back; ValueError when it is not a whole local spill."""
        with open(path, "rb") as f:
            try:
                intro = json.loads(f.readline())
                if intro.get("format") != FORMAT:
                    raise ValueError(f"unknown format {intro.get('format')!r}")
                sizes = _sizes(intro, os.fstat(f.fileno()).st_size - f.tell())
                header, chunks = f.read(sizes[0]), [f.read(n) for n in sizes[1:]]
                sid, owner, gen = str(intro["session_id"]), str(intro["owner"]), int(intro["gen"])
                tenant, created_at = str(intro["tenant"]), float(intro["created_at"])
                fields = dict(intro["fields"])
                ttl_s, pinned = int(intro.get("ttl_s", 0)), bool(intro.get("pinned", False))   # absent in older copies
            except (KeyError, TypeError, ValueError, AttributeError, json.JSONDecodeError) as exc:
                raise ValueError(f"not a local spill ({exc!r})") from exc
        if len(header) != intro["header_bytes"] or [len(c) for c in chunks] != intro["chunk_bytes"]:
            raise ValueError("the file is truncated")
        return LocalSpill(sid, owner, gen, tenant, created_at, fields, header, chunks, ttl_s, pinned)


def _sizes(intro: dict, left: int) -> list[int]:
    """The header's and chunks' sizes, checked against the ``left`` bytes the file holds before any is read:
    ``f.read(n)`` allocates n up front, so a forged size would cost that much memory."""
    sizes = [intro["header_bytes"], *intro["chunk_bytes"]]
    if not all(is_count(n) for n in sizes) or sum(sizes) != left:
        raise ValueError(f"the file is truncated or edited: the sizes it names are not the {left} bytes it holds")
    return sizes
