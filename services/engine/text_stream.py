"""TextStream: a turn's tokens as text, incrementally, holding back what a stop string might still claim.

It runs on the model loop for every generated token, so each push decodes only a short window of the newest
tokens (the prefix / read offsets of vLLM's and TGI's detokenizers), never the whole turn: decoding everything
again on every token costs the loop O(n) per token (0.18 ms at 1,000 tokens, per session and step, measured on
SmolLM2's tokenizer). The window starts a few tokens back so that tokenizers whose first decoded token loses its
leading space, or whose token splits a UTF-8 character, still give each new piece exactly.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"   # what a decode shows for an incomplete UTF-8 sequence


class TextStream:
    def __init__(self, tokenizer, stop_strings: tuple[str, ...]):
        self.tokenizer, self.stop_strings = tokenizer, stop_strings
        self.holdback = max((len(s) for s in stop_strings), default=1) - 1
        self.ids: list[int] = []
        self._prefix = self._read = 0   # ids[prefix:read] gave the tail of `text`; ids[read:] await whole characters
        self.text = ""                  # the decoded text so far (cut at a stop string once one is found)
        self.emitted = 0                # characters of `text` handed out
        self._searched = 0              # stop strings were looked for in text[:searched]
        self.stopped = False

    def push(self, token_id: int | None, flush: bool) -> str:
        """Add a token (None for a stop token, which has no text) -> the text now safe to emit."""
        if token_id is not None:
            self.ids.append(token_id)
        if not self.stopped:
            self._decode_new(final=flush)
            self._find_stop()
        if self.stopped or flush:
            safe = len(self.text)
        else:
            safe = len(self.text) - self.holdback
        delta = self.text[self.emitted: max(safe, self.emitted)]
        self.emitted += len(delta)
        return delta

    def _decode_new(self, final: bool) -> None:
        """Append the text of the tokens after `read`, once they make whole characters (or at the end)."""
        decode = self.tokenizer.decode
        before = decode(self.ids[self._prefix:self._read], skip_special_tokens=True)
        window = decode(self.ids[self._prefix:], skip_special_tokens=True)
        if len(window) > len(before) and (final or not window.endswith(REPLACEMENT)):
            self.text += window[len(before):]
            self._prefix, self._read = self._read, len(self.ids)

    def _find_stop(self) -> None:
        # A stop string found now ends after what was searched before: look only at the tail it can start in
        # (the longest one's length less one back, which is the holdback).
        start = max(0, self._searched - self.holdback)
        hits = [at for at in (self.text.find(s, start) for s in self.stop_strings) if at >= 0]
        self._searched = len(self.text)
        if hits:
            self.stopped, self.text = True, self.text[:min(hits)]
