"""Keys and values as codes into learned codebooks (vector quantisation: CQ's coupled channels, CommVQ's codes
before RoPE), for bench_kv_quant's `v` points (docs 3.2za).

A scalar code spends its bits on each channel alone and a scale a row; a codebook spends them on pairs of
channels together, where the rows really lie. Each KV head's rows are turned onto their principal directions
(KeySubspace's bases; keys before RoPE), split into D / 2 pairs of coefficients, and each pair is stored as the
index of its nearest centroid among 2 ** (2 * bits), learned by k-means on calibration-part documents: `bits`
a channel, no scale. The codebooks belong to the model, not to a session, so they cost a session nothing."""
from __future__ import annotations

import torch

PAIR = 2   # channels coded together


def kmeans_plus_plus(rows: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """rows [G, M, d] -> k seeds a group [G, k, d], each drawn with probability by its squared distance to the
    seeds before it (so no two seeds start in one cluster, as uniform draws may)."""
    g, m, _ = rows.shape
    chosen = [rows[torch.arange(g), torch.randint(m, (g,), generator=generator)]]     # [G, d]
    nearest = (rows - chosen[0][:, None]).pow(2).sum(-1)                               # [G, M]
    for _ in range(k - 1):
        pick = torch.multinomial(nearest + 1e-12, 1, generator=generator)[:, 0]         # [G]
        chosen.append(rows[torch.arange(g), pick])
        nearest = torch.minimum(nearest, (rows - chosen[-1][:, None]).pow(2).sum(-1))
    return torch.stack(chosen, 1)


def kmeans(rows: torch.Tensor, k: int, iterations: int, generator: torch.Generator) -> torch.Tensor:
    """rows [G, M, d] -> G codebooks [G, k, d] (Lloyd's from k-means++ seeds; an empty cluster keeps its
    centroid)."""
    g, m, d = rows.shape
    assert m >= k, f"{m} training rows cannot seed {k} centroids"
    centroids = kmeans_plus_plus(rows, k, generator)                                   # [G, k, d]
    for _ in range(iterations):
        nearest = torch.cdist(rows, centroids).argmin(-1)                              # [G, M]
        flat = (nearest + torch.arange(g)[:, None] * k).flatten()                      # [G * M]
        sums = torch.zeros(g * k, d).index_add_(0, flat, rows.reshape(-1, d))
        counts = torch.bincount(flat, minlength=g * k).float()[:, None]
        centroids = torch.where(counts > 0, sums / counts.clamp(min=1), centroids.reshape(-1, d)).view(g, k, d)
    return centroids


def pairs(coefficients: torch.Tensor) -> torch.Tensor:
    """[N, D] -> [D / 2, N, 2]: each pair of channels' rows."""
    n, d = coefficients.shape
    return coefficients.view(n, d // PAIR, PAIR).transpose(0, 1)


def unpairs(grouped: torch.Tensor) -> torch.Tensor:
    """[D / 2, N, 2] -> [N, D]."""
    return grouped.transpose(0, 1).flatten(1)


def train(rows: torch.Tensor, bits: int, sample: int, generator: torch.Generator,
          iterations: int = 10) -> torch.Tensor:
    """rows [h, M, D] (one layer's heads' coefficients) -> codebooks [h, D / 2, 2 ** (2 * bits), 2], each from
    at most `sample` rows."""
    chosen = torch.randperm(rows.shape[1], generator=generator)[:sample]
    return torch.stack([kmeans(pairs(head[chosen]), 2 ** (PAIR * bits), iterations, generator) for head in rows])


def code(rows: torch.Tensor, codebooks: torch.Tensor) -> torch.Tensor:
    """rows [h, N, D] -> each pair of channels replaced by its nearest centroid; codebooks [h, D / 2, K, 2]."""
    out = []
    for head, books in zip(rows, codebooks):
        grouped = pairs(head)                                                          # [D / 2, N, 2]
        nearest = torch.cdist(grouped, books).argmin(-1)                               # [D / 2, N]
        out.append(unpairs(torch.gather(books, 1, nearest[..., None].expand(-1, -1, PAIR))))
    return torch.stack(out)


def coded(rows: torch.Tensor, basis: torch.Tensor, codebooks: torch.Tensor, sink: int) -> torch.Tensor:
    """rows [h, N, D] coded on `basis` ([h, D, D]) with `codebooks` and turned back; the first `sink` rows (the
    attention sinks, whose sizes no codebook learns) stay as they are, as a store would keep them in 16 bits."""
    coefficients = code(rows[:, sink:] @ basis, codebooks) @ basis.transpose(-1, -2)
    return torch.cat([rows[:, :sink], coefficients], 1)
