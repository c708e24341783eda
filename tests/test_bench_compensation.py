"""bench/bench_compensation.py's centroids (no model): merged as the engine merges its one compensation token,
they give exact attention when each holds one dropped token, and the one token's answer when one holds all."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_compensation as bc  # noqa: E402

from services.engine import attention  # noqa: E402

SCALE = 8 ** -0.5


def heads():
    """One decode query of 4 query heads over 2 KV heads: local rows [1, 2, 5, 8], dropped rows [2, 12, 8]."""
    torch.manual_seed(0)
    q = torch.randn(1, 4, 1, 8)
    local_k, local_v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    dropped_k, dropped_v = torch.randn(2, 12, 8), torch.randn(2, 12, 8)
    return q, local_k, local_v, dropped_k, dropped_v


def exact_attention(q, keys, values):
    """q [1, 4, 1, D] over keys, values [1, 2, S, D] (GQA: two query heads a KV head), every row once."""
    keys, values = keys.repeat_interleave(2, 1), values.repeat_interleave(2, 1)
    return torch.softmax(q @ keys.transpose(-1, -2) * SCALE, -1) @ values


def merged(q, local_k, local_v, dropped_k, dropped_v, m, count=12):
    o, lse = attention.attend_with_lse(q, local_k, local_v, SCALE)
    per_head = [bc.centroids(dropped_k[h], dropped_v[h], m, "kmeans") for h in range(2)]
    keys, values, counts = zip(*per_head)
    registry, layer = bc.CentroidRegistry(), type("Layer", (), {})()
    layer.comp_keys, layer.comp_values = dropped_k.mean(1)[None, :, None], dropped_v.mean(1)[None, :, None]
    registry.add(layer, keys, values, counts)
    found = registry.get(layer.comp_keys)
    return bc.merge_centroids(o, lse, q, layer.comp_keys, layer.comp_values, count, SCALE, found), o, lse, layer


def test_one_centroid_per_dropped_token_is_exact_attention():
    q, local_k, local_v, dropped_k, dropped_v = heads()
    out, *_ = merged(q, local_k, local_v, dropped_k, dropped_v, m=12)
    every_k, every_v = torch.cat([dropped_k[None], local_k], 2), torch.cat([dropped_v[None], local_v], 2)
    torch.testing.assert_close(out, exact_attention(q, every_k, every_v), atol=1e-5, rtol=1e-4)


def test_one_centroid_is_the_engines_compensation_token():
    q, local_k, local_v, dropped_k, dropped_v = heads()
    out, o, lse, layer = merged(q, local_k, local_v, dropped_k, dropped_v, m=1)
    one = attention.merge_compensation(o, lse, q, layer.comp_keys, layer.comp_values, 12, SCALE)
    torch.testing.assert_close(out, one, atol=1e-5, rtol=1e-4)


def test_tokens_dropped_after_the_centroids_join_as_one_more():
    """A later fold (the engine's running mean over 12 + 4 tokens) adds exactly one token of their mean."""
    q, local_k, local_v, dropped_k, dropped_v = heads()
    later_k, later_v = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    o, lse = attention.attend_with_lse(q, local_k, local_v, SCALE)
    per_head = [bc.centroids(dropped_k[h], dropped_v[h], 12, "segments") for h in range(2)]
    registry, layer = bc.CentroidRegistry(), type("Layer", (), {})()
    layer.comp_keys = torch.cat([dropped_k, later_k], 1).mean(1)[None, :, None]
    layer.comp_values = torch.cat([dropped_v, later_v], 1).mean(1)[None, :, None]
    registry.add(layer, *zip(*per_head))
    out = bc.merge_centroids(o, lse, q, layer.comp_keys, layer.comp_values, 16, SCALE, registry.get(layer.comp_keys))
    every_k = torch.cat([dropped_k, later_k.mean(1, keepdim=True).expand(2, 4, 8)], 1)[None]
    every_v = torch.cat([dropped_v, later_v.mean(1, keepdim=True).expand(2, 4, 8)], 1)[None]
    every_k, every_v = torch.cat([every_k, local_k], 2), torch.cat([every_v, local_v], 2)
    torch.testing.assert_close(out, exact_attention(q, every_k, every_v), atol=1e-4, rtol=1e-4)


def test_kmeans_centroids_keep_every_token_once():
    keys, values = torch.randn(40, 8), torch.randn(40, 8)
    k, v, counts = bc.centroids(keys, values, 6, "kmeans")
    assert counts.sum() == 40 and len(counts) <= 6 and k.shape == v.shape == (len(counts), 8)
    torch.testing.assert_close((counts[:, None] * k).sum(0), keys.sum(0), atol=1e-4, rtol=1e-4)
