"""Find retrieval heads: induction and echo scores from repeated random tokens (paper §3.2).

Input: BOS, then T random ids repeated R times. For a token in repeat r >= 1 whose earlier copies sit at
p - k*T (k = 1..r):
  echo score       attention mass on the earlier copies themselves            (positions p - k*T)
  induction score  attention mass on the tokens right after the earlier copies (positions p - k*T + 1)
averaged over those tokens and over `n_samples` random sequences. We sum over *all* earlier copies rather than
only the latest one, so a head that copies from any earlier repeat counts.
Selection (the paper's): the top `induction_fraction` of query heads by induction score plus the top
`echo_fraction` by echo score, ranked across all layers; a KV head is kept full when any of its query heads
is selected (GQA memory is per KV head).
"""
from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from . import attention, hf
from .cache import CompressionParams
from .calibration import CalibrationParams, calibrate as run_calibration
from .generation import Engine
from .headmap import HeadMap
from .models import LoadedModel, ModelFingerprint

Progress = Callable[[int, int, str], None]


@dataclass(frozen=True)
class ProfileParams:
    seq_len: int = 256            # T: random tokens per repeat (paper impl.: 2,500; scaled to small models)
    repeats: int = 4              # R
    n_samples: int = 2            # independent random sequences, scores averaged
    seed: int = 0
    induction_fraction: float = 0.15
    echo_fraction: float = 0.01
    token_low: int = 1000         # random ids come from a narrow band, clear of special tokens
    token_high: int = 20000

    def __post_init__(self):
        if self.seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 tokens, got {self.seq_len}")
        if self.repeats < 2:
            raise ValueError(f"repeats must be >= 2 (scores need an earlier copy), got {self.repeats}")
        if self.n_samples < 1:
            raise ValueError(f"n_samples must be >= 1, got {self.n_samples}")
        for name in ("induction_fraction", "echo_fraction"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be within 0..1, got {getattr(self, name)}")
        if not 0 <= self.token_low < self.token_high:
            raise ValueError("token_low must be >= 0 and below token_high")

    def to_dict(self) -> dict:
        return asdict(self)


class HeadScoreProbe:
    """Receives each layer's attention probabilities and accumulates induction / echo mass."""

    def __init__(self, n_layers: int, n_heads: int, seq_len: int, repeats: int, on_layer: Callable[[int], None]):
        self.induction = torch.zeros(n_layers, n_heads)
        self.echo = torch.zeros(n_layers, n_heads)
        self.on_layer = on_layer
        # (query, earlier copy) position pairs; position 0 is BOS.
        q_pos, copy_pos = [], []
        for r in range(1, repeats):
            for i in range(seq_len):
                p = 1 + r * seq_len + i
                for k in range(1, r + 1):
                    q_pos.append(p)
                    copy_pos.append(p - k * seq_len)
        self.q_pos, self.copy_pos = torch.tensor(q_pos), torch.tensor(copy_pos)
        self.n_queries = (repeats - 1) * seq_len

    def record(self, layer_idx: int, probs: torch.Tensor) -> None:
        # probs: [B, Hq, N, N]
        probs = probs.float().mean(0).cpu()                                   # [Hq, N, N]
        self.echo[layer_idx] += probs[:, self.q_pos, self.copy_pos].sum(-1) / self.n_queries
        self.induction[layer_idx] += probs[:, self.q_pos, self.copy_pos + 1].sum(-1) / self.n_queries
        self.on_layer(layer_idx)


def random_repeats(params: ProfileParams, vocab_size: int, bos_id: int | None, sample: int) -> torch.Tensor:
    """[1, 1 + T*R] ids: BOS then T random ids repeated R times."""
    gen = torch.Generator().manual_seed(params.seed * 1_000_003 + sample)
    high = min(params.token_high, vocab_size)
    low = min(params.token_low, high // 2)  # tiny vocabularies still get a band of ids
    block = torch.randint(low, high, (params.seq_len,), generator=gen)
    ids = torch.cat([torch.tensor([bos_id if bos_id is not None else low]), block.repeat(params.repeats)])
    return ids.unsqueeze(0)


@torch.no_grad()
def score_heads(model, params: ProfileParams, progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Induction and echo scores, each [n_layers, n_heads]."""
    dims = hf.model_dims(model.config)
    n_layers, n_heads = dims.n_layers, dims.n_heads
    total = params.n_samples * n_layers
    hf.install(model, attention.razor_attention)
    induction, echo = torch.zeros(n_layers, n_heads), torch.zeros(n_layers, n_heads)
    for s in range(params.n_samples):
        done_before = s * n_layers

        def on_layer(layer_idx: int, _base=done_before) -> None:
            if progress:
                progress(_base + layer_idx + 1, total, "scoring heads")

        probe = HeadScoreProbe(n_layers, n_heads, params.seq_len, params.repeats, on_layer)
        ids = random_repeats(params, dims.vocab_size, dims.bos_id, s).to(model.device)
        hf.probe_forward(model, ids, probe)
        induction += probe.induction / params.n_samples
        echo += probe.echo / params.n_samples
    return induction, echo


def select_heads(induction: torch.Tensor, echo: torch.Tensor, params: ProfileParams,
                 fp: ModelFingerprint) -> tuple[list[tuple[int, int]], list[list[int]]]:
    """Top fractions of query heads by induction, then by echo; widened to whole KV heads."""
    n_layers, n_heads = induction.shape
    n_total = n_layers * n_heads
    chosen = top_heads(induction, math.ceil(params.induction_fraction * n_total), exclude=set())
    chosen += top_heads(echo, math.ceil(params.echo_fraction * n_total), exclude=set(chosen))
    return sorted(chosen), kv_heads_of(chosen, fp)


def top_heads(scores: torch.Tensor, k: int, exclude: set) -> list[tuple[int, int]]:
    n_heads = scores.shape[1]
    picked = []
    for flat in torch.argsort(scores.flatten(), descending=True, stable=True).tolist():
        if len(picked) >= k:
            break
        head = (flat // n_heads, flat % n_heads)
        if head not in exclude:
            picked.append(head)
    return picked


def kv_heads_of(q_heads: list[tuple[int, int]], fp: ModelFingerprint) -> list[list[int]]:
    kv = [set() for _ in range(fp.n_layers)]
    for layer, head in q_heads:
        kv[layer].add(head // fp.group_size)
    return [sorted(s) for s in kv]


def profile_model(loaded: LoadedModel, params: ProfileParams = ProfileParams(),
                  compression: CompressionParams = CompressionParams(),
                  progress: Progress | None = None, calibrate=None) -> HeadMap:
    """The paper's selection; with `calibrate` (True or CalibrationParams) refined by measured retrieval."""
    start = time.perf_counter()
    induction, echo = score_heads(loaded.model, params, progress)
    q_heads, kv_heads = select_heads(induction, echo, params, loaded.fingerprint)
    head_map = HeadMap(loaded.fingerprint, _rounded(induction), _rounded(echo), q_heads, kv_heads, compression,
                       method="razor", method_params=params.to_dict(),
                       timings={"profile_s": round(time.perf_counter() - start, 3)})
    if not calibrate:
        return head_map
    if calibrate is True:
        calibrate = CalibrationParams.for_model(loaded)
    return run_calibration(Engine(loaded, head_map), head_map, calibrate, progress)


def _rounded(scores: torch.Tensor) -> list[list[float]]:
    # Rounding keeps the JSON small and the content version stable across float noise.
    return [[round(float(x), 5) for x in row] for row in scores]
