"""Token ids -> text deltas for a stream, so that the deltas join to the full decode.

Decoding each token alone is wrong twice over: a multi-byte character split over tokens
comes out as U+FFFD, and tokenizers that drop or add a leading space depend on what came
before. So decode a short window (from the last point where text was emitted) and emit
only what it adds, holding back text that ends in U+FFFD (an incomplete character) until
the next token completes it or the stream ends.
"""

from __future__ import annotations

from collections.abc import Callable

REPLACEMENT = "\ufffd"


class TextDeltas:
    def __init__(self, decode: Callable[[list[int]], str]) -> None:
        self.decode = decode
        self.ids: list[int] = []
        self.prefix = 0  # window start: ids before it are emitted and never re-decoded
        self.read = 0    # ids[prefix:read] decode to the text emitted from this window

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._emit(final=False)

    def flush(self) -> str:
        """The rest, incomplete characters included (the stream has ended)."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        done = self.decode(self.ids[self.prefix:self.read])
        text = self.decode(self.ids[self.prefix:])
        if len(text) <= len(done) or (text.endswith(REPLACEMENT) and not final):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(done):]
