"""The one module that touches transformers internals: the forward call and its keyword arguments, the
`Cache` / `CacheLayerMixin` subclassing, attention registration and config attribute names.

A forward runs against a *step target* (a `batch.StepBatch`): an object with
  append(layer_idx, key_states, value_states)   new tokens' K/V after RoPE, [1, n_kv_heads, T, D]
  attend(layer_idx, query, scale) -> output     query [1, Hq, T, D] -> [1, Hq, T, D]
`StepCache.update` hands each layer's new K/V to the target, and the registered attention function asks the
target for the output, so the split, per-session caches never pass through transformers' own cache code.
The next transformers upgrade should touch this file (and its contract test, tests/test_engine_hf.py) only.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.cache_utils import Cache, CacheLayerMixin

ATTN_NAME = "razor"
STEP_KWARG = "razor_step"     # forward kwarg that reaches the attention function
PROBE_KWARG = "razor_probe"   # forward kwarg of profiling runs (eager attention probabilities)
GATES_KWARG = "razor_gates"   # forward kwarg of gate training (head_gates.py: full and local attention mixed)


@dataclass(frozen=True)
class ModelDims:
    """What the engine reads from a model config (the config's attribute names live here only)."""

    model_type: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab_size: int
    max_context: int
    eos_ids: tuple[int, ...]
    bos_id: int | None


def model_dims(config) -> ModelDims:
    n_heads = config.num_attention_heads
    eos = config.eos_token_id
    eos_ids = tuple(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    return ModelDims(config.model_type, config.num_hidden_layers, n_heads, config.num_key_value_heads,
                     getattr(config, "head_dim", None) or config.hidden_size // n_heads, config.vocab_size,
                     int(config.max_position_embeddings), eos_ids, config.bos_token_id)


class _StepLayer(CacheLayerMixin):
    """Routes one layer's new K/V to the step target; stores nothing itself."""

    def __init__(self, layer_idx: int, target):
        super().__init__()
        self.layer_idx, self.target = layer_idx, target
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        self.target.append(self.layer_idx, key_states, value_states)
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return query_length, 0   # unused: the razor attention builds its own masks

    def get_seq_length(self) -> int:
        return 0                 # unused: positions are always passed explicitly

    def get_max_length(self) -> int:
        return -1


class StepCache(Cache):
    def __init__(self, n_layers: int, target):
        super().__init__(layers=[_StepLayer(i, target) for i in range(n_layers)])


def register(attention_fn) -> None:
    """Register the razor attention function under ATTN_NAME (idempotent)."""
    AttentionInterface.register(ATTN_NAME, attention_fn)


def install(model, attention_fn) -> None:
    register(attention_fn)
    model.set_attn_implementation(ATTN_NAME)


def step_kwargs(kwargs: dict):
    """(step target, probe, gates) from the attention function's kwargs."""
    return kwargs.get(STEP_KWARG), kwargs.get(PROBE_KWARG), kwargs.get(GATES_KWARG)


@torch.no_grad()
def forward_step(model, input_ids: torch.Tensor, position_ids: torch.Tensor, target,
                 logits_at: torch.Tensor | None = None) -> torch.Tensor:
    """One packed forward. input_ids, position_ids: [1, T]; logits_at: [n] indices into T (None = all).

    -> logits [n, V] (or [T, V])."""
    assert input_ids.shape == position_ids.shape and input_ids.shape[0] == 1, (input_ids.shape, position_ids.shape)
    cache = StepCache(model.config.num_hidden_layers, target)
    keep = 0 if logits_at is None else logits_at
    out = model(input_ids, position_ids=position_ids, cache=cache, use_cache=True, logits_to_keep=keep,
                **{STEP_KWARG: target})
    return out.logits[0]


@torch.no_grad()
def probe_forward(model, input_ids: torch.Tensor, probe) -> None:
    """A cache-less forward whose attention hands its probabilities to `probe` (profiling)."""
    model(input_ids, use_cache=False, **{PROBE_KWARG: probe})


def gated_forward(model, input_ids: torch.Tensor, position_ids: torch.Tensor, gates,
                  logits_at: torch.Tensor) -> torch.Tensor:
    """A cache-less forward of turns whose attention `gates` computes over the documents it holds (gate
    training: gradients reach the gates only; the weights stay frozen, so backward skips their gradients,
    the vocabulary-sized head's above all). input_ids, position_ids: [B, T]; logits_at: [n] indices into T
    -> logits [B, n, V]."""
    assert input_ids.shape == position_ids.shape, (input_ids.shape, position_ids.shape)
    with frozen_weights(model):
        return model(input_ids, position_ids=position_ids, use_cache=False, logits_to_keep=logits_at,
                     **{GATES_KWARG: gates}).logits


def rope_frequencies(model) -> torch.Tensor:
    """RoPE's inverse frequencies [head_dim / 2] (float32): keys rotate by position * these, as transformers'
    `rotate_half` pairs channel i with i + head_dim / 2. Models whose RoPE scales attention are refused."""
    rotary = model.model.rotary_emb
    if getattr(rotary, "attention_scaling", 1.0) != 1.0:
        raise NotImplementedError("RoPE with attention scaling")
    return rotary.inv_freq.float()


@contextmanager
def frozen_weights(model):
    """Weights without gradients for a while (their flags restored after)."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
