"""Contract test of the transformers adapter (services/engine/hf.py): what the engine relies on, in one place.

A transformers upgrade that changes how a Llama forward reaches the cache or the attention function fails here
first, with a message about the adapter rather than somewhere deep in batching.
"""
from __future__ import annotations

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.cache_utils import Cache, CacheLayerMixin

from services.engine import attention, hf
from tests.engine_models import tiny


class Recorder:
    """A step target that records what the model hands it and attends with plain causal SDPA."""

    def __init__(self):
        self.appended, self.queries, self.keys, self.values = [], [], {}, {}

    def append(self, layer_idx, key_states, value_states):
        self.appended.append((layer_idx, tuple(key_states.shape)))
        self.keys[layer_idx], self.values[layer_idx] = key_states, value_states

    def attend(self, layer_idx, query, scale):
        self.queries.append((layer_idx, tuple(query.shape)))
        return attention.sdpa(query, self.keys[layer_idx], self.values[layer_idx], scale)


def test_step_cache_is_a_transformers_cache_routing_updates_to_the_target():
    target = Recorder()
    cache = hf.StepCache(3, target)
    assert isinstance(cache, Cache) and all(isinstance(layer, CacheLayerMixin) for layer in cache.layers)
    k = torch.randn(1, 2, 5, 4)
    keys, values = cache.update(k, k + 1, 2)
    assert keys is k and target.appended == [(2, (1, 2, 5, 4))]


def test_forward_step_reaches_every_layer_and_equals_the_model_with_sdpa():
    loaded = tiny()
    model, dims = loaded.model, hf.model_dims(loaded.model.config)
    hf.install(model, attention.razor_attention)
    assert ALL_ATTENTION_FUNCTIONS.get_interface(hf.ATTN_NAME, None) is attention.razor_attention
    ids = torch.randint(100, 20000, (1, 9), generator=torch.Generator().manual_seed(0))
    target = Recorder()
    logits = hf.forward_step(model, ids, torch.arange(9)[None], target, torch.tensor([3, 8]))    # [2, V]
    assert [layer for layer, _ in target.appended] == list(range(dims.n_layers))
    assert target.appended[0][1] == (1, dims.n_kv_heads, 9, dims.head_dim)
    assert target.queries[0][1] == (1, dims.n_heads, 9, dims.head_dim)
    model.set_attn_implementation("sdpa")
    try:
        with torch.no_grad():
            reference = model(ids).logits[0]                                                     # [9, V]
    finally:
        model.set_attn_implementation(hf.ATTN_NAME)
    assert logits.shape == (2, dims.vocab_size)
    torch.testing.assert_close(logits, reference[[3, 8]], atol=1e-4, rtol=1e-4)


def test_explicit_positions_reach_rope_at_its_frequencies():
    """A packed batch relies on position_ids: the same token at position 7 gets position 7's rotation. And
    `rope_frequencies`' claim: that rotation turns channels i and i + D / 2 by 7 * frequency i (what a bench
    un-rotates keys with)."""
    loaded = tiny()
    hf.install(loaded.model, attention.razor_attention)
    ids = torch.tensor([[500, 501]])
    at_zero, at_seven = Recorder(), Recorder()
    hf.forward_step(loaded.model, ids, torch.tensor([[0, 1]]), at_zero)
    hf.forward_step(loaded.model, ids, torch.tensor([[7, 8]]), at_seven)
    assert not torch.allclose(at_zero.keys[0], at_seven.keys[0])
    torch.testing.assert_close(at_zero.values[0], at_seven.values[0])   # values carry no rotation
    frequencies = hf.rope_frequencies(loaded.model)                                    # [D / 2]
    assert frequencies.shape == (at_zero.keys[0].shape[-1] // 2,)
    cos, sin = (7 * frequencies).cos(), (7 * frequencies).sin()
    first, second = at_zero.keys[0].float().chunk(2, -1)          # layer 0: keys of the tokens alone
    turned = torch.cat([first * cos - second * sin, second * cos + first * sin], -1)
    torch.testing.assert_close(turned, at_seven.keys[0].float(), atol=1e-5, rtol=1e-4)


def test_model_dims_read_the_config():
    dims = hf.model_dims(tiny().model.config)
    assert (dims.model_type, dims.n_layers, dims.n_heads, dims.n_kv_heads, dims.head_dim) == ("llama", 4, 4, 2, 16)
    assert dims.eos_ids == (2,) and dims.bos_id == 1 and dims.max_context == 4096
