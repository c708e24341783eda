"""GGUF checkpoints converted once, kept on local disk as a transformers checkpoint directory.

transformers dequantises a GGUF file on every load: about 30 s for the embedded SmolLM2 on a 2-core CPU, in
every process that loads it (each replica, the worker, the CLI, each test that starts a service), where loading
the same float32 weights from safetensors takes about a second. So the first load writes the converted model and
tokenizer here, and later loads read them back (`models._load_gguf`).

A copy is named by its source's content (sha256) and the converter (the transformers and gguf versions): a
changed file or an upgrade converts again, and every venv holding the same file shares one copy.
- One process converts a file at a time (`converting`, an flock the kernel releases if its holder dies); the
  others wait for its copy rather than spend the same 30 s each (two replicas and the worker starting together).
- A copy is written under a temporary name and renamed into place whole, so a reader never sees half of one.
- Each load stamps its copy as used; a new copy's publication removes those unused for `UNUSED_PRUNE_S`
  (an upgrade's leftovers, files no longer served), so the directory does not grow without bound.
- Safetensors and JSON only: nothing here is unpickled.
- Where the cache cannot be written (a read-only home), loads convert every time, as before, and log why.

Location: `$XDG_CACHE_HOME/razorserve/converted` (default `~/.cache/razorserve/converted`).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

MANIFEST = "razorserve-source.json"   # written last: a directory with it is a whole copy
FORMAT = 1                            # bump when what a copy holds changes
STALE_PARTIAL_S = 3600                # a partial copy this old was left by a process that died writing it
UNUSED_PRUNE_S = 7 * 86400            # a copy no load used for a week costs one conversion if it is wanted again
CONVERT_WAIT_S = 600.0                # longer than any conversion: a converter this slow is stuck, so convert anyway


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "razorserve" / "converted"


def source_identity(source: Path, converter: str) -> dict:
    """What a copy must have been converted from: the file's content, by the converter in use now. By content,
    not path or mtime, so every venv or clone holding the same wheel shares one copy."""
    stat = source.stat()
    return {"sha256": content_digest(source.resolve(), stat.st_size, stat.st_mtime_ns), "size": stat.st_size,
            "converter": converter, "format": FORMAT}


@lru_cache(maxsize=16)
def content_digest(path: Path, size: int, mtime_ns: int) -> str:
    """sha256 of a file (0.1 s for SmolLM2's 94 MiB); once per process while its size and mtime stay."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def copy_dir(source: Path, converter: str, root: Path | None = None) -> Path:
    identity = source_identity(source, converter)
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return (root or cache_root()) / f"{source.stem}-{key}"


def obtain(source: Path, converter: str, read: Callable[[Path], T], convert: Callable[[], T],
           save: Callable[[T, Path], None], root: Path | None = None) -> T:
    """`read` of `source`'s copy; where there is none, `convert()` it (one process at a time) and keep a copy."""
    loaded = read_copy(source, converter, read, root)
    if loaded is not None:
        return loaded
    with converting(source, converter, root):
        loaded = read_copy(source, converter, read, root)   # another process's copy landed while this one waited
        if loaded is not None:
            return loaded
        result = convert()
        publish(source, converter, lambda directory: save(result, directory), root)
    return result


def read_copy(source: Path, converter: str, read: Callable[[Path], T], root: Path | None = None) -> T | None:
    """`read(copy)` of `source`'s copy; None where there is none, or where it would not read (a disk error, a
    manual edit): that copy is discarded, so the next load converts afresh."""
    copy = lookup(source, converter, root)
    if copy is None:
        return None
    try:
        return read(copy)
    except Exception as e:  # a reader raises whatever its format's library raises for an unreadable file
        log.warning("the converted copy %s of %s would not load (%s): converting again", copy, source, e)
        discard(copy)
        return None


def lookup(source: Path, converter: str, root: Path | None = None) -> Path | None:
    """The directory of a whole copy of `source` by `converter`, or None. Found is used: its stamp is renewed."""
    directory = copy_dir(source, converter, root)
    if not (directory / MANIFEST).is_file():
        return None
    stamp_used(directory)
    return directory


def stamp_used(directory: Path) -> None:
    try:
        os.utime(directory / MANIFEST)
    except OSError:   # a read-only cache: nothing is pruned there either
        pass


@contextmanager
def converting(source: Path, converter: str, root: Path | None = None) -> Iterator[None]:
    """Hold the right to convert `source`: other processes wait here until this one's copy has landed. Where
    the lock cannot be taken (an unwritable cache) or is held past CONVERT_WAIT_S, convert unlocked."""
    final = copy_dir(source, converter, root)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        lock = open(final.parent / f".{final.name}.lock", "a")   # kept: removing it would let two processes lock
    except OSError:
        yield
        return
    with lock:
        wait_for_lock(lock, source)
        yield


def wait_for_lock(lock, source: Path) -> None:
    deadline = time.monotonic() + CONVERT_WAIT_S
    waited = False
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                log.warning("another process has converted %s for over %.0f s: converting it here too",
                            source, CONVERT_WAIT_S)
                return
            if not waited:
                log.info("waiting for another process converting %s", source)
                waited = True
            time.sleep(0.2)


def publish(source: Path, converter: str, write: Callable[[Path], None], root: Path | None = None) -> Path | None:
    """`write(directory)` the converted checkpoint into a temporary directory, then rename it into place.

    Returns the copy's directory (this one's, or another process's that landed first), or None where the
    cache cannot be written; the caller then goes on with what it converted."""
    final = copy_dir(source, converter, root)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        sweep_stale_partials(final)
        partial = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}-"))
    except OSError as e:
        log.warning("cannot keep a converted copy of %s under %s (%s): every load converts it again",
                    source, final.parent, e)
        return None
    try:
        write(partial)
        manifest = {**source_identity(source, converter), "converted_from": str(source.resolve())}
        (partial / MANIFEST).write_text(json.dumps(manifest, indent=1))
        os.rename(partial, final)   # atomic; refused where `final` exists (another process's copy landed first)
        log.info("kept a converted copy of %s in %s", source, final)
        prune_unused(final.parent, keep=final)
    except Exception as e:   # a full disk, or a writer that fails: the load goes on without a copy
        if lookup(source, converter, root) is None:
            log.warning("cannot keep a converted copy of %s in %s (%s: %s)", source, final, type(e).__name__, e)
            return None
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return final


def sweep_stale_partials(final: Path) -> None:
    """Remove the half-written copies of `final` that processes which died while writing left behind."""
    cutoff = time.time() - STALE_PARTIAL_S
    for partial in final.parent.glob(f".{final.name}-*"):
        try:
            stale = partial.stat().st_mtime < cutoff
        except FileNotFoundError:   # its writer renamed or removed it meanwhile
            continue
        if stale:
            shutil.rmtree(partial, ignore_errors=True)


def prune_unused(root: Path, keep: Path) -> None:
    """Remove the whole copies under `root` that no load has used for UNUSED_PRUNE_S (`keep` stays)."""
    cutoff = time.time() - UNUSED_PRUNE_S
    for manifest in root.glob(f"*/{MANIFEST}"):
        try:
            unused = manifest.stat().st_mtime < cutoff
        except FileNotFoundError:   # another process pruned it meanwhile
            continue
        if unused and manifest.parent != keep:
            log.info("removing the converted copy %s: unused for %d days", manifest.parent, UNUSED_PRUNE_S // 86400)
            discard(manifest.parent)


def discard(directory: Path) -> None:
    """Remove a copy (one that would not load, or an unused one). Renamed out of the way first, in one step, so a
    reader never finds a copy whose manifest outlives some of its files; the name is a partial's, so what a
    failed removal leaves is swept as one."""
    doomed = directory.parent / f".{directory.name}-discarded-{os.getpid()}-{time.monotonic_ns()}"
    try:
        os.rename(directory, doomed)
    except OSError:   # already gone: another process discarded it
        return
    shutil.rmtree(doomed, ignore_errors=True)
