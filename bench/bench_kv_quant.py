"""Retrieval heads (and local rows) stored in fewer bits: more heads kept full within a quarter of the bytes?

At a quarter of a 16-bit cache's bytes a static map keeps about 20 of SmolLM2's 90 KV heads full (3.2d-f),
and there the losses are real; at about 45 heads only the full cache's near-ties are lost (3.2e). Stored in
8 bits, 45 heads cost what 23 cost in 16; in 4 bits, what 13 cost. This bench measures whether the answers
survive the rounding: the top k of a head order (`--order` JSON, e.g. `bench_layer_windows --save-order`; else
six-family gates trained here as `bench_layer_windows` trains them) kept full with their keys and values
rounded to `bits`-bit integers, one float16 scale per `--group` channels of a row (per token and head, after
RoPE; symmetric from 4 bits, with a zero below), every other head at sink + a window (`--window`, `--ratio`)
with its compensation token, its rows in 16 bits or, as a point's third field says, rounded too. Keys may be
rounded after a fixed rotation (`r`, kv_quant.rotation: the engine's 6-bit keys) or per channel over blocks of
`--group` tokens (`c`, KIVI's; asymmetric). `--key-error` prints how far each rounding moves real keys.
Whole heads' keys can also be rounded as they were before RoPE (docs 3.2w): per channel (`q`, KVQuant's), per
token after the document's mean key is taken out (`m`), or as coefficients on their top principal directions
(`p<rank>`, from calibration documents; values likewise, `/4p48`), then turned back to their positions, or as
codes into codebooks learned on calibration documents, a pair of channels a code (`4v/4v`, kv_codebooks.py, 3.2za).

Simulated (written before the engine stored integers; it now stores retrieval heads in 8/8, 8/4 and 6r/4 bits,
kv_quant.py, and `bench_quality` measures a map in the bits it stores; this bench also covers the widths and local rows
the engine does not store). Each document's cache is built from its full prefill as the
engine builds it, then the rows are quantised and dequantised in place; the question turn's
own rows (and the "turn" family's interlude) stay unrounded, as a quantised store's recent rows would
(KIVI keeps a recent residual in full precision). Bytes are those a packed store would hold (integers, scales,
the local rows and the float32 compensation token) against a 16-bit full cache.

    .venv/bin/python bench/bench_kv_quant.py --order bench/orders/order6.json   # full size (~25 min, 2-core CPU)
    .venv/bin/python bench/bench_kv_quant.py --quick                # smoke run
    .venv/bin/python bench/bench_kv_quant.py --lengths 1000 --tasks 40 --window 64 --ratio 10 \
        --order bench/orders/shipped-213a693a65022d9c.json --points 39:8/4 60:6r/4:6r/4   # docs 3.2o
    .venv/bin/python bench/bench_kv_quant.py --lengths 1000 --tasks 80 --seed 889000 --families multi \
        --window 64 --ratio 10 --order bench/orders/shipped-213a693a65022d9c.json --points 90:6p48/4p48 90:4q/4   # 3.2w
    .venv/bin/python bench/bench_kv_quant.py --lengths 1000 --tasks 80 --seed 889000 --families multi \
        --window 64 --ratio 10 --order bench/orders/shipped-213a693a65022d9c.json --codebook-sample 4096 \
        --points 90:4v/4v 90:4v/4 90:5v/4v   # 3.2za
"""
from __future__ import annotations

import argparse
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import bench_quality as bq
import common
import kv_codebooks
import torch

from services.engine import CompressionParams, Engine, HeadMap, evaluation, hf, kv_quant, load_model
from services.engine.evaluation import full_prefill, retrieval_tasks
from services.engine.headmap import shipped_head_map

FULL_ITEMSIZE = 2    # bytes per element of the full cache the fractions compare with (bfloat16, as on a GPU)
SCALE_ITEMSIZE = 2   # float16 scales


@dataclass(frozen=True)
class Bits:
    keys: int
    values: int
    key_mode: str = ""   # "": per token; "r": per token after a random Hadamard rotation; "c": per channel;
                         # "p": per token, on a key subspace's top `key_rank` directions (KeySubspace);
                         # before RoPE: "q" per channel (KVQuant's), "m" per token after the document's mean
                         # key is taken out and the Hadamard rotation (PRE_ROPE)
                         # "v": codes into a codebook per pair of channels on the subspace (kv_codebooks)
    key_rank: int = 0
    value_rank: int = 0  # > 0: values as coefficients on their subspace's top `value_rank` directions
    value_codes: bool = False   # values as codes into a codebook per pair of channels (kv_codebooks)

    def __str__(self) -> str:
        key = f"{self.keys}{self.key_mode}{self.key_rank or ''}"
        value = f"{self.values}{f'p{self.value_rank}' if self.value_rank else ''}{'v' if self.value_codes else ''}"
        return key if key == value and not self.key_mode else f"{key}/{value}"


@dataclass(frozen=True)
class KeySubspace:
    """Each KV head's principal directions of its keys *before RoPE*, from calibration documents: per layer
    [n_kv_heads, D, D], columns by falling variance. Before RoPE a head's keys are low-rank (on SmolLM2 the top 32
    of 64 directions hold 98% of their energy on bench documents, after RoPE 93%), so a key is stored as its
    coefficients on the top directions at its position 0 and rotated back to its position when read. Values'
    directions likewise (they have no RoPE)."""
    bases: list[torch.Tensor]
    inv_freq: torch.Tensor                                                            # [D / 2], RoPE's
    value_bases: list[torch.Tensor]
    codebooks: dict = field(default_factory=dict)   # ("keys" | "values", bits) -> per layer [h, D / 2, K, 2]


@dataclass(frozen=True)
class LayerBases:
    """What rounding one layer's whole heads before RoPE or on a subspace reads: their rows of a KeySubspace."""
    keys: torch.Tensor | None            # [h, D, D]
    inv_freq: torch.Tensor
    values: torch.Tensor | None          # [h, D, D]
    key_books: torch.Tensor | None = None     # [h, D / 2, K, 2]
    value_books: torch.Tensor | None = None
    sink: int = 0                        # rows codebooks leave as they are


def rope(x: torch.Tensor, inv_freq: torch.Tensor, sign: int) -> torch.Tensor:
    """x: [..., n, D] at positions 0..n-1 rotated by RoPE (sign 1) or back to position 0 (sign -1)."""
    angles = torch.arange(x.shape[-2], dtype=torch.float32)[:, None] * inv_freq      # [n, D / 2]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    first, second = x.chunk(2, -1)
    return x * cos + sign * torch.cat([-second, first], -1) * sin


def key_subspace(engine, length: int, per_family: int) -> KeySubspace:
    """Keys' principal directions before RoPE (and values') over `per_family` calibration-part documents of
    every family."""
    inv_freq = hf.rope_frequencies(engine.model)
    grams: list[torch.Tensor] | None = None
    for family in bq.BENCH_FAMILIES:
        for task in retrieval_tasks(family, length, per_family, bq.RANK_SEED + 7, engine.tokenizer,
                                    part="calibration"):
            keys, values = full_prefill(engine, task.document)
            rows = [rope(k[0].float(), inv_freq, -1) for k in keys] + [v[0].float() for v in values]  # [h, n, D]
            gram = [u.transpose(-1, -2) @ u for u in rows]                                  # [h, D, D]
            grams = gram if grams is None else [a + b for a, b in zip(grams, gram)]
    if grams is None:   # no document: RoPE's frequencies only (keys rounded before RoPE, not projected)
        return KeySubspace([], inv_freq, [])
    bases = [torch.linalg.eigh(g).eigenvectors.flip(-1) for g in grams]
    return KeySubspace(bases[:len(bases) // 2], inv_freq, bases[len(bases) // 2:])


def code_widths(points) -> set[tuple[str, int]]:
    """("keys" | "values", bits) for every codebook the points' whole heads read."""
    return ({("keys", p.retrieval.keys) for p in points if p.retrieval.key_mode == "v"}
            | {("values", p.retrieval.values) for p in points if p.retrieval.value_codes})


def with_codebooks(engine, subspace: KeySubspace, widths: set[tuple[str, int]], args) -> KeySubspace:
    """`subspace` with a codebook per KV head and pair of channels for each of `widths`, learned on its bases'
    coefficients of `--codebook-tasks` calibration-part documents a family (the bases' own first), their first
    `--sink` rows left out."""
    if not widths:
        return subspace
    rows: dict[str, list[list[torch.Tensor]]] = {"keys": [], "values": []}              # per document, per layer
    for family in bq.BENCH_FAMILIES:
        for task in retrieval_tasks(family, args.subspace_length, args.codebook_tasks, bq.RANK_SEED + 7,
                                    engine.tokenizer, part="calibration"):
            keys, values = full_prefill(engine, task.document)
            rows["keys"].append([rope(k[0].float(), subspace.inv_freq, -1)[:, args.sink:] for k in keys])
            rows["values"].append([v[0].float()[:, args.sink:] for v in values])
    generator, books = torch.Generator().manual_seed(0), {}
    for side, bits in sorted(widths):
        bases = subspace.bases if side == "keys" else subspace.value_bases
        per_layer = [torch.cat(layer, 1) for layer in zip(*rows[side])]                  # per layer [h, M, D]
        books[side, bits] = [kv_codebooks.train(layer @ basis, bits, args.codebook_sample, generator)
                             for layer, basis in zip(per_layer, bases)]
        print(f"  codebooks: {side} in {bits} bits a channel, {per_layer[0].shape[1]} rows a head "
              f"({args.clock})", flush=True)
    return KeySubspace(subspace.bases, subspace.inv_freq, subspace.value_bases, books)


def fake_quant(x: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """x: [..., D] rounded to `bits`-bit integers per `group` channels and back, in x's dtype: from 4 bits
    symmetric (absmax, a float16 scale each), below 4 asymmetric (min and max, a float16 scale and zero each:
    a symmetric 2-bit code has only three levels)."""
    shape = x.shape
    assert shape[-1] % group == 0, (shape, group)
    groups = x.float().reshape(*shape[:-1], shape[-1] // group, group)            # [..., D / group, group]
    if bits < 4:
        return asymmetric_round(groups, bits, -1).reshape(shape).to(x.dtype)
    qmax = 2 ** (bits - 1) - 1
    scale = (groups.abs().amax(-1, keepdim=True) / qmax).clamp(min=kv_quant.MIN_SCALE).half().float()
    return (torch.round(groups / scale).clamp(-qmax, qmax) * scale).reshape(shape).to(x.dtype)


def asymmetric_round(x: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """x rounded to 2**bits levels between its min and max along `dim` (float16 scale and zero), and back."""
    lo, hi = x.amin(dim, keepdim=True).half().float(), x.amax(dim, keepdim=True)
    # a group of one value (the last block of tokens) has hi == lo: the floor keeps its scale a float16 normal
    scale = ((hi - lo) / (2 ** bits - 1)).clamp(min=kv_quant.MIN_SCALE).half().float()
    return torch.round((x - lo) / scale).clamp(0, 2 ** bits - 1) * scale + lo


def fake_quant_keys(rows: torch.Tensor, bits: int, mode: str, group: int) -> torch.Tensor:
    """rows: [1, h, n, D] keys rounded as `mode` says, and back."""
    if mode == "r":   # the engine's 6-bit keys are rounded so
        rot = kv_quant.rotation(rows.shape[-1], rows.device).to(rows.dtype)
        return fake_quant(rows @ rot, bits, group) @ rot.T
    if mode == "c":   # KIVI: per channel, over blocks of `group` tokens, asymmetric
        n = rows.shape[-2]
        blocks = [asymmetric_round(rows[..., i:i + group, :].float(), bits, -2) for i in range(0, n, group)]
        return torch.cat(blocks, -2).to(rows.dtype)
    return fake_quant(rows, bits, group)


PRE_ROPE = ("p", "q", "m", "v")   # key modes that round keys as they were before RoPE


def pre_rope_keys(rows: torch.Tensor, bits: Bits, group: int, inv_freq: torch.Tensor) -> torch.Tensor:
    """rows: [1, h, N, D] keys at positions 0..N-1, rounded before RoPE ("q": per channel over blocks of `group`
    tokens, KVQuant's pre-RoPE keys; "m": each head's mean key over the document taken out, kept in float32,
    the rest rounded per token after the Hadamard rotation) and rotated back."""
    unrotated = rope(rows.float(), inv_freq, -1)
    if bits.key_mode == "q":
        return rope(fake_quant_keys(unrotated, bits.keys, "c", group), inv_freq, 1).to(rows.dtype)
    mean = unrotated.mean(-2, keepdim=True)                                           # [1, h, 1, D]
    rounded = fake_quant_keys(unrotated - mean, bits.keys, "r", group) + mean
    return rope(rounded, inv_freq, 1).to(rows.dtype)


def subspace_keys(rows: torch.Tensor, bits: Bits, group: int, basis: torch.Tensor,
                  inv_freq: torch.Tensor) -> torch.Tensor:
    """rows: [1, h, N, D] keys at positions 0..N-1; basis [h, D, D]. Each key un-rotated from its position, kept
    as its `bits.key_rank` coefficients on the basis's top directions (rounded to `bits.keys` after a Hadamard
    rotation where the rank is a power of two, as the engine's 6-bit keys are), rotated back."""
    projected = on_subspace(rope(rows.float(), inv_freq, -1), basis, bits.key_rank, bits.keys, group)
    return rope(projected, inv_freq, 1).to(rows.dtype)


def on_subspace(rows: torch.Tensor, basis: torch.Tensor, rank: int, bits: int, group: int) -> torch.Tensor:
    """rows [1, h, N, D] -> their projection on `basis`'s ([h, D, D]) top `rank` directions, the coefficients
    rounded to `bits` after an orthogonal rotation (a Hadamard matrix where the rank is a power of two, else a
    seeded random one) that evens their sizes out under one scale."""
    top = basis[..., :rank]                                                            # [h, D, r]
    coefficients = rows @ top                                                          # [1, h, N, r]
    if bits < 16:
        rot = coefficient_rotation(rank)
        coefficients = fake_quant(coefficients @ rot, bits, coefficient_group(rank, group)) @ rot.T
    return coefficients @ top.transpose(-1, -2)


def coefficient_rotation(rank: int) -> torch.Tensor:
    if rank & (rank - 1) == 0:
        return kv_quant.rotation(rank, torch.device("cpu"))
    return torch.linalg.qr(torch.randn(rank, rank, generator=torch.Generator().manual_seed(0))).Q


def coefficient_group(rank: int, group: int) -> int:
    return group if rank % group == 0 else rank


@dataclass(frozen=True)
class Point:
    """k KV heads whole with rows in `retrieval` bits; every other head's sink and window rows in `local` bits."""
    k: int
    retrieval: Bits
    local: Bits = Bits(16, 16)

    def __str__(self) -> str:
        local = "" if self.local == Bits(16, 16) else f":{self.local}"
        return f"{self.k}:{self.retrieval}{local}"


def codebook_keys(rows: torch.Tensor, basis: LayerBases) -> torch.Tensor:
    """rows: [1, h, N, D] keys at positions 0..N-1, coded before RoPE (kv_codebooks) and rotated back."""
    unrotated = rope(rows.float(), basis.inv_freq, -1)[0]
    coded = kv_codebooks.coded(unrotated, basis.keys, basis.key_books, basis.sink)
    return rope(coded[None], basis.inv_freq, 1).to(rows.dtype)


def round_rows(buffer, bits: Bits, group: int, basis: LayerBases | None = None) -> None:
    """A buffer's live keys and values rounded to `bits` in place (16: unrounded); `basis` for rows rounded before
    RoPE, on a subspace or as codes."""
    keys, values = buffer.keys, buffer.values                                        # views of the stores
    if bits.key_mode == "p":
        keys.copy_(subspace_keys(keys, bits, group, basis.keys, basis.inv_freq))
    elif bits.key_mode == "v":
        keys.copy_(codebook_keys(keys, basis))
    elif bits.key_mode in PRE_ROPE:
        keys.copy_(pre_rope_keys(keys, bits, group, basis.inv_freq))
    elif bits.keys < 16:
        keys.copy_(fake_quant_keys(keys, bits.keys, bits.key_mode, group))
    if bits.value_rank:
        values.copy_(on_subspace(values.float(), basis.values, bits.value_rank, bits.values, group).to(values.dtype))
    elif bits.value_codes:
        coded = kv_codebooks.coded(values[0].float(), basis.values, basis.value_books, basis.sink)
        values.copy_(coded[None].to(values.dtype))
    elif bits.values < 16:
        values.copy_(fake_quant(values, bits.values, group))


def needs_subspace(bits: Bits) -> bool:
    return bits.key_mode in PRE_ROPE or bool(bits.value_rank) or bits.value_codes


def layer_bases(subspace: KeySubspace, i: int, heads: list[int], bits: Bits, sink: int) -> LayerBases:
    """Layer i's rows of `subspace` for its whole heads `heads`, with the codebooks `bits` reads."""
    def rows(tensors):
        return tensors[i][heads] if tensors else None
    return LayerBases(rows(subspace.bases), subspace.inv_freq, rows(subspace.value_bases),
                      rows(subspace.codebooks.get(("keys", bits.keys))) if bits.key_mode == "v" else None,
                      rows(subspace.codebooks.get(("values", bits.values))) if bits.value_codes else None, sink)


def quantised(point: Point, group: int, subspace: KeySubspace | None = None, sink: int = 0):
    """Within: every session `evaluation` builds holds its retrieval heads' rows rounded to `point.retrieval`
    and its local heads' sink and window rows to `point.local` (their compensation token stays float32)."""
    def quantise(state) -> None:
        for i, layer in enumerate(state.cache.layers):
            basis = None
            if needs_subspace(point.retrieval) and layer.retrieval is not None:
                assert layer.retrieval_length() == layer.seq_len, "subspace keys need every position's row"
                basis = layer_bases(subspace, i, layer.retrieval_heads, point.retrieval, sink)
            for buffer, bits in ((layer.retrieval, point.retrieval), (layer.local, point.local)):
                if buffer is not None:
                    round_rows(buffer, bits, group, basis)

    return bq.transformed_sessions(quantise)


def packed_nbytes(elements: int, bits: int, group: int, asymmetric: bool = False) -> int:
    """Integers plus a float16 scale per group (and a zero per group where the rounding is asymmetric)."""
    if bits == 16:
        return elements * FULL_ITEMSIZE
    return elements * bits // 8 + elements // group * SCALE_ITEMSIZE * (2 if asymmetric else 1)


def rows_nbytes(elements: int, bits: Bits, group: int, head_dim: int = 0) -> int:
    """Bytes `elements` keys and as many values take packed at `bits` (`head_dim` for rows on a subspace)."""
    return key_nbytes(elements, bits, group, head_dim) + value_nbytes(elements, bits, group, head_dim)


def key_nbytes(elements: int, bits: Bits, group: int, head_dim: int) -> int:
    if bits.key_mode == "v":   # codes only: a codebook belongs to the model
        return elements * bits.keys // 8
    if bits.key_mode == "p":
        return packed_nbytes(elements // head_dim * bits.key_rank, bits.keys, coefficient_group(bits.key_rank, group),
                             bits.keys < 4)
    return packed_nbytes(elements, bits.keys, group, bits.keys < 4 or bits.key_mode in ("c", "q"))


def value_nbytes(elements: int, bits: Bits, group: int, head_dim: int) -> int:
    if bits.value_codes:
        return elements * bits.values // 8
    if bits.value_rank:
        return packed_nbytes(elements // head_dim * bits.value_rank, bits.values,
                             coefficient_group(bits.value_rank, group), bits.values < 4)
    return packed_nbytes(elements, bits.values, group, bits.values < 4)


def packed_fraction(state, point: Point, group: int, sink: int = 0) -> float:
    """Bytes a packed store of this cache would hold, as a fraction of a 16-bit full cache's (coded rows' first
    `sink` rows in 16 bits besides their codes)."""
    held = full = 0
    for layer in state.cache.layers:
        head_dim = (layer.keys if layer.keys is not None else layer.local_keys).shape[-1]
        full += 2 * layer.n_kv_heads * layer.seq_len * head_dim * FULL_ITEMSIZE
        if layer.keys is not None:
            held += rows_nbytes(layer.keys.numel(), point.retrieval, group, head_dim)
            if point.retrieval.key_mode == "m":   # each head's mean key, float32
                held += layer.keys.shape[1] * head_dim * 4
            coded_sides = (point.retrieval.key_mode == "v") + point.retrieval.value_codes
            held += coded_sides * layer.keys.shape[1] * sink * head_dim * FULL_ITEMSIZE
        if layer.local_keys is not None:
            held += rows_nbytes(layer.local_keys.numel(), point.local, group)
        if layer.comp_keys is not None:
            held += 2 * layer.comp_keys.numel() * 4
    return held / full


def parse_bits(text: str) -> Bits:
    """'8' -> keys and values in 8 bits; '8/4' -> keys in 8, values in 4; '4r/2': keys in 4 bits after a
    Hadamard rotation, values in 2; '4c/4': keys per channel (KIVI); '6p32/4': keys as 6-bit coefficients on
    their top 32 directions before RoPE (KeySubspace); '4v/4v': keys before RoPE and values as 8-bit codes a pair
    of channels (kv_codebooks)."""
    key, _, value = text.partition("/")
    match = re.fullmatch(r"(\d+)([rcpqmv]?)(\d*)", key)
    value_match = re.fullmatch(r"(\d+)(?:p(\d+)|(v))?", value or match[1] if match else "")
    if match is None or value_match is None or bool(match[3]) != (match[2] == "p"):
        raise SystemExit(f"keys' bits are a width, then r, c, q, m, v or p<rank> (e.g. 6r, 4c, 6p32); values' a "
                         f"width, then p<rank>, v or nothing; got {text!r}")
    bits = Bits(int(match[1]), int(value_match[1]), match[2], int(match[3] or 0), int(value_match[2] or 0),
                bool(value_match[3]))
    if not {bits.keys, bits.values} <= {2, 3, 4, 5, 6, 8, 16}:
        raise SystemExit(f"bits must be 2-6, 8 or 16 (unrounded), for keys/values, got {text!r}")
    if not all(1 <= int(rank) <= 64 for rank in (match[3], value_match[2]) if rank):
        raise SystemExit(f"a subspace's rank is 1 to SmolLM2's 64 channels a head, got {text!r}")
    coded = [width for width, on in ((bits.keys, bits.key_mode == "v"), (bits.values, bits.value_codes)) if on]
    if not all(2 <= width <= 5 for width in coded):
        raise SystemExit(f"codes are 2 to 5 bits a channel (a codebook of 16 to 1,024 centroids a pair), got {text!r}")
    return bits


def points(spec: list[str]) -> list[Point]:
    """'45:8/4' -> 45 KV heads whole in 8/4 bits; '45:8/4:8/4' -> and the local heads' rows in 8/4 too."""
    out = []
    for item in spec:
        k, bits, *local = item.split(":")
        point = Point(int(k), parse_bits(bits), *map(parse_bits, local))
        if needs_subspace(point.local):
            raise SystemExit(f"local rows do not hold every position, so their keys cannot be on a subspace: {item}")
        out.append(point)
    return out


def run(args) -> dict:
    loaded = load_model("smollm2", "cpu")
    engine, shipped = Engine(loaded), shipped_head_map(loaded.fingerprint)
    order = bq.saved_or_trained_order(engine, args)
    compression = CompressionParams(sink=args.sink, min_window=args.window, ratio=args.ratio)
    maps = {point: bq.make_map(shipped, order[:point.k], compression, "quantised") for point in points(args.points)}
    subspace = None
    if any(needs_subspace(point.retrieval) for point in maps):
        with_bases = any(point.retrieval.key_mode in ("p", "v") or point.retrieval.value_rank
                         or point.retrieval.value_codes for point in maps)
        subspace = key_subspace(engine, args.subspace_length, args.subspace_tasks if with_bases else 0)
        print(f"  key subspace: {args.subspace_tasks if with_bases else 0} calibration documents a family at "
              f"{args.subspace_length} tokens ({args.clock})", flush=True)
        subspace = with_codebooks(engine, subspace, code_widths(maps), args)
    full = HeadMap.full(loaded.fingerprint)
    results: dict = {"full": {}, "points": {str(point): {} for point in maps},
                     "seeds": {n: bq.documents_seed(n, args.seed) for n in args.lengths}}
    for n in args.lengths:
        tasks = [t for family in args.families
                 for t in retrieval_tasks(family, n, args.tasks, results["seeds"][n], engine.tokenizer, part="bench")]
        for start in range(0, len(tasks), args.chunk):    # each chunk's full caches dropped before the next
            chunk = tasks[start:start + args.chunk]
            kvs = [full_prefill(engine, t.document) for t in chunk]
            results["full"][n] = bq.merged(results["full"].get(n), bq.evaluate(engine, chunk, kvs, full))
            for point, hm in maps.items():
                results["points"][str(point)][n] = score_point(engine, point, hm, chunk, kvs, args,
                                                               results["points"][str(point)].get(n), subspace)
            print(f"  {n} tokens: {start + len(chunk)}/{len(tasks)} tasks, {len(maps)} points ({args.clock})",
                  flush=True)
            del kvs
    return results


def key_errors(args) -> None:
    """Relative squared error of every layer's keys rounded each way, on one bench document of each length (mean
    and worst layer): how much rotating (r) or rounding per channel (c) helps at each width."""
    loaded = load_model("smollm2", "cpu")
    engine = Engine(loaded)
    for n in args.lengths:
        task = retrieval_tasks("multi", n, 1, bq.BENCH_SEED + n, engine.tokenizer, part="bench")[0]
        keys, _ = full_prefill(engine, task.document)
        rows = []
        for bits in (8, 6, 5, 4):
            for mode in ("", "r", "c"):
                errors = [float((fake_quant_keys(k, bits, mode, args.group) - k).pow(2).mean() / k.pow(2).mean())
                          for k in keys]
                rows.append([f"{bits}{mode}", f"{sum(errors) / len(errors):.2e}", f"{max(errors):.2e}"])
        print(f"\nKeys of every layer rounded, one {n}-token document: relative squared error\n")
        print(common.table(["key bits", "mean over layers", "worst layer"], rows))


def adjacent_layer_cosines(rows: list[torch.Tensor]) -> list[float]:
    """Per adjacent pair of layers, the mean over tokens of the cosine between a token's rows in the two layers,
    every KV head's row joined into one vector as MiniCache compares them. rows: per layer [1, Hkv, N, D]."""
    joined = [r[0].transpose(0, 1).flatten(1).float() for r in rows]                 # per layer [N, Hkv * D]
    return [float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean()) for a, b in zip(joined, joined[1:])]


def layer_cosines(args) -> None:
    """Could adjacent layers share one cache (MiniCache merges them from the middle layer on, where it found their
    rows nearly parallel)? One bench document of each length. RoPE turns both layers' keys at a position by the
    same angles, so the keys' cosines are those before RoPE too."""
    engine = Engine(load_model("smollm2", "cpu"))
    for n in args.lengths:
        task = retrieval_tasks("multi", n, 1, bq.BENCH_SEED + n, engine.tokenizer, part="bench")[0]
        keys, values = full_prefill(engine, task.document)
        rows = []
        for name, cached in (("keys", keys), ("values", values)):
            cos = adjacent_layer_cosines(cached)
            deep = cos[len(cos) // 2:]
            rows.append([name, f"{sum(cos) / len(cos):+.3f}", f"{sum(deep) / len(deep):+.3f}",
                         f"{min(cos):+.3f} / {max(cos):+.3f}"])
        print(f"\nAdjacent layers' rows, one {n}-token document: mean cosine over tokens\n")
        print(common.table(["rows", "every pair", "deeper half", "lowest / highest pair"], rows))


def score_point(engine, point: Point, hm: HeadMap, tasks, kvs, args, into: dict | None,
                subspace: KeySubspace | None = None) -> dict:
    """One point's hits on a chunk of tasks merged `into` the earlier chunks'; its bytes from the first task."""
    with quantised(point, args.group, subspace, args.sink):
        result = bq.evaluate(engine, tasks, kvs, hm)
        if into is None:
            state = evaluation.session_from_full(engine, tasks[0].document, kvs[0], hm)
            result["bytes"] = packed_fraction(state, point, args.group, args.sink)
    return bq.merged(into, result)


def merged_results(runs: list[dict]) -> dict:
    """Several runs' results as one: their points side by side, over the first run's full cache (every run must
    have scored the same documents: the full cache's answers are compared)."""
    full = runs[0]["full"]
    assert all(run["full"] == full for run in runs), "the runs scored different documents"
    return {"full": full, "points": {key: per for run in runs for key, per in run["points"].items()},
            "seeds": runs[0].get("seeds", {})}


def kept(results: dict, key: str, family: str) -> list[float]:
    return [bq.cell(results["points"][key][n], results["full"][n], family)[1] for n in results["full"]]


def scored_families(results: dict) -> list[str]:
    """The families the run scored (`--families`), in the bench's order."""
    first = next(iter(results["full"].values()))
    return [f for f in bq.BENCH_FAMILIES if f in first["hits"]]


def print_table(results: dict, args) -> None:
    lengths, families = " / ".join(map(str, results["full"])), scored_families(results)
    seeds = " / ".join(str(results.get("seeds", {}).get(n, bq.documents_seed(int(n)))) for n in results["full"])
    answered = ", ".join(f"{f} {' / '.join(str(sum(results['full'][n]['hits'][f])) for n in results['full'])}"
                         for f in families)
    rows = [[*key.split(":", 1), " / ".join(f"{per[n]['bytes']:.3f}" for n in results["full"]),
             *[" / ".join(f"{x:.0%}" for x in kept(results, key, f)) for f in families],
             " · ".join(lost_gained(per[n], results["full"][n]) for n in results["full"])]
            for key, per in results["points"].items()]
    print(f"\nShare of the full cache's answers kept at {lengths} tokens ({args.tasks} documents per family and "
          f"length, seed {seeds}, {window_text(args)}, sink {args.sink}, groups of {args.group}; the full cache "
          f"answers {answered})\n")
    print(common.table(["KV heads full", "bits (whole:local)", f"bytes / 16-bit full @{lengths}",
                        *families, "lost / gained"], rows))


def window_text(args) -> str:
    return f"window {args.window}" if args.ratio >= 1e9 else f"window max({args.window}, N / {args.ratio:g})"


def lost_gained(result: dict, full: dict) -> str:
    lost, gained = bq.flips(result, full)
    return f"{lost}/{gained} (p {bq.mcnemar_p(lost, gained):.2g})"


def summary(results: dict) -> dict:
    """{"k:bits": {"bytes", "lost", "gained"}} at the first length (answers over every family against the full
    cache's): the plot's data."""
    first = next(iter(results["full"]))
    return {key: dict(zip(("lost", "gained"), bq.flips(per[first], results["full"][first])), bytes=per[first]["bytes"])
            for key, per in results["points"].items()}


def plot(points: dict, args, path: Path) -> None:
    """Answers lost (filled) and gained (hollow) against the bytes, one pair of markers per point, labelled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = sorted((key for key in points if points[key]["bytes"] <= args.plot_below),
                  key=lambda key: points[key]["bytes"])
    fig, ax = plt.subplots(figsize=(10, 5))
    for i, key in enumerate(keys):
        x, colour = 100 * points[key]["bytes"], "C1" if key.count(":") > 1 else "C0"
        ax.plot(x, points[key]["lost"], "o", color=colour, ms=6)
        ax.plot(x, points[key]["gained"], "o", mfc="none", color=colour, ms=6)
        ax.annotate(key, (x, points[key]["lost"]), xytext=(4, 6 + 9 * (i % 3)), textcoords="offset points",
                    fontsize=7, rotation=30)
    ax.plot([], [], "o", color="C0", label="lost (local rows 16-bit)")
    ax.plot([], [], "o", color="C1", label="lost (local rows in integers too)")
    ax.plot([], [], "o", mfc="none", color="gray", label="gained")
    ax.axvline(25, color="red", lw=0.8, ls="-.")
    ax.set(xlabel=f"KV bytes kept at {args.lengths[0]} tokens (% of a 16-bit full cache)",
           ylabel="answers lost / gained against the full cache", ylim=(-0.5, None))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"SmolLM2-135M, {args.tasks} documents per family: k KV heads whole, keys/values bits (r: keys "
                 f"rotated), :local rows' bits;\nlocal heads sink {args.sink} + {window_text(args)} (red: 25% of "
                 "the bytes)", fontsize=9)
    common.save_figure(fig, path)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: 400 tokens, 2 tasks, three points")
    ap.add_argument("--points", nargs="+", default=["20:16", "45:16", "40:8", "45:8", "45:4", "60:4", "75:4", "90:8",
                                                     "90:4"], help="KV heads full:bits or :key bits/value bits (16 = unrounded)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[1000, 2000])
    ap.add_argument("--tasks", type=int, default=12, help="bench tasks per family and length")
    ap.add_argument("--seed", type=int, help="the documents' seed (default 777000 + length, bench_quality's); "
                                             "another seed draws other documents from the bench part")
    ap.add_argument("--families", nargs="+", default=list(bq.BENCH_FAMILIES), choices=bq.BENCH_FAMILIES,
                    help="the families scored (default: every one)")
    ap.add_argument("--chunk", type=int, default=24, help="tasks prefilled (and held in memory) at a time")
    ap.add_argument("--results", nargs="+", default=[],
                    help="JSON results: one path is written after a run; if every path exists, they are read (runs "
                         "on the same documents, their points merged) and only the table and plot are made")
    ap.add_argument("--key-error", action="store_true", help="only print the keys' rounding error per bits and mode")
    ap.add_argument("--layer-cosine", action="store_true", help="only print how parallel adjacent layers' rows "
                    "are (could layers share a cache, as MiniCache's do?)")
    ap.add_argument("--window", type=int, default=32, help="local heads' window (its least, with --ratio)")
    ap.add_argument("--ratio", type=float, default=1e9, help="local window max(--window, N / ratio); "
                    "default: a fixed window (the shipped map's ratio is 10)")
    ap.add_argument("--sink", type=int, default=4)
    ap.add_argument("--group", type=int, default=32, help="channels per scale (SmolLM2's heads have 64)")
    ap.add_argument("--subspace-length", type=int, default=1000, help="calibration documents' length for keys "
                    "on a subspace ('p' points)")
    ap.add_argument("--subspace-tasks", type=int, default=2, help="calibration documents a family for the key "
                    "subspace")
    ap.add_argument("--codebook-tasks", type=int, default=3, help="calibration documents a family whose rows "
                    "train the codebooks ('v' points)")
    ap.add_argument("--codebook-sample", type=int, default=8192, help="rows a head each codebook learns from")
    bq.add_order_args(ap)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--png", default=None, help="plot path (default docs/kv-quant.png)")
    ap.add_argument("--plot-below", type=float, default=1.0, help="plot only the points holding at most this "
                    "share of the bytes (the table keeps every point)")
    args = ap.parse_args()
    if args.quick:
        args.lengths, args.tasks, args.points = [400], 2, ["20:16", "45:8", "45:4"]
        args.gate_tasks, args.gate_steps = 1, 10
    args.png = common.plot_path(args, "kv-quant.png")
    return args


def main() -> None:
    args = parse_args()
    common.begin(args)
    if args.key_error or args.layer_cosine:
        (key_errors if args.key_error else layer_cosines)(args)
        return
    if args.results and all(Path(path).exists() for path in args.results):
        results = merged_results([json.loads(Path(path).read_text()) for path in args.results])
    else:
        results = run(args)
        if args.results:
            Path(args.results[0]).write_text(json.dumps(results))
    print_table(results, args)
    plot(summary(results), args, Path(args.png))
    print(f"\nplot: {args.png}\nbench_kv_quant: {args.clock}")


if __name__ == "__main__":
    main()
