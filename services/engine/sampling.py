"""Sampling parameters and next-token selection (greedy, temperature, top-k, top-p), and the log-probabilities
reported with each token (the sampled one's, and the top-N most likely) under the raw model distribution."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from .errors import InvalidRequest

MAX_NEW_TOKENS_LIMIT = 65_536
MAX_TOP_LOGPROBS = 20   # candidates reported per generated token (what OpenAI's API allows)
MAX_TEMPERATURE = 10.0   # past this, sampling is all but uniform over the vocabulary


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 0.0          # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0                    # 0 = no top-k cut
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    stop_strings: tuple[str, ...] = ()
    logprobs: bool = False
    top_logprobs: int = 0             # report the k most likely tokens at each generated position

    def __post_init__(self):
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            raise InvalidRequest(f"max_new_tokens must be within 1..{MAX_NEW_TOKENS_LIMIT}, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= MAX_TEMPERATURE:
            raise InvalidRequest(f"temperature must be within 0..{MAX_TEMPERATURE:g} (0 = greedy), "
                                 f"got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequest(f"top_p must be within (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise InvalidRequest(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if any(not s for s in self.stop_strings):
            raise InvalidRequest("stop_strings must not contain an empty string")
        if any(t < 0 for t in self.stop_token_ids):
            raise InvalidRequest("stop_token_ids must be non-negative token ids")
        if not 0 <= self.top_logprobs <= MAX_TOP_LOGPROBS:
            raise InvalidRequest(f"top_logprobs must be within 0..{MAX_TOP_LOGPROBS} (0 = none), "
                                 f"got {self.top_logprobs}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.greedy:
        return None
    gen = torch.Generator(device=device)
    if params.seed is None:
        gen.seed()
    else:
        gen.manual_seed(params.seed)
    return gen


class Sampled(NamedTuple):
    token: int
    logprob: float | None                       # of `token`, when params.logprobs
    top: tuple[tuple[int, float], ...] = ()     # (token id, logprob) of the params.top_logprobs most likely


def sample(logits: torch.Tensor, params: SamplingParams, gen: torch.Generator | None) -> Sampled:
    """logits: [V] for the next position -> the sampled token, and the log-probabilities asked for.

    Log-probabilities are those of the raw model distribution (log_softmax of `logits`, before temperature,
    top-k and top-p), as vLLM reports them: the same numbers whatever the sampling settings."""
    logits = logits.float()
    if params.greedy:
        token = int(torch.argmax(logits))
    else:
        # Shifted first: a tiny temperature then gives -inf for the others, never inf - inf (NaN); and at least
        # float32's least normal number, since a smaller one is 0 there and 0 / 0 is NaN.
        scaled = (logits - logits.max()) / max(params.temperature, torch.finfo(torch.float32).tiny)
        if params.top_k:
            kth = torch.topk(scaled, min(params.top_k, scaled.numel())).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        if params.top_p < 1.0:
            scaled = _top_p_filter(scaled, params.top_p)
        probs = torch.softmax(scaled, dim=-1)
        token = int(torch.multinomial(probs, 1, generator=gen))
    if not (params.logprobs or params.top_logprobs):
        return Sampled(token, None)
    logp = torch.log_softmax(logits, dim=-1)    # [V]
    return Sampled(token, float(logp[token]) if params.logprobs else None, top_logprobs(logp, params.top_logprobs))


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], gens: list[torch.Generator | None]
                ) -> list[Sampled]:
    """logits: [n, V], one row per turn -> each row sampled under its own params; the plain greedy rows (no
    log-probabilities asked) take one argmax over the batch, the others `sample`."""
    assert logits.dim() == 2 and logits.shape[0] == len(params) == len(gens), (logits.shape, len(params))
    logits = logits.float()
    greedy = logits.argmax(dim=-1).tolist()
    return [Sampled(greedy[row], None) if p.greedy and not (p.logprobs or p.top_logprobs) else
            sample(logits[row], p, gen) for row, (p, gen) in enumerate(zip(params, gens))]


def top_logprobs(logp: torch.Tensor, k: int) -> tuple[tuple[int, float], ...]:
    """logp: [V] log-probabilities -> the k most likely (token id, logprob), most likely first."""
    if k == 0:
        return ()
    values, ids = torch.topk(logp, min(k, logp.numel()))   # sorted, descending
    return tuple(zip(ids.tolist(), values.tolist()))


def _top_p_filter(scaled: torch.Tensor, top_p: float) -> torch.Tensor:
    sorted_logits, order = torch.sort(scaled, descending=True)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
    drop_sorted = cum - torch.softmax(sorted_logits, dim=-1) >= top_p   # keep the token that crosses top_p
    drop_sorted[0] = False   # and the most likely one: a top_p below float32's least (1e-50) would drop it too
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return scaled.masked_fill(drop, float("-inf"))
