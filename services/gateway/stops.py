"""Stop sequences over streamed text: hold back what could start a stop sequence, cut at the first match.

Pure and incremental: text arrives piece by piece (one piece per generated token), and a stop sequence
may span several pieces. Text that could still become a stop sequence is held back; it is released as
soon as it cannot (or at the end, by `flush`).
"""

from __future__ import annotations

from typing import Sequence


class StopMatcher:
    """Feed text pieces in order; get back the text that is safe to emit."""

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not s for s in stops):
            raise ValueError("stop sequences must be non-empty")
        self._stops = tuple(stops)
        self._held = ""
        self.stopped = False

    @property
    def held(self) -> str:
        """Text held back because it may be the start of a stop sequence."""
        return self._held

    def feed(self, text: str) -> tuple[str, bool]:
        """Add a piece; return (text to emit now, whether a stop sequence matched).

        On a match the text returned is everything before the earliest match, and the stop sequence and
        whatever follows are dropped; every later call returns ("", True).
        """
        if self.stopped:
            return "", True
        buf = self._held + text
        if not self._stops:
            return buf, False
        cut = min((i for i in (buf.find(s) for s in self._stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            self.stopped = True
            return buf[:cut], True
        keep = self._partial_len(buf)
        self._held = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], False

    def flush(self) -> str:
        """Release the held-back text (the generation ended without completing a stop sequence)."""
        out, self._held = self._held, ""
        return "" if self.stopped else out

    def _partial_len(self, buf: str) -> int:
        """Length of the longest suffix of buf that is a proper prefix of some stop sequence."""
        best = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(buf)), best, -1):
                if buf.endswith(s[:k]):
                    best = k
                    break
        return best
