"""The time a tier's transfers take when several run at once on its I/O threads.

The load policy prices ``n`` blocks from a tier as ``n · block_bytes / bandwidth``: the
bandwidth is the tier's throughput. Four writes in flight on a store that serves one at a
time each take about four times as long as one alone; timed one by one, they would make the
tier look four times slower than it is. ``IOClock`` charges each transfer the wall time from
its start, or from the previous transfer's end if that came later, to its own end: the
charges of a busy period add up to its wall time, so bytes over charge is the throughput.
One transfer alone is charged its own time.
"""

from __future__ import annotations

import threading
import time


class IOClock:
    """Shared by the I/O threads of one tier (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last_end = 0.0

    @staticmethod
    def start() -> float:
        return time.perf_counter()

    def charge(self, start: float) -> float:
        """The seconds charged to a transfer that began at ``start`` and ends now (read under
        the lock, so ends are in order and no charge is negative)."""
        with self._lock:
            end = time.perf_counter()
            seconds = end - max(start, self._last_end)
            self._last_end = end
        return seconds
