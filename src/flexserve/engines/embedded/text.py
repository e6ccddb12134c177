"""Generated token bytes turned into text that is safe to send.

A token is a run of bytes, not of characters: a UTF-8 character may be split
across tokens, and the client must never see half of one. A stop string may
also be split across tokens, and the client must never see any of it. So
text is released only once it is known to be whole and not the start of a
stop string, and the tokens it came from are released with it: a token's
log probabilities travel with the delta that carries (the start of) its
text, and the tokens that only spelled a stop string are never reported.
"""

from __future__ import annotations

import codecs
from collections import deque
from collections.abc import Sequence
from typing import Generic, TypeVar

_T = TypeVar("_T")


class TextAssembler(Generic[_T]):
    """One choice's text, released as it becomes safe to send.

    ``feed`` may tag a token's bytes with anything (its log probabilities);
    ``take_tokens`` hands back the tags of the tokens whose text has been
    released, each with the offset in the choice's text where the token starts.
    """

    def __init__(self, stop: Sequence[str]) -> None:
        self._stop = [s for s in stop if s]
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""
        #: True once a stop string has been seen; nothing more is released.
        self.stopped = False
        # Characters decoded so far, and how many of them have been released.
        self._num_decoded = 0
        self._num_released = 0
        # Tagged tokens whose text is not (wholly) released yet: (start offset, tag).
        self._pending: deque[tuple[int, _T]] = deque()
        self._released: list[tuple[int, _T]] = []

    def feed(self, piece: bytes, tag: _T | None = None) -> str:
        """Add one token's bytes; return the text that can be sent now."""
        if self.stopped:
            return ""
        if tag is not None:
            self._pending.append((self._num_decoded, tag))
        text = self._decoder.decode(piece)
        self._num_decoded += len(text)
        self._held += text
        return self._release(final=False)

    def finish(self) -> str:
        """The generation ended without a stop string: release what is held."""
        if self.stopped:
            return ""
        text = self._decoder.decode(b"", final=True)
        self._num_decoded += len(text)
        self._held += text
        released = self._release(final=True)
        self._released.extend(self._pending)
        self._pending.clear()
        return released

    def take_tokens(self) -> list[tuple[int, _T]]:
        """The tagged tokens released since the last call, with their start offsets."""
        released, self._released = self._released, []
        return released

    def _release(self, *, final: bool) -> str:
        held = self._held
        hits = [i for i in (held.find(s) for s in self._stop) if i >= 0] if self._stop else []
        if hits:
            self.stopped = True
            self._held = ""
            out = held[: min(hits)]
        else:
            keep = 0 if final or not self._stop else self._longest_stop_prefix_suffix(held)
            self._held = held[len(held) - keep :]
            out = held[: len(held) - keep]
        self._num_released += len(out)
        if self._pending:
            self._move_released_tokens()
        return out

    def _move_released_tokens(self) -> None:
        # A token is released with the first of its characters; after a stop
        # string, the tokens that only spelled it are dropped.
        pending = self._pending
        while pending and pending[0][0] < self._num_released:
            self._released.append(pending.popleft())
        if self.stopped:
            pending.clear()

    def _longest_stop_prefix_suffix(self, text: str) -> int:
        # A suffix that does not start any stop string can never become part
        # of one, so only the longest candidate suffix needs to wait.
        longest = max(len(s) for s in self._stop)
        for size in range(min(len(text), longest - 1), 0, -1):
            tail = text[-size:]
            if any(s.startswith(tail) for s in self._stop):
                return size
        return 0
