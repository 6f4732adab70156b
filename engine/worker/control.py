"""Stop requests (SIGTERM, SIGINT) and how the worker honours them.

Before training starts (loading, tokenizing, waiting for a job) a request raises
`Interrupted` at once: nothing is worth saving yet, so the worker exits
EXIT_INTERRUPTED promptly. Once the training loop runs, `defer()` turns a
request into a flag that the step callback reads at the next step boundary,
where the Trainer saves a checkpoint and stops.

This module never touches the Trainer or any file; it only keeps the flag.
"""

from __future__ import annotations

import signal


class Interrupted(BaseException):
    """A stop request before training started. BaseException, so library `except Exception` cannot swallow it."""


class StopControl:
    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None
        self._deferred = False

    def install(self) -> "StopControl":
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        return self

    def defer(self) -> None:
        """From now on a request only sets the flag (the training loop acts on it at a step boundary)."""
        self._deferred = True

    def _on_signal(self, signum, _frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        if not self._deferred:
            raise Interrupted(self.signal_name)
