"""Stop strings, matched across token boundaries and never emitted.

Text that could be the start of a stop string is held back until it either completes the
stop string (everything from the match on is dropped) or can no longer match (released).
"""

from __future__ import annotations


class StopMatcher:
    """Feeds text through; reports the first stop-string match. Mutates only itself."""

    def __init__(self, stops: list[str]) -> None:
        self._stops = [s for s in stops if s]
        self._held = ""
        self.matched: str | None = None

    def feed(self, text: str) -> tuple[str, bool]:
        """Return (text safe to emit, whether a stop string matched)."""
        if self.matched is not None:
            return "", True
        if not self._stops:
            return text, False
        buf = self._held + text
        hit = self._earliest_match(buf)
        if hit is not None:
            pos, stop = hit
            self._held = ""
            self.matched = stop
            return buf[:pos], True
        keep = self._partial_suffix(buf)
        self._held = buf[len(buf) - keep:] if keep else ""
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        """Release held text at the end of a sequence (it never became a stop string)."""
        held, self._held = self._held, ""
        return held

    def _earliest_match(self, buf: str) -> tuple[int, str] | None:
        best: tuple[int, str] | None = None
        for stop in self._stops:
            pos = buf.find(stop)
            if pos >= 0 and (best is None or pos < best[0]):
                best = (pos, stop)
        return best

    def _partial_suffix(self, buf: str) -> int:
        """Length of the longest suffix of ``buf`` that is a proper prefix of a stop string."""
        keep = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(buf)), keep, -1):
                if buf.endswith(stop[:k]):
                    keep = k
                    break
        return keep
