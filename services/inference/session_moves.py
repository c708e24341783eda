"""Export, fork and import at the store level: a session read as a turn reads it, or a new one adopted.

A session is read as a turn reads it: acquired (busy, so no turn runs on it meanwhile, and owned here), and
restored on the I/O thread when spilled (``on_io`` runs a function there); the copy is made before release.
`transfer` frames and checks the bytes.
"""
from __future__ import annotations

from contextlib import contextmanager

from . import transfer
from .sessions import SessionStore


def export_state(store: SessionStore, sid: str, tenant: str, on_io=None) -> list[bytes]:
    """The export blob of ``sid`` (`transfer.pack`: its spill header and tensors, framed and checksummed)."""
    with _held(store, sid, tenant, on_io) as (entry, state):
        meta = {"session_id": sid, "fingerprint_id": store.fingerprint_id,
                "head_map_version": state.head_map_version, "dtype": store.dtype,
                "token_count": len(state.token_ids), "nbytes": state.nbytes(), "full_nbytes": state.full_nbytes(),
                "stored_nbytes": state.stored_nbytes(), "created_at": entry.created_at,
                "last_used": entry.last_used}
        return transfer.pack(state, meta)


def fork(store: SessionStore, sid: str, tenant: str, on_io=None) -> str:
    """A copy of ``sid`` under a new id of the same tenant; both then continue independently."""
    with _held(store, sid, tenant, on_io) as (_, state):
        copy = transfer.copy_state(state)
    return adopt_state(store, copy, tenant)


def adopt_state(store: SessionStore, state, tenant: str) -> str:
    """Register ``state`` (an import or a fork) as a new session of ``tenant``, owned here and resident; an
    idle session over the budget is then spilled (fenced) like any other. Returns the new id."""
    sid = store.create(tenant)
    store.put(sid, state)
    store.release(sid)
    store.defer(store.settle)
    return sid


@contextmanager
def _held(store: SessionStore, sid: str, tenant: str, on_io):
    """(the entry, the live state) of ``sid`` while this caller holds it as a turn would."""
    on_io = on_io or (lambda fn, *args: fn(*args))   # no runtime: on this thread
    entry = store.acquire(sid, tenant)
    try:
        yield entry, on_io(store.load, sid, lambda n: store.make_room(n, keep=sid))
    finally:
        store.release(sid)
