"""GPU checks (issue 15 §4). They run only where CUDA exists; CI on CPU reports them skipped.

1. With every head a retrieval head, the engine in bfloat16 on the GPU reproduces transformers' own bf16
   generation: the same greedy tokens over 64 steps, logits allclose at bf16 tolerance.
2. The compressed path with flash-attn equals the same path with PyTorch SDPA (flash-attn switched off).
3. A batch of sessions decodes on the GPU to the same greedy tokens as each session alone.
"""
from __future__ import annotations

import copy

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(scope="module")
def loaded():
    from services.engine import load_model

    return load_model("tiny-random", device="cuda", dtype="bfloat16")


def prompt(n: int = 96, seed: int = 0) -> list[int]:
    return torch.randint(100, 20000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def test_full_map_equals_transformers_bf16_generation(loaded):
    from transformers import DynamicCache

    from services.engine import Engine, HeadMap, forward

    reference = copy.deepcopy(loaded.model)
    reference.set_attn_implementation("sdpa")
    cache, ref_cache = Engine(loaded, HeadMap.full(loaded.fingerprint)).new_cache(), DynamicCache(config=reference.config)
    ids = prompt()
    with torch.no_grad():
        ref = reference(torch.tensor([ids], device="cuda"), cache=ref_cache, use_cache=True).logits[0, -1]
    got = forward(loaded.model, ids, cache)
    for _ in range(64):
        torch.testing.assert_close(got.float(), ref.float(), atol=2e-2, rtol=2e-2)
        token = int(ref.argmax())
        assert int(got.argmax()) == token
        with torch.no_grad():
            ref = reference(torch.tensor([[token]], device="cuda"), cache=ref_cache, use_cache=True).logits[0, -1]
        got = forward(loaded.model, [token], cache)


def test_flash_attn_path_equals_sdpa_path(loaded, monkeypatch):
    pytest.importorskip("flash_attn")
    from services.engine import CompressionParams, Engine, HeadMap, attention, forward

    fp = loaded.fingerprint
    full = HeadMap.full(fp, CompressionParams(sink=4, min_window=16, ratio=4.0))
    layout = [[0] if layer % 2 else [] for layer in range(fp.n_layers)]   # local heads in every layer
    head_map = HeadMap(fp, full.induction, full.echo, [(layer, 0) for layer in range(fp.n_layers)], layout,
                       full.compression)
    engine = Engine(loaded, head_map)

    def run() -> torch.Tensor:
        cache = engine.new_cache()
        rows = [forward(loaded.model, prompt(200), cache)]
        for token in prompt(16, seed=1):
            rows.append(forward(loaded.model, [token], cache))
        return torch.stack(rows).float()

    with_flash = run()
    monkeypatch.setattr(attention, "flash_attn_func", None)
    torch.testing.assert_close(with_flash, run(), atol=2e-2, rtol=2e-2)


def test_batch_equals_alone_on_the_gpu(loaded):
    from services.engine import Engine, HeadMap, SamplingParams, Scheduler, SchedulerConfig, TurnRequest

    engine = Engine(loaded, HeadMap.full(loaded.fingerprint))
    params = SamplingParams(max_new_tokens=24)
    prompts = [prompt(20 + 13 * i, seed=i) for i in range(6)]
    alone = [engine.generate(p, params)[1].token_ids for p in prompts]
    scheduler, results = Scheduler(engine, SchedulerConfig(max_running=6, step_tokens=512)), {}
    for i, p in enumerate(prompts):
        scheduler.submit(TurnRequest(engine.new_session(), p, params, on_done=lambda r, i=i: results.__setitem__(i, r)))
    scheduler.run_until_idle()
    assert [results[i].token_ids for i in range(6)] == alone
