"""Requests from outside the training loop, and how the worker honours them.

Two sources: signals (SIGTERM, SIGINT: stop; SIGTERM also when the parent dies,
`die_with_parent`) and control lines from the daemon
on stdin after the job spec (`protocol.WORKER_COMMANDS`: pause, resume,
checkpoint, stop, set_disk_reserve). A daemon thread reads stdin on rank 0 and
only records what was asked; the training loop reads the record at a step
boundary, where rank 0 broadcasts it so every rank acts on the same step. EOF on
stdin means the daemon is gone: that is a stop.

Before training starts (loading, tokenizing, waiting for a job) a signal raises
`Interrupted` at once: nothing is worth saving yet, so the worker exits
EXIT_INTERRUPTED promptly. A stop from stdin cannot raise in the main thread;
`raise_if_requested()` is checked at the points where the worker can still leave
cheaply. Once the training loop runs, `defer()` turns every request into a flag
that the step callback reads at the next step boundary, where the Trainer saves
a checkpoint and stops.

This module never touches the Trainer, torch or any file; it only keeps flags.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import sys
import threading
from typing import IO

from engine.core import protocol

PR_SET_PDEATHSIG = 1


def die_with_parent() -> bool:
    """SIGTERM to us when the parent dies; False when the parent is already gone."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    # The parent may have died before prctl took effect: then we were re-parented already.
    return parent != 1 and os.getppid() == parent


class Interrupted(BaseException):
    """A stop request before training started. BaseException, so library `except Exception` cannot swallow it."""


class StopControl:
    def __init__(self) -> None:
        self.requested = False
        self.signal_name: str | None = None  # what asked: "SIGTERM", "SIGINT", "stop command", "stdin closed"
        self._deferred = False

    def install(self) -> "StopControl":
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        return self

    def defer(self) -> None:
        """From now on a request only sets the flag (the training loop acts on it at a step boundary)."""
        self._deferred = True

    def request(self, why: str) -> None:
        """A stop asked from another thread: only the flag (see raise_if_requested)."""
        if not self.requested:
            self.signal_name = why
        self.requested = True

    def raise_if_requested(self) -> None:
        if self.requested and not self._deferred:
            raise Interrupted(self.signal_name or "stop")

    def _on_signal(self, signum, _frame) -> None:
        self.requested = True
        self.signal_name = signal.Signals(signum).name
        if not self._deferred:
            raise Interrupted(self.signal_name)


class Commands:
    """What the daemon asked on stdin, as flags the step boundary reads (rank 0 only).

    `pause` is the wanted state (pause/resume set and clear it); `checkpoint` is
    one-shot (`take_checkpoint()` consumes it); `disk_reserve` is the live value
    of the disk reserve. `wake` is set on every command, so a hold (paused, or
    blocked on disk space) reacts at once instead of at its next poll.
    """

    def __init__(self, stop: StopControl, disk_reserve: int = 0) -> None:
        self.stop = stop
        self.pause = False
        self.checkpoint = False
        self.disk_reserve = int(disk_reserve)
        self.disk_reserve_changed = False
        self.wake = threading.Event()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def start(self, stream: IO[str] | None = None) -> "Commands":
        """Read control lines from `stream` (stdin) in a daemon thread until EOF."""
        stream = stream if stream is not None else sys.stdin
        self._thread = threading.Thread(target=self._read, args=(stream,), name="traind-control", daemon=True)
        self._thread.start()
        return self

    def _read(self, stream: IO[str]) -> None:
        try:
            for line in stream:
                if line.strip():
                    self.handle(line)
        except (OSError, ValueError) as e:  # a closed or broken stdin reads as the daemon being gone
            _log(f"control: stdin failed: {e}")
        _log("control: stdin closed (the daemon is gone): stopping at the next step boundary")
        self.stop.request("stdin closed")
        self.wake.set()

    def handle(self, line: str) -> str | None:
        """Apply one control line; returns the command, or None for a line that is ignored (and logged)."""
        try:
            request = json.loads(line)
        except ValueError:
            _log(f"control: ignored a line that is not JSON: {line.strip()[:200]!r}")
            return None
        cmd = request.get("cmd") if isinstance(request, dict) else None
        if cmd not in protocol.WORKER_COMMANDS:
            _log(f"control: ignored an unknown request: {line.strip()[:200]!r}")
            return None
        with self._lock:
            if cmd == "pause":
                self.pause = True
            elif cmd == "resume":
                self.pause = False
            elif cmd == "checkpoint":
                self.checkpoint = True
            elif cmd == "stop":
                self.stop.request("stop command")
            elif cmd == "set_disk_reserve":
                value = request.get("bytes")
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    _log(f"control: ignored set_disk_reserve without a byte count >= 0: {line.strip()[:200]!r}")
                    return None
                self.disk_reserve = value
                self.disk_reserve_changed = True
        _log(f"control: {cmd}" + (f" {self.disk_reserve} bytes" if cmd == "set_disk_reserve" else ""))
        self.wake.set()
        return cmd

    def take_checkpoint(self) -> bool:
        with self._lock:
            asked, self.checkpoint = self.checkpoint, False
        return asked

    def take_disk_reserve_change(self) -> bool:
        with self._lock:
            changed, self.disk_reserve_changed = self.disk_reserve_changed, False
        return changed

    def wait(self, timeout: float) -> None:
        """Sleep until a command arrives or `timeout` seconds pass."""
        if self.wake.wait(timeout):
            self.wake.clear()


def _log(message: str) -> None:
    print(f"traind-worker: {message}", flush=True)
