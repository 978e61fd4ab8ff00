"""Text out of token ids as they arrive: incremental detokenization and stop strings.

A token's text is only known in context (a multi-byte character may span tokens, a
SentencePiece space belongs to the next piece), so each request row keeps one stream
decoder. Stop strings are matched on that text across token boundaries: text that could be
the start of a stop string is held back until it is known not to be, and a matched stop
string never reaches the caller.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from hybridgraph.request import RequestError

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256


def validate_stop(stop: Any) -> tuple[str, ...]:
    """A request's stop strings; RequestError("stop", ...) says what is wrong."""
    if stop is None:
        return ()
    if isinstance(stop, str) or not isinstance(stop, Sequence):
        raise RequestError("stop", "must be a list of strings")
    if len(stop) > MAX_STOP_STRINGS:
        raise RequestError("stop", f"{len(stop)} stop strings; at most {MAX_STOP_STRINGS}")
    for i, s in enumerate(stop):
        if not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_CHARS:
            raise RequestError("stop", f"stop[{i}] must be a string of 1 to {MAX_STOP_CHARS} "
                                       "characters")
    return tuple(stop)


class StopMatcher:
    """Feeds text through; cuts it before the first stop string."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self._held = ""

    def push(self, text: str) -> tuple[str, bool]:
        """(text safe to emit, whether a stop string was found)."""
        buf = self._held + text
        if not self.stops:
            self._held = ""
            return buf, False
        # The held text contains no whole stop string, so any match ends in the new text;
        # the earliest start wins.
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self._held = ""
            return buf[:min(hits)], True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(buf)), keep, -1):
                if buf.endswith(s[:k]):
                    keep = k
                    break
        self._held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        out, self._held = self._held, ""
        return out


class TextStream:
    """One row's text: step(token) gives the text to emit now and whether a stop string
    ended the row; `text` is everything emitted so far."""

    def __init__(self, tokenizer: Any, stop: Sequence[str] = ()) -> None:
        self._decoder = tokenizer.stream_decoder()
        self._matcher = StopMatcher(stop)
        self.text = ""
        self.stopped = False

    def step(self, token: int, final: bool = False) -> tuple[str, bool]:
        """The text delta for `token`; final=True (the row ends with this token for another
        reason) also releases text held back for a partial stop string."""
        if self.stopped:
            return "", True
        piece = self._decoder.step(token)
        if final:
            piece += self._decoder.flush()
        out, self.stopped = self._matcher.push(piece)
        if final and not self.stopped:
            out += self._matcher.flush()
        self.text += out
        return out, self.stopped
