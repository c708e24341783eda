"""bench/bench_kv_quant.py's arithmetic (no model): the point labels it parses, the bytes it reports, and the
pre-RoPE roundings it simulates. A bench's own API is otherwise exercised only by running it (docs §3.2v: its
`--bits` once went stale unseen)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_kv_quant as bkq  # noqa: E402

FREQUENCIES = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)                     # [D / 2], D = 8


@pytest.mark.parametrize("label", ["8", "8/4", "6r/4", "4c/3", "6p48/4", "6p48/4p48", "16p48/16p48", "16/16p40",
                                   "4q/4", "5m/4", "4v/4v", "5v/4", "6r/3v"])
def test_bits_labels_round_trip(label):
    assert str(bkq.parse_bits(label)) == label


@pytest.mark.parametrize("label", ["6p/4", "6p0/4", "6r32/4", "6p80/4", "6/4r", "7/4", "6p48/4q",
                                   "6v/4", "4v/6v", "4v32/4", "4/4p8v"])
def test_bits_labels_refused_say_what_a_label_is(label):
    with pytest.raises(SystemExit):
        bkq.parse_bits(label)


def test_local_rows_cannot_be_rounded_before_rope():
    with pytest.raises(SystemExit, match="every position"):
        bkq.points(["40:6r/4:6p32/4"])


def test_bytes_of_rows_on_a_subspace():
    """Against a 16-bit full cache: 6r/4 is 6 + 4 bits a channel plus a float16 scale per 32; keys on 48 of 64
    directions in 6 bits with one scale per row, values on 48 in 4 bits likewise, are a quarter."""
    elements, full = 64 * 100, 64 * 100 * 2 * bkq.FULL_ITEMSIZE
    assert bkq.rows_nbytes(elements, bkq.parse_bits("6r/4"), 32, 64) / full == pytest.approx(0.34375)
    assert bkq.rows_nbytes(elements, bkq.parse_bits("6p48/4p48"), 32, 64) / full == pytest.approx(0.25)
    assert bkq.rows_nbytes(elements, bkq.parse_bits("6p32/4"), 32, 64) / full == pytest.approx(62 / 256)
    assert bkq.rows_nbytes(elements, bkq.parse_bits("4v/4v"), 32, 64) / full == pytest.approx(0.25)   # no scales
    assert bkq.rows_nbytes(elements, bkq.parse_bits("5v/4"), 32, 64) / full == pytest.approx((5 + 4.5) / 32)


def test_kmeans_finds_separated_clusters():
    """Four tight clusters a group, in two groups: each codebook lands on its group's four centres."""
    torch.manual_seed(0)
    centres = torch.tensor([[[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]],
                            [[-5.0, 5.0], [5.0, -5.0], [20.0, 20.0], [-20.0, 3.0]]])    # [G, 4, 2]
    rows = (centres[:, torch.arange(400) % 4] + 0.01 * torch.randn(2, 400, 2))           # [G, 400, 2]
    books = bkq.kv_codebooks.kmeans(rows, 4, 20, torch.Generator().manual_seed(1))
    for found, true in zip(books, centres):
        assert torch.cdist(true, found).min(-1).values.max() < 0.05, (found, true)


def test_codes_keep_rows_in_the_codebook_and_the_sink_rows():
    """Rows that are centroids come back exactly; the first `sink` rows are never coded."""
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(1, 4, 4)).Q                                   # [h, D, D]
    books = torch.randn(1, 2, 16, 2)                                                   # [h, D / 2, K, 2]
    picks = torch.randint(0, 16, (2, 10))                                              # per pair, per row
    coefficients = torch.stack([books[0, pair, picks[pair]] for pair in range(2)], 1).flatten(1)   # [10, 4]
    rows = (coefficients @ basis[0].T)[None]                                           # [h, N, D]
    sinks = 100 * torch.randn(1, 3, 4)
    coded = bkq.kv_codebooks.coded(torch.cat([sinks, rows], 1), basis, books, sink=3)
    torch.testing.assert_close(coded[:, :3], sinks)
    torch.testing.assert_close(coded[:, 3:], rows, atol=1e-5, rtol=1e-4)
    moved = bkq.kv_codebooks.coded(rows + 0.3, basis, books, sink=0)
    assert not torch.allclose(moved, rows + 0.3, atol=1e-3)


def test_rope_inverts_and_depends_on_relative_position_only():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 10, 8)
    torch.testing.assert_close(bkq.rope(bkq.rope(x, FREQUENCIES, 1), FREQUENCIES, -1), x, atol=1e-5, rtol=1e-5)
    q, k = (torch.randn(8).expand(1, 1, 10, 8) for _ in range(2))
    rq, rk = bkq.rope(q, FREQUENCIES, 1)[0, 0], bkq.rope(k, FREQUENCIES, 1)[0, 0]
    assert torch.dot(rq[2], rk[5]) == pytest.approx(float(torch.dot(rq[4], rk[7])), rel=1e-4)
    assert torch.dot(rq[2], rk[5]) != pytest.approx(float(torch.dot(rq[2], rk[6])), rel=1e-4)


def test_subspace_keys_keep_what_lies_in_the_subspace():
    """Keys whose pre-RoPE rows lie in a basis's top directions come back as they were (16 bits); others lose
    exactly their part outside, so a second projection changes nothing."""
    torch.manual_seed(0)
    basis = torch.linalg.qr(torch.randn(2, 8, 8)).Q                                   # [h, D, D]
    inside = torch.randn(1, 2, 10, 3) @ basis[..., :3].transpose(-1, -2)              # pre-RoPE, rank 3
    keys = bkq.rope(inside, FREQUENCIES, 1)
    torch.testing.assert_close(bkq.subspace_keys(keys, bkq.Bits(16, 16, "p", 3), 32, basis, FREQUENCIES), keys,
                               atol=1e-5, rtol=1e-4)
    other = bkq.rope(torch.randn(1, 2, 10, 8), FREQUENCIES, 1)
    once = bkq.subspace_keys(other, bkq.Bits(16, 16, "p", 3), 32, basis, FREQUENCIES)
    assert not torch.allclose(once, other, atol=1e-3)
    torch.testing.assert_close(bkq.subspace_keys(once, bkq.Bits(16, 16, "p", 3), 32, basis, FREQUENCIES), once,
                               atol=1e-5, rtol=1e-4)


def test_pre_rope_rounding_errs_less_with_more_bits():
    torch.manual_seed(0)
    frequencies = FREQUENCIES.repeat_interleave(8)                                    # [32] for D = 64
    keys = bkq.rope(torch.randn(1, 2, 64, 64) + 3.0, frequencies, 1)                  # a mean key, as real ones
    for mode in ("q", "m"):
        errors = [float((bkq.pre_rope_keys(keys, bkq.Bits(b, 16, mode), 32, frequencies) - keys).pow(2).mean())
                  for b in (3, 4, 6, 8)]
        assert errors == sorted(errors, reverse=True) and errors[-1] < 1e-3 * float(keys.pow(2).mean()), (mode, errors)


def test_adjacent_layer_cosines_join_the_heads_of_each_token():
    torch.manual_seed(0)
    first = torch.randn(1, 2, 5, 8)                          # [1, Hkv, N, D]
    first[:, 0] *= 2 / first[:, 0].norm(dim=-1, keepdim=True)
    first[:, 1] /= first[:, 1].norm(dim=-1, keepdim=True)    # every token: head 0's row twice head 1's length
    second_head_flipped = first * torch.tensor([1.0, -1.0]).view(1, 2, 1, 1)
    cos = bkq.adjacent_layer_cosines([first, first.clone(), -first, -second_head_flipped])
    assert cos[0] == pytest.approx(1.0) and cos[1] == pytest.approx(-1.0)
    # joined, (4 - 1) / (4 + 1); a mean of per-head cosines would say (1 - 1) / 2 = 0
    assert cos[2] == pytest.approx(0.6)
