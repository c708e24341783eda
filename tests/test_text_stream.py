"""TextStream: a turn's text, token by token, as the whole decode gives it, with flat work per token."""
from __future__ import annotations

import pytest

from services.engine.models import embedded_tokenizer
from services.engine.text_stream import TextStream

SAMPLES = {
    "prose": "The lighthouse keeper counted the ships: nine, then ten. 'Enough,' she said, and slept.",
    "code": "def f(x):\n    return {'a': [x, x ** 2]}  # squares\n\n\tprint(f(3))\n",
    "emoji and accents": "Café déjà vu 🚀🌍 — naïve coöperation, 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and ½ ≠ ¾.",
    "cjk": "東京は日本の首都です。한국어 문장도 있습니다. Привет, мир!",
    "spaces": "a  b   c\n\n\n   d\t\te  ",
}


@pytest.fixture(scope="module")
def tokenizer():
    return embedded_tokenizer()


def stream(tokenizer, ids: list[int], stop_strings: tuple[str, ...] = ()) -> tuple[TextStream, str]:
    text_stream, deltas = TextStream(tokenizer, stop_strings), []
    for i, token in enumerate(ids):
        deltas.append(text_stream.push(token, flush=i == len(ids) - 1))
        if text_stream.stopped:
            break
    return text_stream, "".join(deltas)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_streamed_text_equals_the_whole_decode(tokenizer, name):
    ids = tokenizer.encode(SAMPLES[name] * 3, add_special_tokens=False)
    text_stream, streamed = stream(tokenizer, ids)
    assert streamed == text_stream.text == tokenizer.decode(ids, skip_special_tokens=True)


def test_a_stop_string_cuts_the_text_and_nothing_of_it_is_emitted(tokenizer):
    ids = tokenizer.encode(SAMPLES["prose"], add_special_tokens=False)
    text_stream, streamed = stream(tokenizer, ids, stop_strings=("then ten",))
    assert text_stream.stopped and streamed == text_stream.text == "The lighthouse keeper counted the ships: nine, "


def test_each_push_decodes_a_few_tokens_however_long_the_turn(tokenizer):
    """The work per token stays flat: no push decodes more than a handful of tokens, over 2,000 of them (the whole
    decode on every push made a turn's detokenising quadratic in its length)."""
    windows: list[int] = []

    class Counting:
        def decode(self, ids, skip_special_tokens=False):
            windows.append(len(ids))
            return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    ids = tokenizer.encode(" ".join(SAMPLES.values()) * 20, add_special_tokens=False)[:2000]
    assert len(ids) == 2000
    text_stream, streamed = stream(Counting(), ids)
    assert streamed == tokenizer.decode(ids, skip_special_tokens=True)
    assert max(windows) <= 8, max(windows)
