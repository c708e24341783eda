"""The header of a spilled session: every field's type, and its consistency with the tensors and the model.

The codec proves a header intact (its digest) and a well-formed tensor container; this module proves it is
a session that can be rebuilt: each meta field of the right type (no field missing, none unknown), token ids
in the model's vocabulary and as many as ``token_count``, one cache length for every layer and no longer than
the history, every tensor of the shape and dtype that length and the head split imply, and the byte counts
the tensors add up to. It reads the header only, so a session is checked before its blob is fetched.
Anything off raises ``HeaderInvalid`` naming the field.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from services.engine import CompressionParams, hf, kv_quant

from .codec import is_count

KV_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2}   # a cache's dtype -> bytes per element
COMP_DTYPE = "float32"                                    # compensation tokens are running means in float32
SCALE_DTYPE = "float16"                                   # retrieval heads as integers: their scales
INT_DTYPES = {8: "int8", 6: "uint8", 4: "uint8"}          # bits -> a retrieval store's dtype (6 and 4: packed)


class HeaderInvalid(Exception):
    """A spilled session's header has a field of the wrong type, or fields that disagree."""


@dataclass(frozen=True)
class ModelShape:
    """What a session's cache must match besides the fingerprint id: its geometry and vocabulary."""

    n_layers: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int

    @classmethod
    def of(cls, loaded) -> "ModelShape":
        fp = loaded.fingerprint
        return cls(fp.n_layers, fp.n_kv_heads, fp.head_dim, hf.model_dims(loaded.model.config).vocab_size)


def _is_str(v) -> bool:
    return isinstance(v, str)


def _is_number(v) -> bool:
    """A finite JSON number (an int of any size, which no float conversion may overflow on)."""
    return isinstance(v, int) and not isinstance(v, bool) or isinstance(v, float) and math.isfinite(v)


def _is_time(v) -> bool:
    return _is_number(v) and v >= 0


def _is_ratio(v) -> bool:
    return _is_number(v) and v >= 1


# field -> the test its value must pass. A field not listed is refused: add a new one here with its type.
META_FIELDS = {
    "session_id": _is_str, "fingerprint_id": _is_str, "head_map_version": _is_str,
    "dtype": lambda v: _is_str(v) and v in KV_DTYPES,
    "token_count": is_count, "nbytes": is_count, "full_nbytes": is_count, "stored_nbytes": is_count,
    "created_at": _is_time, "last_used": _is_time, "state": lambda v: isinstance(v, dict),
}
# The store checks `gen` (the fencing generation it was spilled under) against Redis's record of it.
OPTIONAL_META_FIELDS = {"tenant": _is_str, "gen": lambda v: is_count(v) and v >= 1}
STATE_FIELDS = {"token_ids": lambda v: isinstance(v, list), "head_map_version": _is_str, "fingerprint_id": _is_str,
                "chat": lambda v: isinstance(v, bool), "cache": lambda v: isinstance(v, dict)}
CACHE_FIELDS = {"n_kv_heads": lambda v: is_count(v) and v >= 1, "params": lambda v: isinstance(v, dict),
                "retrieval_kv_heads": lambda v: isinstance(v, list) and len(v) >= 1,
                "seq_len": lambda v: isinstance(v, list), "comp_count": lambda v: isinstance(v, list)}
OPTIONAL_CACHE_FIELDS = {"dtype": lambda v: _is_str(v) and v in KV_DTYPES}   # absent in an empty cache
PARAMS_FIELDS = {"sink": is_count, "min_window": lambda v: is_count(v) and v >= 1, "ratio": _is_ratio,
                 "compensation": lambda v: isinstance(v, bool)}
_KEY_BITS = lambda v: v in kv_quant.BITS and not isinstance(v, bool)   # noqa: E731
_VALUE_BITS = lambda v: is_count(v) and v in {b for _, b in kv_quant.STORAGES}   # noqa: E731
OPTIONAL_PARAMS_FIELDS = {"retrieval_bits": _KEY_BITS, "retrieval_value_bits": _VALUE_BITS,
                          "local_bits": _KEY_BITS, "local_value_bits": _VALUE_BITS, "recent_rows": is_count,
                          "local_recent_rows": is_count}


def check_meta(meta: dict) -> None:
    """The top-level meta fields only: enough to read whose session it is (model, dtype) and to index it."""
    _fields("meta", meta, META_FIELDS, OPTIONAL_META_FIELDS)


def check(parsed: dict, sid: str, shape: ModelShape | None = None) -> None:
    """Check all of the header ``codec.read_header`` returned for session ``sid``, and with ``shape`` (the
    model's, for a session of this service's model and dtype) against the model. Raises ``HeaderInvalid``."""
    meta = parsed["meta"]
    check_meta(meta)
    if meta["session_id"] != sid:
        raise HeaderInvalid(f"meta.session_id names session {meta['session_id']!r}, not {sid}")
    state = meta["state"]
    _fields("state", state, STATE_FIELDS)
    for name in ("head_map_version", "fingerprint_id"):
        if state[name] != meta[name]:
            raise HeaderInvalid(f"state.{name} {state[name]!r} differs from meta.{name} {meta[name]!r}")
    cache = state["cache"]
    _fields("state.cache", cache, CACHE_FIELDS, OPTIONAL_CACHE_FIELDS)
    _fields("state.cache.params", cache["params"], PARAMS_FIELDS, OPTIONAL_PARAMS_FIELDS)
    _check_storage(cache["params"])
    if cache.get("dtype", meta["dtype"]) != meta["dtype"]:
        raise HeaderInvalid(f"state.cache.dtype {cache['dtype']!r} differs from meta.dtype {meta['dtype']!r}")
    _check_tokens(state["token_ids"], meta["token_count"], shape)
    length = _cache_length(cache, meta["token_count"], shape)
    tensors = {e["name"]: (e["dtype"], e["shape"]) for e in parsed["tensors"]}
    _check_tensors(tensors, cache, length, meta["dtype"], shape.head_dim if shape else None)
    _check_bytes(meta, parsed["tensors"], cache, length)


def _fields(where: str, obj: dict, required: dict, optional: dict | None = None) -> None:
    tests = {**required, **(optional or {})}
    missing, unknown = set(required) - set(obj), set(obj) - set(tests)
    if missing or unknown:
        raise HeaderInvalid(f"{where} lacks {sorted(missing)}" if missing else f"{where} has unknown {sorted(unknown)}")
    for name, value in obj.items():
        if not tests[name](value):
            raise HeaderInvalid(f"{where}.{name} has a value of the wrong type or range: {str(value)[:60]}")


def _check_storage(params: dict) -> None:
    bits = _bits(params)
    try:
        kv_quant.check_storage(bits["keys"], bits["values"])
        kv_quant.check_storage(bits["local_keys"], bits["local_values"])
    except ValueError as e:
        raise HeaderInvalid(f"state.cache.params: {e}") from None


def _recent(params: dict) -> tuple[int, int]:
    """The recent rows (retrieval, local) a cache of these (checked) params keeps, by the engine's own rule."""
    try:
        return CompressionParams(**params).recent
    except ValueError as e:
        raise HeaderInvalid(f"state.cache.params: {e}") from None


def _bits(params: dict) -> dict[str, int]:
    """The bits each group's keys and values are stored in, by spill name ("keys", "local_values", ...); a spill
    from before 8 bits names none (16), from before integer local rows no local ones."""
    out = {}
    for group, prefix in (("retrieval", ""), ("local", "local_")):
        key_bits = params.get(f"{group}_bits", 16)
        out.update({f"{prefix}keys": key_bits, f"{prefix}values": params.get(f"{group}_value_bits", key_bits)})
    return out


def _check_tokens(token_ids: list, token_count: int, shape: ModelShape | None) -> None:
    if len(token_ids) != token_count:
        raise HeaderInvalid(f"state.token_ids holds {len(token_ids)} tokens, token_count says {token_count}")
    vocab = shape.vocab_size if shape else None
    for i, t in enumerate(token_ids):
        if not is_count(t) or (vocab is not None and t >= vocab):
            raise HeaderInvalid(f"state.token_ids[{i}] = {t!r} is not a token id"
                                + (f" of this model (0..{vocab - 1})" if vocab else ""))


def _cache_length(cache: dict, token_count: int, shape: ModelShape | None) -> int:
    """The tokens the cache holds (one length for all layers, at most the history); checks the head split."""
    n_kv, heads = cache["n_kv_heads"], cache["retrieval_kv_heads"]
    if shape is not None and (len(heads), n_kv) != (shape.n_layers, shape.n_kv_heads):
        raise HeaderInvalid(f"the cache has {len(heads)} layers of {n_kv} KV heads; this model has "
                            f"{shape.n_layers} of {shape.n_kv_heads}")
    for i, layer in enumerate(heads):
        heads_ok = isinstance(layer, list) and all(is_count(h) and h < n_kv for h in layer)
        if not heads_ok or layer != sorted(set(layer)):
            raise HeaderInvalid(f"state.cache.retrieval_kv_heads[{i}] is not a sorted list of heads in 0..{n_kv - 1}")
    lengths, counts = cache["seq_len"], cache["comp_count"]
    if len(lengths) != len(heads) or len(counts) != len(heads) or not all(map(is_count, lengths + counts)):
        raise HeaderInvalid(f"state.cache.seq_len and comp_count must be {len(heads)} counts each, one per layer")
    if len(set(lengths)) != 1 or lengths[0] > token_count:
        raise HeaderInvalid(f"state.cache.seq_len {sorted(set(lengths))[:4]} is not one length of at most "
                            f"token_count {token_count}")
    return lengths[0]


def _check_tensors(tensors: dict, cache: dict, length: int, dtype: str, head_dim: int | None) -> None:
    """Exactly the tensors a cache of ``length`` tokens with this head split holds, each of its shape."""
    expected: dict[str, tuple[str, list[int]]] = {}
    for i, heads in enumerate(cache["retrieval_kv_heads"]):
        expected.update(_layer_tensors(i, tensors, len(heads), cache, length, dtype))
    if set(tensors) != set(expected):
        raise HeaderInvalid(f"the tensors {sorted(set(tensors) ^ set(expected))[:4]} are missing or unexpected")
    bits = _bits(cache["params"])
    # Without the model, one head_dim for all (that any tensor but scales implies: a wrong one fails every comparison).
    head_dim = head_dim or _implied_head_dim(((n, s) for n, (_, s) in tensors.items() if len(s) == 4), bits) or 1
    for name, (want_dtype, want_dims) in expected.items():
        width = (kv_quant.scale_width(head_dim) if _scales(name) else
                 kv_quant.store_width(head_dim, _stored_bits(name, bits)))
        want = (want_dtype, [*want_dims, width])
        if tensors[name] != want or head_dim < 1:
            raise HeaderInvalid(f"tensor {name} is {tensors[name]}, expected {want}")


def _implied_head_dim(shapes, bits: dict[str, int]) -> int:
    """head_dim as the first tensor of ``shapes`` ((name, shape) pairs) that is not scales implies; 0 if none."""
    for name, shape in shapes:
        if not _scales(name):
            return kv_quant.channels(shape[-1], _stored_bits(name, bits))
    return 0


def _stored_bits(name: str, bits: dict[str, int]) -> int:
    """The bits tensor ``name`` ("3.local_keys") holds a channel in: a group's keys or values at the params' bits
    (packed below 8), anything else 16 (the compensation's float32)."""
    return bits.get(name.partition(".")[2], 16)


def _scales(name: str) -> bool:
    """A group's scales ("3.key_scales", "3.local_value_scales"): one per group of channels, not head_dim wide."""
    return name.endswith("_scales")


def _layer_tensors(i: int, tensors: dict, n_retrieval: int, cache: dict, length: int, dtype: str) -> dict:
    """Layer ``i``'s expected tensors -> (dtype, shape without head_dim)."""
    n_local, comp = cache["n_kv_heads"] - n_retrieval, cache["comp_count"][i]
    if length == 0:
        if comp:
            raise HeaderInvalid(f"layer {i} folded {comp} tokens into an empty cache")
        return {}
    out, bits = {}, _bits(cache["params"])
    recent, local_recent = _recent(cache["params"])
    if n_retrieval:
        out.update(_group_tensors(i, "", bits, [1, n_retrieval, length], dtype, recent))
    if n_local:
        local_shape = tensors.get(f"{i}.local_keys", (None, []))[1]
        rows = local_shape[2] if len(local_shape) == 4 else -1
        compensates = cache["params"]["compensation"]
        if not 0 <= rows <= length or (rows + comp != length if compensates else comp != 0):
            raise HeaderInvalid(f"layer {i} keeps {rows} local rows and folded {comp} of {length} tokens")
        out.update(_group_tensors(i, "local_", bits, [1, n_local, rows], dtype, local_recent))
        if comp:
            out.update({f"{i}.{name}": (COMP_DTYPE, [1, n_local, 1]) for name in ("comp_keys", "comp_values")})
    return out


def _group_tensors(i: int, prefix: str, bits: dict[str, int], dims: list[int], dtype: str, recent: int) -> dict:
    """One head group's keys and values (``prefix`` "" or "local_"), and where stored in integers their scales
    and the copies of the last ``recent`` rows in ``dtype``."""
    if bits[f"{prefix}keys"] == 16:
        return {f"{i}.{prefix}{name}": (dtype, dims) for name in ("keys", "values")}
    out = {f"{i}.{prefix}{name}": (INT_DTYPES[bits[prefix + name]], dims) for name in ("keys", "values")}
    out.update({f"{i}.{prefix}{name}": (SCALE_DTYPE, dims) for name in ("key_scales", "value_scales")})
    if recent:
        out.update({f"{i}.{prefix}{name}": (dtype, [*dims[:2], min(recent, dims[2])])
                    for name in ("recent_keys", "recent_values")})
    return out


def _check_bytes(meta: dict, entries: list, cache: dict, length: int) -> None:
    """The byte counts the service budgets and reports agree with the tensors."""
    stored = sum(e["nbytes"] for e in entries)
    head_dim = _implied_head_dim(((e["name"], e["shape"]) for e in entries), _bits(cache["params"]))
    full = len(cache["seq_len"]) * 2 * cache["n_kv_heads"] * length * head_dim * KV_DTYPES[meta["dtype"]]
    if meta["stored_nbytes"] != stored or meta["full_nbytes"] != full or meta["nbytes"] < stored:
        raise HeaderInvalid(f"nbytes {meta['nbytes']}, stored_nbytes {meta['stored_nbytes']} and full_nbytes "
                            f"{meta['full_nbytes']} disagree with the tensors ({stored} bytes stored, {full} full)")
