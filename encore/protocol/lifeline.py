"""Children of the server: the parent alone decides when they stop.

A terminal's Ctrl-C or a ``kill`` of the whole process group reaches every process; the
children ignore SIGINT and SIGTERM, the server orders the shutdown (drain, flush the KV cache
to disk, then ``Shutdown`` down the line), and nothing restarts once it has begun. A child
whose parent is gone (``kill -9``) exits on its own (no orphaned worker holding memory).
"""

from __future__ import annotations

import os
import signal
import threading
import time


def ignore_group_signals() -> None:
    """SIGINT and SIGTERM sent to the process group are the server's to act on."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def exit_with_parent(interval_s: float = 0.5) -> None:
    """Start a daemon thread that ends this process once its parent is gone."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="lifeline").start()
