"""Retrieval heads in 8 bits, or 8- or 6-bit keys with 4-bit values: the quantiser, the integer KVBuffers, the
decode slab, spills and calibration."""
from __future__ import annotations

import pytest
import torch

from services.engine import (CalibrationParams, CompressionParams, Engine, HeadMap, ProfileParams, SamplingParams,
                             SchedulerConfig, SessionState, calibrate, forward, forward_all, kv_quant, profile_model)
from services.engine.evaluation import full_prefill, session_from_full
from services.engine.kvbuffer import Int4ValuesKVBuffer, Int6KeysKVBuffer, QuantizedKVBuffer
from services.engine.slab import DecodeSlab, size_class, slot_bytes
from services.inference import codec, spilled_header
from services.inference.spilled_header import HeaderInvalid, ModelShape
from tests.engine_models import smollm2, tiny
from tests.planted_loaded import planted_loaded
from tests.test_engine_batching import (LOGPROB_ATOL, SMALL, Job, assert_same_conversation, greedy, ids, run_alone,
                                        run_batched, stored_in)


def in_8_bits(head_map: HeadMap) -> HeadMap:
    return stored_in(head_map, 8)


@pytest.fixture(scope="module")
def maps():
    loaded = tiny()
    profiled = profile_model(loaded, ProfileParams(seq_len=16, n_samples=1), SMALL)
    assert 0 < profiled.kv_fraction < 1
    return {"16": profiled, "8": in_8_bits(profiled), "full8": in_8_bits(HeadMap.full(loaded.fingerprint, SMALL)),
            "8/4": stored_in(profiled, "8/4"), "6/4": stored_in(profiled, "6/4"),
            # retrieval : local rows (16 for the local rows when not named)
            "6/4:6/4": stored_in(profiled, "6/4", "6/4"), "16:8": stored_in(profiled, 16, 8),
            # + the last 5 tokens of each group also in float32 (SMALL's window is 8, so the local group keeps 5)
            "6/4:6/4+r5": stored_in(profiled, "6/4", "6/4", recent=5), "8+r5": stored_in(profiled, 8, recent=5),
            "6/4:6/4+l5": stored_in(profiled, "6/4", "6/4", local_recent=5)}   # the local group's only


# ---- the quantiser ----------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 6, 4])
@pytest.mark.parametrize("head_dim", [64, 16])   # two groups of 32 a row; one group (32 does not divide 16)
def test_quantize_rounds_each_group_within_half_a_step(head_dim, bits):
    x = torch.randn(2, 3, 50, head_dim) * torch.logspace(-3, 2, 50)[:, None]   # rows from 1e-3 to 1e2
    x[0, 0, 0] = 0.0                                                             # an all-zero row
    q, scale = kv_quant.quantize(x, bits)
    assert q.dtype == {8: torch.int8, 6: torch.uint8, 4: torch.uint8}[bits] and scale.dtype == torch.float16
    assert q.shape == (2, 3, 50, head_dim * bits // 8)       # 6 bits: four channels in three bytes; 4: two a byte
    assert scale.shape == (2, 3, 50, kv_quant.scale_width(head_dim)) and (scale > 0).all()
    back = kv_quant.dequantize(q, scale, torch.float32, bits)
    # 6 bits round the channels after a fixed rotation (undone by dequantize): the bounds hold in its basis
    rot = kv_quant.rotation(head_dim, x.device) if bits in kv_quant.ROTATED else torch.eye(head_dim)
    assert torch.allclose(rot @ rot.T, torch.eye(head_dim), atol=1e-6)
    x, back = x @ rot, back @ rot
    step = scale.float().repeat_interleave(kv_quant.group_size(head_dim), dim=-1)
    assert ((back - x).abs() <= step / 2 + 1e-5 * x.abs().amax(-1, keepdim=True)).all()
    ints = kv_quant.integers(q, bits)
    assert ints.abs().max() == kv_quant.QMAX[bits] and back[0, 0, 0].abs().max() == 0
    assert torch.equal(ints, torch.round(back / step))   # the unpacked integers are the rounded channels, in order


def test_6bit_keys_rounded_in_the_rotated_basis_err_less_on_outlier_channels():
    """Keys with a few large channels (as RoPE'd keys have): rounding after the rotation spreads them, so the
    error is several times smaller than rounding the raw channels to the same 6 bits, and 6-bit keys stay far
    closer to 8-bit ones than 4-bit keys do."""
    x = torch.randn(4, 200, 64, generator=torch.Generator().manual_seed(3))
    x[..., [5, 37]] *= 25

    def error(bits, rotate=True):
        if rotate:
            back = kv_quant.dequantize(*kv_quant.quantize(x, bits), torch.float32, bits)
        else:   # the same 6-bit grid on the raw channels
            groups = x.unflatten(-1, (2, 32))
            scale = groups.abs().amax(-1, keepdim=True) / kv_quant.QMAX[bits]
            back = (torch.round(groups / scale) * scale).flatten(-2)
        return float((back - x).pow(2).mean() / x.pow(2).mean())

    assert error(6) < error(6, rotate=False) / 3
    assert error(8) < error(6) < error(4) / 10


def test_rotated_keys_read_in_their_basis_give_the_same_scores_to_a_rotated_query():
    """The decode slab reads 6-bit keys without rotating them back and rotates the query instead: q.k agrees."""
    gen = torch.Generator().manual_seed(4)
    keys, query = torch.randn(2, 3, 40, 64, generator=gen), torch.randn(2, 3, 1, 64, generator=gen)
    stored = kv_quant.quantize(keys, 6)
    rotation = kv_quant.rotation(64, keys.device)
    plain = kv_quant.dequantize(*stored, torch.float32, 6)
    in_basis = kv_quant.dequantize(*stored, torch.float32, 6, unrotate=False)
    assert not torch.allclose(in_basis, plain, atol=1e-2)   # really another basis
    torch.testing.assert_close(in_basis @ rotation.T, plain, atol=1e-5, rtol=0)
    torch.testing.assert_close((query @ rotation) @ in_basis.transpose(-1, -2), query @ plain.transpose(-1, -2),
                               atol=1e-4, rtol=0)
    # bits that are not rotated ignore it
    eight = kv_quant.quantize(keys, 8)
    assert torch.equal(kv_quant.dequantize(*eight, torch.float32, 8, unrotate=False),
                       kv_quant.dequantize(*eight, torch.float32, 8))


def test_row_bytes_in_8_bits_are_about_half_of_16_and_4_bit_values_a_quarter():
    assert kv_quant.row_nbytes(64, 16, 2) == 128 and kv_quant.row_nbytes(64, 8, 2) == 64 + 2 * 2
    assert kv_quant.row_nbytes(64, 16, 4) == 256 and kv_quant.row_nbytes(16, 8, 4) == 16 + 2
    assert kv_quant.row_nbytes(64, 4, 2) == 32 + 2 * 2 and kv_quant.row_nbytes(64, 6, 2) == 48 + 2 * 2
    assert CompressionParams(retrieval_bits=8, retrieval_value_bits=4).retrieval_row_nbytes(64, 2) == 68 + 36
    assert CompressionParams(retrieval_bits=6, retrieval_value_bits=4).retrieval_row_nbytes(64, 2) == 52 + 36


@pytest.mark.parametrize("recent", [0, 5])
@pytest.mark.parametrize("cls", [QuantizedKVBuffer, Int4ValuesKVBuffer, Int6KeysKVBuffer])
def test_quantized_kvbuffer_matches_a_dequantised_reference_through_append_evict_shrink(cls, recent):
    """Rows read rounded, except the last `recent` appended: those are read as appended (never evicted: a local
    group's window keeps at least as many)."""
    heads, dim, k_bits, v_bits = 3, 64, cls.KEY_BITS, cls.VALUE_BITS
    buf = cls(heads, dim, torch.float32, "cpu", recent=recent)
    ref_k, ref_v = torch.empty(1, heads, 0, dim), torch.empty(1, heads, 0, dim)
    raw_k, raw_v = ref_k, ref_v                                                        # every row as appended
    gen = torch.Generator().manual_seed(1)
    for step in range(200):
        q = 1 if step % 3 else int(torch.randint(1, 25, (1,), generator=gen))
        k, v = torch.randn(1, heads, q, dim, generator=gen), torch.randn(1, heads, q, dim, generator=gen)
        buf.append(k, v)
        ref_k = torch.cat([ref_k, kv_quant.dequantize(*kv_quant.quantize(k, k_bits), torch.float32, k_bits)], 2)
        ref_v = torch.cat([ref_v, kv_quant.dequantize(*kv_quant.quantize(v, v_bits), torch.float32, v_bits)], 2)
        raw_k, raw_v = torch.cat([raw_k, k], 2), torch.cat([raw_v, v], 2)
        if step % 4 == 3 and len(buf) > 6 + recent:
            n_keep, n_drop = 2, int(torch.randint(1, len(buf) - 2 - recent, (1,), generator=gen))
            buf.evict(n_keep, n_drop)
            ref_k = torch.cat([ref_k[:, :, :n_keep], ref_k[:, :, n_keep + n_drop:]], 2)
            ref_v = torch.cat([ref_v[:, :, :n_keep], ref_v[:, :, n_keep + n_drop:]], 2)
            buf.shrink()
        m = min(recent, raw_k.shape[2])
        want_k, want_v = ref_k.clone(), ref_v.clone()
        if m:
            want_k[:, :, -m:], want_v[:, :, -m:] = raw_k[:, :, -m:], raw_v[:, :, -m:]
        assert torch.equal(buf.keys, want_k) and torch.equal(buf.values, want_v)
        # 8- or 6-bit keys and 8- or 4-bit values, each with two float16 scales a row; the recent rows in float32
        assert buf.nbytes() == heads * buf.capacity * (dim * (k_bits + v_bits) // 8 + 2 * 2 * 2) + heads * m * dim * 8
        assert buf.stored_nbytes() == heads * len(buf) * (dim * (k_bits + v_bits) // 8 + 8) + heads * m * dim * 8
    assert buf.keys.dtype == torch.float32 and buf.k_store.dtype == (torch.int8 if k_bits == 8 else torch.uint8)
    assert buf.v_store.dtype == (torch.uint8 if v_bits == 4 else torch.int8)


# ---- the engine: per-session and batched paths, bytes -----------------------------------------------
def batched_as_alone(maps, layouts: list[str], lengths: list[int], max_new: list[int], seed: int
                     ) -> tuple[list[Job], dict]:
    """Sessions of `maps[layouts[i]]` (odd ones with a second turn) run alone, then all batched in slabs: asserts
    each batched conversation is the one run alone; returns the batched jobs and the batch's step statistics."""
    engine = Engine(tiny(), maps["16"])

    def make(i):
        turns, params = [ids(lengths[i], seed + i)], [greedy(max_new[i])]
        if i % 2:
            turns.append(ids(4 + i, seed + 100 + i))
            params.append(greedy(6))
        return Job(f"{layouts[i]}#{i}", maps[layouts[i]], turns, params)

    alone = [run_alone(engine, make(i)) for i in range(len(layouts))]
    batched = [make(i) for i in range(len(layouts))]
    stats = run_batched(engine, batched, SchedulerConfig(max_running=8, step_tokens=512))
    for got, want in zip(batched, alone):
        assert_same_conversation(got, want)
    return batched, stats


def test_8bit_sessions_batched_equal_each_alone_and_store_int8(maps):
    """Eight sessions (8-bit, 16-bit, local rows in integers and an all-retrieval 8-bit map) decoding together in
    slabs produce what each produces alone; each cache holds its rows in the integers its map names."""
    layouts = ["8", "16", "8/4", "full8", "6/4", "6/4:6/4", "16:8", "full8"]
    batched, stats = batched_as_alone(maps, layouts, [5, 12, 19, 27, 33, 41, 50, 64], [9, 14, 6, 12, 20, 7, 11, 16],
                                      seed=300)
    assert stats["max_running"] == 8
    for job in batched:
        c, layers = job.head_map.compression, job.state.cache.layers
        for group, bits in (("retrieval", (c.retrieval_bits, c.value_bits)), ("local", c.local_storage_bits)):
            buffers = [getattr(layer, group) for layer in layers if getattr(layer, group) is not None]
            want = [kv_quant.store_dtype(b, torch.float32) for b in bits]
            assert all([b.k_store.dtype, b.v_store.dtype] == want for b in buffers), (job.name, group)
        assert any(layer.retrieval is not None for layer in layers), job.name


def test_recent_rows_batched_equal_each_alone_and_hold_each_groups_last_tokens(maps):
    """Sessions whose integer groups keep their last 5 tokens in float32 too, shorter and longer than that, decoding
    in slabs beside 16-bit and 6/4 ones without recent rows: each produces what it produces alone, and holds its
    last min(5, N) tokens (the local group's too: SMALL's window keeps 8)."""
    layouts = ["6/4:6/4+r5", "8+r5", "16", "6/4:6/4+l5", "6/4:6/4", "8+r5", "6/4:6/4+r5"]
    batched, _ = batched_as_alone(maps, layouts, [2, 3, 12, 20, 26, 33, 47], [2, 9, 14, 6, 8, 12, 10], seed=500)
    for got in batched:
        for layer in got.state.cache.layers:
            for buffer, recent in zip((layer.retrieval, layer.local), got.head_map.compression.recent):
                if buffer is not None:
                    assert buffer.k_recent.shape[2] == min(recent, layer.seq_len), got.name


def test_a_session_within_its_recent_rows_reads_what_16_bits_read_and_past_them_rounded_rows(maps):
    """With 8 recent rows (SMALL's window is 8) a 7-token conversation is read as computed: it answers what the
    16-bit map answers, where the same 6/4 map without recent rows does not; once it grows past them the rounded
    rows count again."""
    engine = Engine(tiny(), maps["16"])
    recent8 = stored_in(maps["16"], "6/4", "6/4", recent=8)
    prompt = ids(4, 700)
    runs = {name: run_alone(engine, Job(name, hm, [prompt], [greedy(4)]))
            for name, hm in (("16", maps["16"]), ("r8", recent8), ("6/4", maps["6/4:6/4"]))}
    lps = {name: torch.tensor(job.logprobs[0]) for name, job in runs.items()}
    torch.testing.assert_close(lps["r8"], lps["16"], atol=LOGPROB_ATOL, rtol=0)
    assert (lps["6/4"] - lps["16"]).abs().max() > 10 * LOGPROB_ATOL
    longer = {name: run_alone(engine, Job(name, hm, [ids(40, 701)], [greedy(3)]))
              for name, hm in (("16", maps["16"]), ("r8", recent8))}
    assert (torch.tensor(longer["r8"].logprobs[0]) - torch.tensor(longer["16"].logprobs[0])).abs().max() > LOGPROB_ATOL


@pytest.mark.parametrize("storage", ["8", "8/4", "6/4", "6/4:6/4", "16:8", "6/4:6/4+r5", "8+r5"])
def test_8bit_slot_bytes_are_what_the_slab_allocates_and_within_the_bound(maps, storage):
    engine = Engine(tiny(), maps[storage])
    head_dim, dtype = engine.dims.head_dim, engine.loaded.dtype
    cache = engine.new_cache(maps[storage])
    forward_all(engine.model, ids(40, 9), cache)
    stored_before = cache.stored_nbytes()
    slab = DecodeSlab(cache, size_class(60), head_dim, dtype, engine.device)
    slab.set_members([cache])
    key_bits = maps[storage].compression.retrieval_bits
    local_key_bits = maps[storage].compression.local_storage_bits[0]
    # Every layer's slot keys in their storage's dtype and width; a layer without retrieval (or local) heads has
    # none, and at least one layer has each, so the check never passes vacuously.
    with_retrieval = [slots for slots, r in zip(slab.storage, slab.r_heads) if r]
    with_local = [slots for slots, l in zip(slab.storage, slab.l_heads) if l]
    assert with_retrieval and with_local, "the profiled map mixes retrieval and local heads"
    assert all(slots.keys is None for slots, r in zip(slab.storage, slab.r_heads) if not r)
    for slots in with_retrieval:
        assert slots.keys is not None and (slots.keys.dtype, slots.keys.shape[-1]) == (
            kv_quant.store_dtype(key_bits, dtype), kv_quant.store_width(head_dim, key_bits))
    for slots in with_local:
        assert slots.local_keys is not None and (slots.local_keys.dtype, slots.local_keys.shape[-1]) == (
            kv_quant.store_dtype(local_key_bits, dtype), kv_quant.store_width(head_dim, local_key_bits))
    assert cache.nbytes() == slot_bytes(cache, slab.rows, head_dim, dtype.itemsize)
    assert cache.nbytes() <= cache.bytes_bound(60, 1, head_dim, dtype.itemsize)
    sixteen = engine.new_cache(maps["16"])
    forward_all(engine.model, ids(40, 9), sixteen)
    assert slot_bytes(cache, slab.rows, head_dim, 4) < slot_bytes(sixteen, slab.rows, head_dim, 4)
    slab.set_members([])
    assert cache.stored_nbytes() == stored_before   # unseated: the same int8 rows and scales, compacted


@pytest.mark.slow
def test_8bit_retrieval_heads_halve_their_bytes_and_keep_smollm2s_next_token():
    """On SmolLM2 with the shipped map's heads, 8-bit retrieval rows hold about half of 16-bit ones' bytes (counted as
    16-bit) and a quarter of float32's (as stored here), and the next-token distribution barely moves."""
    from services.engine.headmap import shipped_head_map

    loaded = smollm2()
    shipped = shipped_head_map(loaded.fingerprint)
    hm16, hm8 = stored_in(shipped, 16), stored_in(shipped, 8)
    prompt = ids(600, 11)
    logprobs, caches = {}, {}
    for name, hm in (("16", hm16), ("8", hm8), ("8/4", stored_in(shipped, "8/4")), ("6/4", stored_in(shipped, "6/4"))):
        cache = Engine(loaded, hm).new_cache(hm)
        logprobs[name] = forward(loaded.model, prompt, cache).log_softmax(-1)
        caches[name] = cache

    def kl(p, q):
        return float((p.exp() * (p - q)).sum())

    assert kl(logprobs["16"], logprobs["8"]) < 1e-3 and logprobs["16"].argmax() == logprobs["8"].argmax()
    # 4-bit values move it more (1.9e-3 here; on these random-token prompts the top two tokens are a near-tie that
    # it flips, so its quality is the benches' to measure: docs 3.2l and 3.2m)
    assert kl(logprobs["16"], logprobs["8/4"]) < 1e-2 and kl(logprobs["16"], logprobs["6/4"]) < 1e-2
    # The benches derive 8-bit caches from an exact prefill (`from_full`); the engine's prefill attends over rows
    # already rounded. The next token after either is the same distribution, to well within the rounding's own.
    engine = Engine(loaded, hm8)
    prefilled = engine.new_cache(hm8)
    forward(loaded.model, prompt[:-1], prefilled)
    derived = session_from_full(engine, prompt[:-1], full_prefill(engine, prompt[:-1]), hm8).cache
    served, benched = (forward(loaded.model, prompt[-1:], c).log_softmax(-1) for c in (prefilled, derived))
    assert kl(served, benched) < 1e-3 and served.argmax() == benched.argmax()

    def retrieval_bytes(cache):
        return sum(layer.retrieval.nbytes() for layer in cache.layers if layer.retrieval is not None)

    assert retrieval_bytes(caches["8"]) / retrieval_bytes(caches["16"]) == pytest.approx((64 + 4) / 256, abs=1e-3)
    assert retrieval_bytes(caches["8/4"]) / retrieval_bytes(caches["16"]) == pytest.approx(
        (64 + 4 + 32 + 4) / 512, abs=1e-3)
    assert retrieval_bytes(caches["6/4"]) / retrieval_bytes(caches["16"]) == pytest.approx(
        (48 + 4 + 32 + 4) / 512, abs=1e-3)
    # counted as 16-bit, each retrieval head's share of the full cache shrinks from 128 to 64 + 4 bytes a row
    share = sum(map(len, hm16.retrieval_kv_heads)) / (loaded.fingerprint.n_layers * loaded.fingerprint.n_kv_heads)
    f16, f8, f84, f64 = (caches[name].bytes_fraction() for name in ("16", "8", "8/4", "6/4"))
    assert f16 - f8 == pytest.approx(share * (1 - 68 / 128), abs=1e-4)
    assert f16 - f84 == pytest.approx(share * (1 - (68 + 36) / 256), abs=1e-4)
    assert f16 - f64 == pytest.approx(share * (1 - (52 + 36) / 256), abs=1e-4)


# ---- spills -----------------------------------------------------------------------------------------
def assert_restores_bit_exact(engine: Engine, state: SessionState, params: SamplingParams) -> None:
    """A spill of `state` restores to the same tensors, and the restored session continues as the original."""
    tensors, meta = state.to_tensors()
    restored = SessionState.from_tensors({k: v.clone() for k, v in tensors.items()}, meta, "cpu")
    again, _ = restored.to_tensors()
    assert again.keys() == tensors.keys() and all(torch.equal(again[k], tensors[k]) for k in tensors)
    assert engine.continue_session(state, [70, 71], params).token_ids == \
        engine.continue_session(restored, [70, 71], params).token_ids


def spill_header(state: SessionState) -> dict:
    """The meta a spill of session "s1" writes beside `state`'s tensors."""
    return {"session_id": "s1", "fingerprint_id": state.fingerprint_id, "head_map_version": state.head_map_version,
            "token_count": len(state.token_ids), "nbytes": state.nbytes(), "full_nbytes": state.full_nbytes(),
            "stored_nbytes": state.stored_nbytes(), "created_at": 1.0, "last_used": 2.0, "dtype": "float32",
            "state": state.to_tensors()[1]}


@pytest.mark.parametrize("storage", ["8", "8/4", "6/4"])
def test_8bit_spill_round_trip_is_bit_exact_and_its_header_checks(maps, storage):
    loaded = tiny()
    engine = Engine(loaded, maps[storage])
    params = SamplingParams(max_new_tokens=8)
    state, _ = engine.generate(ids(90, 21), params)
    tensors, meta = state.to_tensors()
    key_bits, value_bits = kv_quant.parse_storage(storage)
    head_dim = engine.dims.head_dim
    assert tensors["0.key_scales"].dtype == torch.float16
    for name, bits in (("0.keys", key_bits), ("0.values", value_bits)):   # 6 and 4 bits packed in bytes
        assert (tensors[name].dtype, tensors[name].shape[-1]) == (kv_quant.store_dtype(bits, torch.float32),
                                                                  head_dim * bits // 8), name
    assert meta["cache"]["params"]["retrieval_bits"] == key_bits and meta["cache"]["dtype"] == "float32"
    assert meta["cache"]["params"].get("retrieval_value_bits", key_bits) == value_bits
    assert_restores_bit_exact(engine, state, params)
    header = spill_header(state)
    spilled_header.check(codec.read_header(codec.encode(state.to_tensors()[0], header).header), "s1",
                         ModelShape.of(loaded))
    as_floats = {k: (v.float() if k.endswith(".keys") else v) for k, v in state.to_tensors()[0].items()}
    wrong = codec.read_header(codec.encode(as_floats, {**header, "stored_nbytes": sum(
        t.numel() * t.element_size() for t in as_floats.values())}).header)
    with pytest.raises(HeaderInvalid, match="keys"):
        spilled_header.check(wrong, "s1", ModelShape.of(loaded))
    # rows said to be stored in bits other than those they are (values 8 <-> 4, keys 6 -> 8): refused before any
    # tensor is read
    other = {**header["state"]["cache"]["params"], **({"retrieval_bits": 8} if key_bits == 6 else
                                                      {"retrieval_value_bits": 8 if value_bits == 4 else 4})}
    relabelled = {**header, "state": {**header["state"], "cache": {**header["state"]["cache"], "params": other}}}
    with pytest.raises(HeaderInvalid, match="keys" if key_bits == 6 else "values"):
        spilled_header.check(codec.read_header(codec.encode(state.to_tensors()[0], relabelled).header), "s1",
                             ModelShape.of(loaded))
    unpaired = {**header["state"]["cache"]["params"], "retrieval_bits": 16, "retrieval_value_bits": 4}
    bad = {**header, "state": {**header["state"], "cache": {**header["state"]["cache"], "params": unpaired}}}
    with pytest.raises(HeaderInvalid, match="16/4"):
        spilled_header.check(codec.read_header(codec.encode(state.to_tensors()[0], bad).header), "s1",
                             ModelShape.of(loaded))


@pytest.mark.parametrize("storage", ["6/4:6/4", "16:8"])
def test_integer_local_rows_spill_bit_exact_and_their_header_checks(maps, storage):
    """Local heads' sink and window rows in integers: spilled as stored (with scales), restored bit-exact, and a
    header that says other bits than the rows hold is refused."""
    loaded = tiny()
    engine = Engine(loaded, maps[storage])
    params = SamplingParams(max_new_tokens=8)
    state, _ = engine.generate(ids(90, 23), params)
    tensors, meta = state.to_tensors()
    key_bits, value_bits = maps[storage].compression.local_storage_bits
    head_dim = engine.dims.head_dim
    for name, bits in (("0.local_keys", key_bits), ("0.local_values", value_bits)):
        assert (tensors[name].dtype, tensors[name].shape[-1]) == (kv_quant.store_dtype(bits, torch.float32),
                                                                  kv_quant.store_width(head_dim, bits)), name
    assert tensors["0.local_key_scales"].dtype == torch.float16 and tensors["0.comp_keys"].dtype == torch.float32
    assert meta["cache"]["params"]["local_bits"] == key_bits
    assert_restores_bit_exact(engine, state, params)
    header = spill_header(state)
    encoded = state.to_tensors()[0]
    spilled_header.check(codec.read_header(codec.encode(encoded, header).header), "s1", ModelShape.of(loaded))
    cache = header["state"]["cache"]
    for relabel in ({"local_bits": 16, "local_value_bits": None}, {"local_bits": 8, "local_value_bits": 4}):
        params_ = {k: v for k, v in {**cache["params"], **relabel}.items() if v is not None}
        told = {**header, "state": {**header["state"], "cache": {**cache, "params": params_}}}
        with pytest.raises(HeaderInvalid, match="local_"):
            spilled_header.check(codec.read_header(codec.encode(encoded, told).header), "s1", ModelShape.of(loaded))


@pytest.mark.parametrize("storage", ["6/4:6/4+r5", "8+r5", "6/4:6/4+l5"])
def test_recent_rows_spill_bit_exact_and_their_header_checks(maps, storage):
    """The recent rows' float32 copies are spilled beside the integers (each group's last 5 tokens where it keeps
    them), restored bit-exact, and a header whose recent rows disagree with the tensors is refused."""
    loaded = tiny()
    engine = Engine(loaded, maps[storage])
    params = SamplingParams(max_new_tokens=8)
    state, _ = engine.generate(ids(90, 25), params)
    tensors, meta = state.to_tensors()
    c = maps[storage].compression
    assert c.recent in ((5, 5), (5, 0), (0, 5))
    groups = {"recent": c.recent[0], "local_recent": c.recent[1]}
    for i, layer in enumerate(state.cache.layers):
        for prefix, heads in (("recent", layer.retrieval_heads), ("local_recent", layer.local_heads)):
            if heads and groups[prefix]:
                for name in ("keys", "values"):
                    t = tensors[f"{i}.{prefix}_{name}"]
                    assert (t.dtype, tuple(t.shape)) == (torch.float32, (1, len(heads), 5, engine.dims.head_dim))
            else:
                assert f"{i}.{prefix}_keys" not in tensors
    assert_restores_bit_exact(engine, state, params)
    header = spill_header(state)
    encoded = state.to_tensors()[0]
    spilled_header.check(codec.read_header(codec.encode(encoded, header).header), "s1", ModelShape.of(loaded))
    cache = header["state"]["cache"]
    field = "recent_rows" if c.recent[0] else "local_recent_rows"
    for recent in (3, None):
        params_ = {k: v for k, v in {**cache["params"], field: recent}.items() if v is not None}
        told = {**header, "state": {**header["state"], "cache": {**cache, "params": params_}}}
        with pytest.raises(HeaderInvalid, match="recent"):
            spilled_header.check(codec.read_header(codec.encode(encoded, told).header), "s1", ModelShape.of(loaded))


def test_recent_rows_are_validated_and_only_named_in_maps_that_keep_them(maps):
    for bad in (-1, 2.5, True, "8"):
        with pytest.raises(ValueError, match="recent_rows"):
            CompressionParams(recent_rows=bad)
    assert CompressionParams(recent_rows=32.0).recent_rows == 32   # from a job's JSON
    assert "recent_rows" not in maps["6/4:6/4"].compression.to_dict()   # maps from before them keep their version
    loaded = tiny()
    back = HeadMap.from_json(maps["8+r5"].to_json(), expect=loaded.fingerprint)
    without = HeadMap.from_json(maps["8"].to_json(), expect=loaded.fingerprint)
    assert back.compression.recent_rows == 5 and back.version != without.version and without.version
    # a group in 16 bits keeps none; a local group at most its smallest window
    assert CompressionParams(min_window=8, recent_rows=20, retrieval_bits=8, local_bits=8).recent == (20, 8)
    assert CompressionParams(min_window=8, recent_rows=20).recent == (0, 0)
    local_only = CompressionParams(recent_rows=0, local_recent_rows=16, retrieval_bits=8, local_bits=8)
    assert local_only.recent == (0, 16) and local_only.to_dict()["local_recent_rows"] == 16
    assert CompressionParams(recent_rows=4, local_recent_rows=4).local_recent_rows is None   # one map, one hash
    with pytest.raises(ValueError, match="local_recent_rows"):
        CompressionParams(local_recent_rows=-2)


def test_8bit_head_map_json_round_trip_and_16bit_maps_unchanged(maps):
    loaded = tiny()
    back = HeadMap.from_json(maps["8"].to_json(), expect=loaded.fingerprint)
    assert back.compression.retrieval_bits == 8 and back.version == maps["8"].version != maps["16"].version
    assert "retrieval_bits" not in maps["16"].compression.to_dict()   # maps from before 8 bits keep their version
    assert "retrieval_value_bits" not in maps["8"].compression.to_dict()   # nor 8-bit maps from before 4-bit values
    four = HeadMap.from_json(maps["8/4"].to_json(), expect=loaded.fingerprint)
    assert (four.compression.retrieval_bits, four.compression.value_bits) == (8, 4)
    assert four.version == maps["8/4"].version not in (maps["8"].version, maps["16"].version)
    with pytest.raises(ValueError, match="retrieval_bits"):
        CompressionParams(retrieval_bits=4)
    for key_bits, value_bits in ((16, 4), (16, 8), (8, 16), (8, 2)):
        with pytest.raises(ValueError, match=f"got {key_bits}/{value_bits}"):
            CompressionParams(retrieval_bits=key_bits, retrieval_value_bits=value_bits)
    assert CompressionParams(retrieval_bits=8, retrieval_value_bits=8) == CompressionParams(retrieval_bits=8)


# ---- calibration searches the storage too -------------------------------------------------------------
def test_a_budget_too_small_for_the_planted_head_in_16_bits_is_met_in_8():
    loaded = planted_loaded(copy_output=True, induction_head=(1, 2))
    base = profile_model(loaded, ProfileParams(seq_len=32, n_samples=1, token_low=2, token_high=256))
    shape = dict(families=("copy",), lengths=(300,), n_tasks=2, n_validation=2, windows=(16,), sinks=(2,),
                 ratios=(1e9,), ranking="attention", leave_one_out=False, max_bytes=0.25)
    sixteen = calibrate(Engine(loaded, base), base, CalibrationParams(**shape))
    assert sixteen.retrieval_kv_heads == [[], []] and not sixteen.calibration["chosen"]["meets"]
    both = calibrate(Engine(loaded, base), base, CalibrationParams(**shape, bits=(8, 16)))
    chosen = both.calibration["chosen"]
    assert both.retrieval_kv_heads == [[], [1]] and both.compression.retrieval_bits == 8
    assert chosen["meets"] and chosen["bits"] == 8 and chosen["bytes_fraction"] <= 0.25
    assert {c["bits"] for c in both.calibration["candidates"]} == {8, 16}
    four = calibrate(Engine(loaded, base), base, CalibrationParams(**shape, bits=("8/4", 8)))
    chosen4 = four.calibration["chosen"]
    assert four.retrieval_kv_heads == [[], [1]] and four.compression.value_bits == 4
    assert chosen4["meets"] and chosen4["bits"] == "8/4" and chosen4["bytes_fraction"] < chosen["bytes_fraction"]
    assert HeadMap.from_json(four.to_json()).compression == four.compression
    six = calibrate(Engine(loaded, base), base, CalibrationParams(**shape, bits=("6/4", "8/4")))
    chosen6 = six.calibration["chosen"]
    assert six.retrieval_kv_heads == [[], [1]] and six.compression.storage() == "6/4"
    assert chosen6["meets"] and chosen6["bits"] == "6/4" and chosen6["bytes_fraction"] < chosen4["bytes_fraction"]
    assert HeadMap.from_json(six.to_json()).compression == six.compression
    # the local heads' rows searched too: in 6/4 the same head meets the target in fewer bytes
    local = calibrate(Engine(loaded, base), base, CalibrationParams(**shape, bits=("6/4",), local_bits=(16, "6/4")))
    chosen_local = local.calibration["chosen"]
    assert local.retrieval_kv_heads == [[], [1]] and local.compression.local_storage() == "6/4"
    assert chosen_local["meets"] and chosen_local["local_bits"] == "6/4"
    assert chosen_local["bytes_fraction"] < chosen6["bytes_fraction"]
    assert {c.get("local_bits", 16) for c in local.calibration["candidates"]} == {16, "6/4"}
    assert HeadMap.from_json(local.to_json()).compression == local.compression
    # recent rows are kept by every point searched (not searched themselves), and priced
    recent = calibrate(Engine(loaded, base), base, CalibrationParams(**shape, bits=("6/4",), local_bits=("6/4",),
                                                                     recent_rows=4))
    chosen_recent = recent.calibration["chosen"]
    assert recent.retrieval_kv_heads == [[], [1]] and recent.compression.recent == (4, 4)
    assert all(c["recent_rows"] == 4 for c in recent.calibration["candidates"]) and chosen_recent["meets"]
    assert chosen_local["bytes_fraction"] < chosen_recent["bytes_fraction"] <= 0.25


# ---- the service: an 8-bit map over gRPC, spilled to Redis and restored ---------------------------------
@pytest.mark.parametrize("storage", ["8", "8/4", "6/4", "6/4:6/4", "6/4:6/4+r8"])
def test_an_8bit_session_spilled_to_redis_continues_as_one_kept_on_the_device(start_server, tiny_head_map, storage):
    """Sampled turns (any change in a logit shows) match between a session of an 8-bit map (or 8-bit keys and
    4-bit values) kept resident and one spilled to Redis and restored before every turn; the reported bytes are
    the integer store's."""
    from services.inference.client import RazorClient
    from tests.test_integrity import sampled_turns

    storage, _, recent = storage.partition("+r")
    hm8 = stored_in(tiny_head_map, *storage.split(":"), recent=int(recent or 0))   # retrieval[:local][+r recent]
    prompt = "The quick brown fox jumps over the lazy dog near the river bank while the sun sets slowly " * 3
    outs, sizes = [], {}
    for spills in (False, True):
        for hm in ((hm8,) if spills else (hm8, tiny_head_map)):
            server = start_server(head_map=hm, kv_budget_bytes=1 if spills else 10**9)
            with RazorClient(server.target) as client:
                replies, session = sampled_turns(client, prompt, spills)
                reported = client.server_info().head_map.compression
                assert (reported.retrieval_bits, reported.retrieval_value_bits) == (
                    hm.compression.retrieval_bits, hm.compression.value_bits)
                assert (reported.local_bits, reported.local_value_bits) == hm.compression.local_storage_bits
                assert reported.recent_rows == hm.compression.recent_rows
            if hm is hm8:
                outs.append([r.token_ids for r in replies])
            sizes[(hm.compression.retrieval_bits, spills)] = (session.kv_bytes, session.kv_bytes_full)
            server.stop(0)
    assert outs[0] == outs[1]
    (kv8, full8), (kv16, full16) = sizes[(hm8.compression.retrieval_bits, False)], sizes[(16, False)]
    assert full8 == full16 and kv8 < kv16


def test_retrieval_bits_setting_is_validated_with_the_variable_named(monkeypatch):
    from pydantic import ValidationError

    from services.settings import Settings

    monkeypatch.setenv("RAZOR_RETRIEVAL_BITS", "8")
    assert Settings().retrieval_bits == 8
    monkeypatch.setenv("RAZOR_RETRIEVAL_VALUE_BITS", "4")
    assert Settings().retrieval_value_bits == 4
    monkeypatch.setenv("RAZOR_RETRIEVAL_BITS", "16")
    with pytest.raises(ValidationError, match="RAZOR_RETRIEVAL_VALUE_BITS 4 does not go with RAZOR_RETRIEVAL_BITS 16"):
        Settings()
    monkeypatch.setenv("RAZOR_RETRIEVAL_BITS", "6")
    assert (Settings().retrieval_bits, Settings().retrieval_value_bits) == (6, 4)
    monkeypatch.delenv("RAZOR_RETRIEVAL_VALUE_BITS")
    with pytest.raises(ValidationError, match="4 with RAZOR_RETRIEVAL_BITS=8 or 6"):   # 6-bit keys need 4-bit values
        Settings()
    monkeypatch.setenv("RAZOR_RETRIEVAL_BITS", "4")
    with pytest.raises(ValidationError, match="RAZOR_RETRIEVAL_BITS 4 is not supported"):
        Settings()
