"""Generated tokens → text, as it arrives, never printing half a character or half a stop string.

A token is a run of bytes, not of characters: cl100k splits many Chinese characters over two or
three tokens. The incremental UTF-8 decoder keeps an incomplete character's bytes until the rest
arrives (bytes that can never complete become U+FFFD). Text that might be the start of a stop
string waits until it is clear; a complete stop string ends the text before it.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable, Sequence


class TextStream:
    """Feed token bytes with `push`; print what it returns; `finish` returns the rest."""

    def __init__(self, stop: Sequence[str] = ()) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._stop = [s for s in stop if s]
        self._held = ""
        self.stopped = False  # a stop string was seen: everything after it is dropped
        self.text = ""  # all text released so far

    def push(self, data: bytes) -> str:
        if self.stopped:
            return ""
        return self._release(self._held + self._decoder.decode(data), final=False)

    def finish(self) -> str:
        if self.stopped:
            return ""
        return self._release(self._held + self._decoder.decode(b"", final=True), final=True)

    def _release(self, pending: str, final: bool) -> str:
        hits = [i for i in (pending.find(s) for s in self._stop) if i >= 0]
        if hits:
            self.stopped = True
            ready, self._held = pending[:min(hits)], ""
        else:
            hold = 0 if final else _partial_stop(pending, self._stop)
            ready, self._held = pending[:len(pending) - hold], pending[len(pending) - hold:]
        self.text += ready
        return ready


def _partial_stop(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is the beginning of some stop string."""
    longest = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:n]):
                longest = n
                break
    return longest


def render(pieces: Sequence[bytes], stop: Sequence[str] = ()) -> tuple[str, bool]:
    """(text, whether a stop string ended it) for a finished sequence of token bytes."""
    stream = TextStream(stop)
    for data in pieces:
        stream.push(data)
    stream.finish()
    return stream.text, stream.stopped


class StopBytes:
    """`stop(tokens)` for the decoder: does the newest token complete a stop string?

    Every token has at least one byte, so a stop string of n bytes that ends in the newest token
    lies within the last n tokens; checking only those keeps each step O(1).
    """

    def __init__(self, stop: Sequence[str], token_bytes: Callable[[int], bytes]) -> None:
        self._stops = [s.encode("utf-8") for s in stop if s]
        self._window = max((len(s) for s in self._stops), default=0)
        self._token_bytes = token_bytes

    def __bool__(self) -> bool:
        return bool(self._stops)

    def __call__(self, tokens: list[int]) -> bool:
        tail = b"".join(self._token_bytes(t) for t in tokens[-self._window:])
        return any(s in tail for s in self._stops)
