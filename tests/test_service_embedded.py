"""The embedded SmolLM2 behind the real service: a chat whose turns equal the engine in-process."""
from __future__ import annotations

import pytest

from services.engine import Engine, SamplingParams, load_model
from services.engine.headmap import shipped_head_map
from services.inference.client import RazorClient

pytestmark = pytest.mark.slow

CHAT = [{"role": "user", "content": "Name three colours of the rainbow."}]
FOLLOW_UP = [{"role": "user", "content": "And two more?"}]


def test_chat_turns_over_grpc_equal_the_engine(start_server):
    loaded = load_model(None, device="cpu")
    head_map = shipped_head_map(loaded.fingerprint)
    assert head_map is not None, "the engine ships a head map for the embedded model"
    server = start_server(loaded=loaded, head_map=head_map, kv_budget_bytes=1)  # spill between turns too
    with RazorClient(server.target) as client:
        first = client.generate(messages=CHAT, max_new_tokens=24)
        second = client.continue_session(first.session_id, messages=FOLLOW_UP, max_new_tokens=16)
    engine, params = Engine(loaded, head_map), SamplingParams(max_new_tokens=24)
    state, expected_first = engine.generate(engine.encode(messages=CHAT), params, chat=True)
    expected_second = engine.continue_session(state, engine.encode_turn(state.last_token, messages=FOLLOW_UP),
                                              SamplingParams(max_new_tokens=16))
    assert first.token_ids == expected_first.token_ids and first.text.strip()
    assert second.token_ids == expected_second.token_ids
    assert second.cached_tokens > 0, "the history was not re-run"
