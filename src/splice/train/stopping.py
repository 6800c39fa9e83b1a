"""Stopping a run: SIGINT / SIGTERM ask the loop to stop after the step (and save); a second Ctrl-C aborts."""

from __future__ import annotations

import signal
import sys
from typing import Any


class Abort(KeyboardInterrupt):
    """The second Ctrl-C: leave at once, without a checkpoint."""


class Stop:
    """SIGINT / SIGTERM set a flag (the loop stops after the step and saves); a second Ctrl-C aborts."""

    def __init__(self):
        self.requested = False
        self._old: dict[int, Any] = {}

    def _handler(self, signum, frame):
        if self.requested and signum == signal.SIGINT:
            raise Abort
        self.requested = True
        name = signal.Signals(signum).name
        print(f"\n{name}: stopping after this step and saving a checkpoint (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread: no handlers, KeyboardInterrupt is still caught
                pass
        return self

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
