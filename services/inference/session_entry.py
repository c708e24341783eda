"""SessionEntry: what one replica knows of a session, and its conversions to and from the directory's fields.

Entries describe every session a replica reports (GetSession, ListSessions: built from Redis's metadata with
`entry_from_meta`), and carry the bookkeeping of the ones it owns (the ownership block). `summary_fields` is what
an owner writes back for the others to list.
"""
from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass
class SessionEntry:
    session_id: str
    created_at: float
    last_used: float
    state: object | None = None  # SessionState while resident
    location: str = "device"     # "device" | "redis" | "lost"
    busy: bool = False
    pinned: bool = False            # its turn is in the running batch: never spilled
    spilling: bool = False          # a spill of it is being written
    length: int = 0
    nbytes: int = 0                 # allocated on the device (what the budget counts)
    stored_nbytes: int = 0          # what the compressed cache keeps
    full_nbytes: int = 0
    head_map_version: str = ""
    fingerprint_id: str = ""
    lost_reason: str = ""
    last_token: int | None = None   # what a continued chat turn's template delta depends on
    tenant: str = ""
    owner: str = ""                 # the replica holding it ("" when only Redis has it)
    ttl_s: int = 0                  # it expires this long after its last use
    keep_resident: bool = False     # pinned by its user: never spilled
    # ---- ownership, for the sessions this replica owns --------------------------------------------
    gen: int = 0                    # the fencing generation we own it at
    spill_gen: int = 0              # the generation whose state Redis's spill holds
    saved: bool = False             # the spill holds exactly the resident state
    turn_recorded: bool = False     # Redis knows a turn changed the state since the spill (meta `dirty`)
    lease_until: float = 0.0        # monotonic time until which our lease is surely valid
    hand_over: bool = False         # another replica asked for it: hand it over once idle
    fenced: bool = False            # another replica took it over: drop our copy once idle
    deleting: bool = False          # DeleteSession is removing it: a renewal must not register it again

    def snapshot(self) -> "SessionEntry":
        return replace(self, state=None)


def summary_fields(entry) -> dict:
    """What other replicas show for a session (GetSession, ListSessions), from a SessionEntry."""
    return {"length": entry.length, "nbytes": entry.nbytes, "stored_nbytes": entry.stored_nbytes,
            "full_nbytes": entry.full_nbytes, "head_map_version": entry.head_map_version,
            "last_used": entry.last_used, "last_token": "" if entry.last_token is None else entry.last_token}


SUMMARY = ("created_at", "last_used", "length", "nbytes", "stored_nbytes", "full_nbytes", "head_map_version",
            "fingerprint_id", "last_token", "ttl_s", "keep_resident")


def identity_fields(entry: SessionEntry) -> dict:
    """What re-registers a session whose metadata Redis lost."""
    return {"tenant": entry.tenant, "created_at": entry.created_at, "ttl_s": entry.ttl_s,
            "pinned": entry.keep_resident}


def lifetime_fields(entry: SessionEntry) -> dict:
    return {"ttl": entry.ttl_s, "pinned": int(entry.keep_resident)}


def entry_from_meta(d: dict) -> SessionEntry:
    def number(key, kind=int, default=0):
        try:
            return kind(d.get(key) or default)
        except ValueError:
            return default

    lost = d.get("lost") or ""
    location = "lost" if lost else ("device" if d.get("holder") else "redis")
    last_token = d.get("last_token")
    return SessionEntry(d["session_id"], number("created_at", float), number("last_used", float), location=location,
                        length=number("length"), nbytes=number("nbytes"), stored_nbytes=number("stored_nbytes"),
                        full_nbytes=number("full_nbytes"), head_map_version=d.get("head_map_version") or "",
                        fingerprint_id=d.get("fingerprint_id") or "", lost_reason=lost, tenant=d.get("tenant") or "",
                        owner=d.get("holder") or "", ttl_s=number("ttl"), keep_resident=d.get("pinned") == "1",
                        last_token=int(last_token) if last_token not in (None, "", "None") else None)
