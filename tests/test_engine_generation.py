"""Model loading, sampling, stop conditions, cancellation, chat turns."""
from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from services.engine import (ContextLengthError, Engine, HeadMap, ModelLoadError, SamplingParams,
                             SessionMismatchError, load_model)
from services.engine.sampling import sample
from tests.engine_models import smollm2, tiny


def test_missing_path_and_unsupported_model(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(str(tmp_path / "nope"))
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=8, vocab_size=50)).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(ModelLoadError, match="llama, mistral"):
        load_model(str(tmp_path / "gpt2"))


def test_loads_a_checkpoint_directory(tmp_path):
    src = tiny()
    src.model.save_pretrained(tmp_path / "m")
    src.tokenizer.save_pretrained(tmp_path / "m")
    loaded = load_model(str(tmp_path / "m"), "cpu")
    assert loaded.fingerprint == src.fingerprint


def test_sampling_params_validation():
    for bad, field in (({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"),
                       ({"top_k": -3}, "top_k"), ({"max_new_tokens": 0}, "max_new_tokens"),
                       ({"stop_strings": [""]}, "stop_strings")):
        with pytest.raises(ValueError, match=field):
            SamplingParams(**bad)


@pytest.mark.parametrize("top_p, temperature", [(1e-320, 10.0), (1e-50, 10.0), (1e-8, 10.0), (1.0, 1e-320),
                                                 (1.0, 1e-40), (0.5, 1e-320)])
def test_a_top_p_or_temperature_too_small_for_float32_picks_the_most_likely_token(top_p, temperature):
    """top_p = 1e-50 or temperature = 1e-320 passes validation (above 0) but is 0 in float32. Every token's mass
    before it (0 for the most likely) reached such a top_p, so every token was dropped; such a temperature
    divided 0 by 0. Both sampled from NaN and the turn failed with INTERNAL."""
    logits = torch.randn(64, generator=torch.Generator().manual_seed(3))
    gen = torch.Generator().manual_seed(0)
    picked = {sample(logits, SamplingParams(temperature=temperature, top_p=top_p), gen).token for _ in range(5)}
    assert picked == {int(logits.argmax())}


def test_seeded_sampling_is_reproducible_and_differs_by_seed():
    engine = Engine(tiny())
    run = lambda seed: engine.generate(list(range(10, 30)), SamplingParams(  # noqa: E731
        max_new_tokens=15, temperature=1.5, top_k=50, top_p=0.9, seed=seed, logprobs=True))[1]
    a, b, c = run(1), run(1), run(2)
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids


def test_batched_sampling_equals_each_row_sampled_alone():
    """`sample_rows` (one argmax for the plain greedy rows of a step) gives every row what `sample` gives it:
    greedy with and without log-probabilities, and seeded sampling with its own generator."""
    import torch

    from services.engine.sampling import make_generator, sample, sample_rows

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)   # [n, V]
    params = [SamplingParams(), SamplingParams(logprobs=True, top_logprobs=3),
              SamplingParams(temperature=0.8, top_k=20, seed=7), SamplingParams()]
    batched = sample_rows(logits, params, [make_generator(p, torch.device("cpu")) for p in params])
    alone = [sample(logits[row], p, make_generator(p, torch.device("cpu"))) for row, p in enumerate(params)]
    assert batched == alone
    assert batched[0].token == int(logits[0].float().argmax()) and batched[1].logprob is not None


def test_stop_token_stop_string_cancel_and_context():
    loaded = tiny()
    engine = Engine(loaded)
    prompt = list(range(40, 60))
    free = engine.generate(prompt, SamplingParams(max_new_tokens=8))[1]
    stop_at = free.token_ids[3]
    stopped = engine.generate(prompt, SamplingParams(max_new_tokens=8, stop_token_ids=[stop_at]))[1]
    assert stopped.finish_reason == "stop" and stopped.token_ids == free.token_ids[:free.token_ids.index(stop_at) + 1]

    needle = free.text[len(free.text) // 2:][:3]
    by_string = engine.generate(prompt, SamplingParams(max_new_tokens=8, stop_strings=[needle]))[1]
    assert by_string.finish_reason == "stop" and needle not in by_string.text

    events = []
    state, cancelled = engine.generate(prompt, SamplingParams(max_new_tokens=50),
                                       on_token=lambda e: events.append(e) or len(events) < 3)
    assert cancelled.finish_reason == "cancelled" and cancelled.generated_tokens == 3
    # the session stays consistent: it can continue, and every token is accounted for
    assert state.cache.seq_length == len(state.token_ids) - 1
    engine.continue_session(state, [77], SamplingParams(max_new_tokens=2))
    assert state.cache.seq_length == len(state.token_ids) - 1

    with pytest.raises(ContextLengthError, match="exceeds the model's context"):
        engine.generate(prompt, SamplingParams(max_new_tokens=loaded.max_context))


def test_session_from_other_model_is_refused():
    state, _ = Engine(tiny(0)).generate([5, 6, 7], SamplingParams(max_new_tokens=1))
    with pytest.raises(SessionMismatchError, match="start a new session"):
        Engine(tiny(1)).continue_session(state, [8], SamplingParams(max_new_tokens=1))


def test_streamed_text_equals_result_text():
    engine = Engine(tiny())
    pieces = []
    _, result = engine.generate(list(range(200, 220)), SamplingParams(max_new_tokens=20),
                                on_token=lambda e: pieces.append(e.text))
    assert "".join(pieces) == result.text


@pytest.mark.slow
def test_chat_turn_appends_exactly_the_template_delta():
    loaded = smollm2()
    engine = Engine(loaded, HeadMap.full(loaded.fingerprint))
    first = [{"role": "user", "content": "Name a colour."}]
    state, reply = engine.generate(engine.encode(messages=first), SamplingParams(max_new_tokens=12), chat=True)
    second = {"role": "user", "content": "And a fruit?"}
    turn = engine.encode_turn(state.last_token, messages=[second])
    history = first + [{"role": "assistant", "content": reply.text}, second]
    expected = loaded.tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
    rendered = loaded.tokenizer.decode(state.token_ids + turn)
    if reply.finish_reason == "stop":
        assert rendered == expected
    else:  # a reply cut by length is closed by the template's end-of-turn text
        assert rendered.endswith(expected[expected.index("<|im_start|>user\nAnd a fruit?"):])
