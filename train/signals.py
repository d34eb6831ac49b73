"""SIGTERM/SIGINT recorded instead of dying, so a job can finish cleanly first (no jax here:
`flaxlm sweep` uses it too)."""

from __future__ import annotations

import signal
from typing import Any


class SignalFlag:
    """A context manager: inside it the first SIGTERM or SIGINT sets `signum`; a second one
    raises KeyboardInterrupt (stop waiting)."""

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> SignalFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum: int, _frame: Any) -> None:
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
