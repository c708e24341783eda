"""The hand-built model of tests/planted.py really has the heads it claims.

Scores are computed here from transformers' own eager attention weights, independently of the
engine's profiler (the strict definition: the *previous* copy only), then the profiler is run
on the same model and must select the planted heads.
"""
from __future__ import annotations

import pytest
import torch

from planted import build_planted_llama

T, R = 48, 4  # tokens per repeat, repeats
INDUCTION, ECHO = (1, 2), (1, 0)
VOCAB = 1024


def repeated_ids(t: int, r: int, seed: int = 1, vocab: int = VOCAB, bos: int = 0) -> torch.Tensor:
    """[1, 1 + t*r]: BOS, then t distinct random ids (never BOS) repeated r times."""
    gen = torch.Generator().manual_seed(seed)
    block = torch.randperm(vocab - 2, generator=gen)[:t] + 2
    return torch.cat([torch.tensor([bos]), block.repeat(r)]).unsqueeze(0)


def previous_copy_scores(model, ids: torch.Tensor, t: int, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(induction, echo), each [n_layers, n_heads]: mean attention from every token of repeats 2..r
    onto the token after its previous copy / onto that copy."""
    model.set_attn_implementation("eager")
    with torch.no_grad():
        att = model(ids, output_attentions=True).attentions
    probs = torch.stack([a[0] for a in att])  # [L, H, N, N]
    q = torch.arange(1 + t, 1 + t * r)  # positions in repeats 2..r
    return probs[:, :, q, q - t + 1].mean(-1), probs[:, :, q, q - t].mean(-1)


def others(scores: torch.Tensor, head: tuple[int, int]) -> torch.Tensor:
    mask = torch.ones_like(scores, dtype=torch.bool)
    mask[head] = False
    return scores[mask]


@pytest.fixture(scope="module")
def model():
    return build_planted_llama(induction_head=INDUCTION, echo_head=ECHO, vocab_size=VOCAB)


def test_planted_induction_head_is_the_clear_top(model):
    induction, _ = previous_copy_scores(model, repeated_ids(T, R), T, R)
    assert induction[INDUCTION] > 0.9
    assert others(induction, INDUCTION).max() < 0.1


def test_planted_echo_head_is_the_clear_top(model):
    _, echo = previous_copy_scores(model, repeated_ids(T, R), T, R)
    assert echo[ECHO] > 0.9
    # the layer-0 copy counter attends to BOS and every copy alike (~1/(copies + 2) each)
    assert others(echo, ECHO).max() < 0.4


def test_induction_only_model_and_other_placements():
    m = build_planted_llama(induction_head=(2, 5), n_layers=3, n_heads=6, n_kv_heads=3, vocab_size=VOCAB, seed=3)
    induction, echo = previous_copy_scores(m, repeated_ids(T, R, seed=2), T, R)
    assert induction[2, 5] > 0.9
    assert others(induction, (2, 5)).max() < 0.1
    assert echo.max() < 0.1  # no echo head planted, no counter either


def test_long_sequence_keeps_the_heads():
    m = build_planted_llama(echo_head=ECHO, vocab_size=VOCAB)
    induction, echo = previous_copy_scores(m, repeated_ids(150, 2), 150, 2)  # 301 tokens
    assert induction[INDUCTION] > 0.9 and echo[ECHO] > 0.9


def test_sdpa_matches_eager(model):
    ids = repeated_ids(40, 3)
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        sdpa = model(ids).logits
        model.set_attn_implementation("eager")
        eager = model(ids).logits
    torch.testing.assert_close(sdpa, eager, atol=1e-3, rtol=1e-3)


def test_deterministic_per_seed():
    a, b = (build_planted_llama(echo_head=ECHO, seed=5).state_dict() for _ in range(2))
    assert all(torch.equal(a[k], b[k]) for k in a)
    c = build_planted_llama(echo_head=ECHO, seed=6).state_dict()
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


@pytest.mark.parametrize("kwargs", [
    dict(induction_head=(0, 2)),                    # layer 0 holds the helper heads
    dict(induction_head=(1, 2), echo_head=(1, 3)),  # same KV head (group of 2)
    dict(induction_head=(1, 4)),                    # no such head
    dict(n_heads=4, n_kv_heads=4),                  # not GQA
    dict(head_dim=8),                               # too few RoPE pairs
])
def test_bad_layouts_are_rejected(kwargs):
    with pytest.raises(ValueError):
        build_planted_llama(**kwargs)


def test_engine_profiler_selects_the_planted_heads():
    profiling = pytest.importorskip("services.engine.profiling")
    from services.engine.models import LoadedModel, fingerprint

    m = build_planted_llama(echo_head=ECHO, vocab_size=4096)
    loaded = LoadedModel(m, None, fingerprint(m), "planted", torch.device("cpu"), 2048)
    # 1/8 of 8 query heads = one head each; ids from 2..4095 (the default band is above this vocab)
    params = profiling.ProfileParams(seq_len=40, repeats=3, n_samples=1, induction_fraction=0.125,
                                     echo_fraction=0.125, token_low=2, token_high=4096)
    head_map = profiling.profile_model(loaded, params)
    induction, echo = torch.tensor(head_map.induction), torch.tensor(head_map.echo)
    assert induction.flatten().argmax().item() == INDUCTION[0] * 4 + INDUCTION[1]
    assert echo.flatten().argmax().item() == ECHO[0] * 4 + ECHO[1]
    assert sorted(head_map.retrieval_q_heads) == sorted([INDUCTION, ECHO])
    assert head_map.retrieval_kv_heads == [[], [0, 1]]


# --- copy_output: the induction head drives the predictions ---------------------------------------

COPY_BLOCK, COPY_FILLER = 24, 200


def copy_task(seed: int, vocab: int = VOCAB, bos: int = 0) -> tuple[list[int], list[int]]:
    """(document, block): BOS + a block of distinct random ids + random filler. The filler avoids the
    block's ids: an induction head rightly copies from the *latest* earlier copy of a token."""
    gen = torch.Generator().manual_seed(seed)
    ids = (torch.randperm(vocab - 1, generator=gen) + 1).tolist()
    block, pool = ids[:COPY_BLOCK], ids[COPY_BLOCK:]
    filler = [pool[i] for i in torch.randint(len(pool), (COPY_FILLER,), generator=gen).tolist()]
    return [bos] + block + filler, block


def copy_accuracy(logits: torch.Tensor, block: list[int], skip: int = 2) -> float:
    """logits [len(block), V] over the repeated block -> share of positions (after `skip`) whose
    argmax is the block's next token."""
    pred = logits[skip:-1].argmax(-1)
    return (pred == torch.tensor(block[skip + 1:])).float().mean().item()


@pytest.mark.parametrize("seed", [0, 1])
def test_copy_output_predicts_the_block_again(seed):
    m = build_planted_llama(induction_head=(1, 2), copy_output=True, vocab_size=VOCAB, seed=seed)
    document, block = copy_task(seed + 10)
    with torch.no_grad():
        logits = m(torch.tensor([document + block])).logits[0, len(document):]
    assert copy_accuracy(logits, block) >= 0.9


def test_without_copy_output_the_induction_head_does_not_drive_predictions():
    m = build_planted_llama(induction_head=(1, 2), vocab_size=VOCAB)
    document, block = copy_task(10)
    with torch.no_grad():
        logits = m(torch.tensor([document + block])).logits[0, len(document):]
    assert copy_accuracy(logits, block) < 0.2


def test_copy_output_needs_the_planted_heads_kv_in_the_compressed_cache():
    engine_mod = pytest.importorskip("services.engine")
    from services.engine.evaluation import full_prefill
    from planted_loaded import planted_loaded

    loaded = planted_loaded(induction_head=(1, 2), copy_output=True, vocab_size=VOCAB)
    engine = engine_mod.Engine(loaded)
    fp = loaded.fingerprint
    document, block = copy_task(11)
    keys, values = full_prefill(engine, document)
    params = engine_mod.CompressionParams(sink=2, min_window=16, ratio=1e9)  # local heads: 2 + 16 tokens
    planted_kv = (1, 2 // fp.group_size)
    every = [[h for h in range(fp.n_kv_heads)] for _ in range(fp.n_layers)]

    def accuracy(retrieval_kv_heads) -> float:
        cache = engine_mod.CompressedKVCache.from_full(keys, values, retrieval_kv_heads, params)
        return copy_accuracy(engine_mod.forward_all(engine.model, block, cache), block)

    only_planted = [[planted_kv[1]] if layer == planted_kv[0] else [] for layer in range(fp.n_layers)]
    all_but_planted = [[h for h in heads if (layer, h) != planted_kv] for layer, heads in enumerate(every)]
    assert accuracy(only_planted) >= 0.9
    assert accuracy([[] for _ in range(fp.n_layers)]) < 0.5
    assert accuracy(all_but_planted) < 0.5
