"""The daemon's side of its own writes failing: one place that turns a refused write into `blocked`.

Every write the daemon makes goes through engine/core/atomic.py, which raises
`WriteFailed` for a full disk (ENOSPC, EDQUOT, EFBIG) or an I/O error (EIO,
EROFS) and leaves the old file whole. This module is where such a failure is
handled, once:

- `append` (events, metrics) never raises: a line that cannot be written is kept
  in memory, in order (bounded), and written before any later line once space
  returns, so a log never has a gap in the middle or half a line.
- `soft` runs a write whose failure must not stop anything (status.json, the
  lock's PID); the newest one of each kind is run again once writes work.
- `refusals()` wraps the daemon's few top-level units of work (a pass of the
  queue loop, a command, a snapshot, the intake's pass, the event relay): a
  write that matters (a job record, a move, a model switch) refused inside
  blocks the daemon with the problem (`failed`) until a retry succeeds.

`retry` is called every second while blocked; when the backlog is written,
every pending soft write succeeds and the probe (a real write: the daemon's
status.json) does too, the problem is cleared and `on_clear` runs.
This module never raises WriteFailed to its callers and never deletes anything.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from engine.core import atomic
from engine.core.console import console  # also imported from here by older callers

RETRY_SECONDS = 1.0  # while blocked, how often writing is tried again
MAX_BACKLOG = 20_000  # log lines kept in memory while the disk refuses them; the oldest are kept, later ones counted


class LossyStream:
    """stdout or stderr of a process whose log file is on the full disk: what the disk refuses is dropped,
    never raised into the code that printed (a worker must not die of its own log line)."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except OSError:
            return len(text)

    def flush(self) -> None:
        try:
            self._stream.flush()
        except OSError:
            pass

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@dataclass
class Refusal:
    """A write refused inside `Storage.refusals()`, or none (falsy)."""
    problem: str | None = None

    def __bool__(self) -> bool:
        return self.problem is not None


class Storage:
    def __init__(self, probe: Callable[[], None], on_clear: Callable[[str, int], None] | None = None):
        self.probe = probe  # a write that shows whether writing works again
        self.problem: str | None = None  # "disk full: cannot write PATH", while writes fail
        self.since: float | None = None
        self.failures = 0  # writes refused since the last time writing worked
        self.backlog: deque[tuple[Path, bytes, bool]] = deque()
        self.dropped = 0  # lines past MAX_BACKLOG, lost: reported when writing works again
        self.pending: dict[str, Callable[[], None]] = {}
        self.on_clear = on_clear  # called with (the problem that cleared, lines dropped meanwhile)
        self.lock = threading.RLock()  # events are also emitted from threads (snapshots, quarantine)

    # -- the three ways to write ---------------------------------------------------

    def failed(self, err: atomic.WriteFailed) -> None:
        """A write that matters was refused: blocked until writing works again."""
        self.failures += 1
        if self.problem is None:
            self.problem, self.since = err.problem, time.time()
            console(f"{err.problem}; holding the queue and trying again every {RETRY_SECONDS:g}s", "error",
                    "write_failed")
        elif err.kind == "io_error" and self.problem.startswith("disk full"):
            self.problem = err.problem  # an I/O error says more than a full disk

    @contextmanager
    def refusals(self) -> Iterator[Refusal]:
        """Run writes that matter: one the disk refuses blocks the daemon (`failed`) and ends the block, never
        raising further; the Refusal says whether it happened (`if refused:`) and why."""
        refusal = Refusal()
        try:
            yield refusal
        except atomic.WriteFailed as e:
            self.failed(e)
            refusal.problem = e.problem

    def append(self, path: Path, data: bytes, sync: bool = True) -> bool:
        """Append whole lines; True if written now, False if kept for later (never raises WriteFailed)."""
        if len(self.backlog) >= MAX_BACKLOG:
            self.dropped += 1
            return False
        self.backlog.append((path, data, sync))
        return self.flush()

    def soft(self, key: str, write: Callable[[], None]) -> bool:
        """Run a write whose failure stops nothing; if refused, the newest of this key runs again later."""
        try:
            write()
        except atomic.WriteFailed as e:
            self.pending[key] = write
            self.failed(e)
            return False
        self.pending.pop(key, None)
        return True

    # -- getting going again -----------------------------------------------------------

    def flush(self) -> bool:
        with self.lock:
            while self.backlog:
                path, data, sync = self.backlog[0]
                try:
                    atomic.append_bytes(path, data, sync)
                except FileNotFoundError:
                    pass  # its folder went (a run removed): nothing to keep it for
                except atomic.WriteFailed as e:
                    self.failed(e)
                    return False
                self.backlog.popleft()
            return True

    def retry(self) -> bool:
        """Try the backlog and the pending writes again; True once everything is written."""
        if self.problem is None and not self.backlog and not self.pending:
            return True
        if not self.flush():
            return False
        for key, write in list(self.pending.items()):
            if not self.soft(key, write):
                return False
        if self.problem is not None:
            try:
                self.probe()
            except atomic.WriteFailed as e:
                self.failed(e)
                return False
            problem, dropped = self.problem, self.dropped
            self.problem = self.since = None
            self.failures = self.dropped = 0
            if self.on_clear is not None:
                self.on_clear(problem, dropped)
        return True

    async def until_clear(self, give_up: Callable[[], bool] = lambda: False) -> None:
        """Retry until writes work again (or `give_up` says the daemon is leaving)."""
        while self.problem is not None and not give_up():
            await asyncio.sleep(RETRY_SECONDS)
            self.retry()
