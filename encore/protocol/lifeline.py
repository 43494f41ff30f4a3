"""Child processes exit when their parent dies (no orphaned workers holding memory)."""

from __future__ import annotations

import os
import threading
import time


def exit_with_parent(interval_s: float = 0.5) -> None:
    """Start a daemon thread that ends this process once its parent is gone."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(interval_s)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, daemon=True, name="lifeline").start()
