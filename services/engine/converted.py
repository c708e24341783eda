"""GGUF checkpoints converted once, kept on local disk as a transformers checkpoint directory.

transformers dequantises a GGUF file on every load: about 30 s for the embedded SmolLM2 on a 2-core CPU, in
every process that loads it (each replica, the worker, the CLI, each test that starts a service), where loading
the same float32 weights from safetensors takes about a second. So the first load writes the converted model and
tokenizer here, and later loads read them back (`models._load_gguf`).

A copy is named by its source's content (sha256) and the converter (the transformers and gguf versions): a
changed file or an upgrade converts again, and every venv holding the same file shares one copy. A copy is written under a temporary name and renamed
into place whole, so a reader never sees half of one and processes converting at once keep the first that
lands. Safetensors and JSON only: nothing here is unpickled. Where the cache cannot be written (a read-only
home), loads convert every time, as before, and log why.

Location: `$XDG_CACHE_HOME/razorserve/converted` (default `~/.cache/razorserve/converted`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "razorserve-source.json"   # written last: a directory with it is a whole copy
FORMAT = 1                            # bump when what a copy holds changes
STALE_PARTIAL_S = 3600                # a partial copy this old was left by a process that died writing it


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


def lookup(source: Path, converter: str, root: Path | None = None) -> Path | None:
    """The directory of a whole copy of `source` by `converter`, or None."""
    directory = copy_dir(source, converter, root)
    return directory if (directory / MANIFEST).is_file() else None


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


def discard(directory: Path) -> None:
    """Remove a copy that would not load, so the next load converts afresh."""
    shutil.rmtree(directory, ignore_errors=True)
