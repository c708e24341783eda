"""The engine alone replaying a conversation: the control that service-level tests compare tokens with."""
from __future__ import annotations

from services.engine import Engine, SamplingParams


def replay(loaded, head_map, prompt: str, turns: list[str], new_tokens: int) -> tuple[list[list[int]], int]:
    """Greedy: the tokens of the first reply and of each following turn, and the conversation's final length."""
    engine = Engine(loaded, head_map)
    params = SamplingParams(max_new_tokens=new_tokens)
    state, first = engine.generate(engine.encode(text=prompt), params)
    outs = [first.token_ids]
    for text in turns:
        outs.append(engine.continue_session(state, engine.encode_turn(state.last_token, text=text), params).token_ids)
    return outs, len(state.token_ids)


def replay_logprobs(loaded, head_map, prompt: str, turns: list[str],
                    params: SamplingParams) -> list[tuple[list[int], list[float]]]:
    """As `replay`, under `params` (sampled, logprobs asked): (tokens, logprobs) of the first reply and of each
    following turn. The tiny model's tokens barely depend on its attention; the logprobs do."""
    engine, logprobs = Engine(loaded, head_map), []

    def on_token(event):
        logprobs[-1].append(event.logprob)
    logprobs.append([])
    state, first = engine.generate(engine.encode(text=prompt), params, on_token)
    outs = [first.token_ids]
    for text in turns:
        logprobs.append([])
        outs.append(engine.continue_session(state, engine.encode_turn(state.last_token, text=text), params,
                                            on_token).token_ids)
    return list(zip(outs, logprobs))
