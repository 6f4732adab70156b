"""The TUI's reader: follows the workspace files the daemon writes and posts what changed.

`WorkspaceWatcher.run` belongs in a Textual thread worker (the app runs it with
`@work(thread=True, exclusive=True, exit_on_error=False)`); it must never run on
the event loop, and it must never raise: a bad line, a vanished or replaced
file, a watcher error are all survived. It posts `tui.messages` through the
callable it is given (the app's `post_message`, thread-safe).

On start it reads each `runs/*/metrics.jsonl` once, in job order (in 4 MiB
slices, each parsed once the UI applied the one before, so a long history
never piles up in memory), the tail of `state/events.jsonl`, status.json and
the lock; then it reads only what was
appended (per-file offsets, a torn last line kept until completed), re-reads
status.json when it was replaced, and checks the lock at least every
`liveness_interval` seconds so a dead daemon shows within 2 s without any file
event. It only ever reads the workspace.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable

import orjson
from textual.message import Message

from engine.store import lock
from engine.api import status as status_mod
from engine.store.workspace import Workspace
from tui.messages import DaemonLiveness, EventsAdded, MetricsAdded, StatusChanged

log = logging.getLogger(__name__)

METRICS_NAME = "metrics.jsonl"
HISTORY_SLICE_BYTES = 4 << 20  # metrics read per step while catching up with a long history
APPLIED_WAIT_S = 2.0  # at most this long for the UI to apply one slice before parsing the next


class JsonlTail:
    """Follows one append-only JSON-lines file: complete new lines only, by byte offset."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.partial = b""
        self.inode: int | None = None
        self.more = False  # read_new stopped at max_bytes with more of the file left

    def seek_to_last_lines(self, count: int, window: int = 1 << 18) -> list[dict[str, Any]]:
        """Start at the last `count` complete lines (read from at most the last `window` bytes)."""
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                start = max(0, st.st_size - window)
                f.seek(start)
                data = f.read()
        except OSError:
            return []
        self.inode, self.partial = st.st_ino, b""
        lines = data.split(b"\n")
        if start > 0:
            lines = lines[1:]  # the first piece is a line cut by the window
        self.partial = lines.pop()  # after the last newline: empty or a line still being written
        self.offset = start + len(data) - len(self.partial)
        self.partial = b""  # re-read from the offset next time, whole
        return _parse(lines[-count:])

    def read_new(self, max_bytes: int = -1) -> list[dict[str, Any]]:
        """Events appended since the last call (at most `max_bytes` of them; `more` says whether
        some are left); [] when nothing new or the file is gone."""
        self.more = False
        try:
            with open(self.path, "rb") as f:
                st = os.fstat(f.fileno())
                if st.st_ino != self.inode or st.st_size < self.offset:
                    # Replaced or truncated: a new file, read from its start.
                    self.inode, self.offset, self.partial = st.st_ino, 0, b""
                if st.st_size == self.offset:
                    return []
                f.seek(self.offset)
                data = f.read(max_bytes)
                self.more = self.offset + len(data) < st.st_size
        except OSError:
            return []
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()  # a torn last line waits for its end
        return _parse(lines)


def _parse(lines: list[bytes]) -> list[dict[str, Any]]:
    out = []
    for line in lines:
        if not line.strip():
            continue
        try:
            doc = orjson.loads(line)
        except orjson.JSONDecodeError:
            log.debug("skipping a bad line: %r", line[:200])
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


class WorkspaceWatcher:
    """Posts `MetricsAdded`, `EventsAdded`, `StatusChanged` and `DaemonLiveness` for a workspace.

    `post` receives each message; `chunk` bounds the events of one
    `MetricsAdded`; `events_tail` is how many lines of events.jsonl the first
    `EventsAdded` carries. While a file keeps changing (a step line every
    25 ms), watchfiles yields about every 2 x `step_ms` (at most `debounce_ms`
    apart), so the defaults wake the reader twice a second during training
    (the chart redraws once a second); a lone change is seen within `step_ms`.
    """

    def __init__(self, ws: Workspace, post: Callable[[Message], Any], *, chunk: int = 20_000,
                 events_tail: int = 500, liveness_interval: float = 0.5, rust_timeout_ms: int = 500,
                 debounce_ms: int = 500, step_ms: int = 250) -> None:
        self.ws = ws
        self.post = post
        self.chunk = chunk
        self.events_tail = events_tail
        self.liveness_interval = liveness_interval
        self.rust_timeout_ms = rust_timeout_ms
        self.debounce_ms = debounce_ms
        self.step_ms = step_ms
        self.metrics: dict[str, JsonlTail] = {}
        self.events = JsonlTail(ws.events_path)
        self._status_key: tuple[int, int, int] | None = None
        self._pid: int | None | bool = False  # False: not checked yet
        self._last_liveness = 0.0
        self._stop = threading.Event()  # run()'s, once running
        self._runs_key: tuple[int, int] | None = None  # runs/ as last listed: (inode, mtime)
        self._job_list: list[str] = []

    # -- one-shot pieces (each survives any error) ------------------------------------------

    def start(self) -> None:
        """The first picture: liveness, status, all metrics history, the events tail."""
        self.check_liveness(force=True)
        self.check_status(force=True)
        for job_id in self._job_ids():
            self._read_metrics(job_id)
        events = self.events.seek_to_last_lines(self.events_tail)
        if events:
            self.post(EventsAdded(events))

    def poll(self) -> None:
        """One pass over everything (the watcher wakes it; it also runs on every timeout)."""
        self.check_liveness()
        self.check_status()
        self.check_metrics()
        self.check_events()

    def check_liveness(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_liveness < self.liveness_interval:
            return
        self._last_liveness = now
        try:
            pid = lock.holder(self.ws.lock_path)
        except OSError:
            pid = None
        if pid != self._pid:
            first = self._pid is False
            self._pid = pid
            self.post(DaemonLiveness(pid is not None, pid if pid and pid > 0 else None))
            if not first:
                self.check_status(force=True)  # the status reads "offline" (or back) with it

    def check_status(self, force: bool = False) -> None:
        try:
            st = os.stat(self.ws.status_path)
            key = (st.st_ino, st.st_mtime_ns, st.st_size)
        except OSError:
            key = (0, 0, 0)
        if key == self._status_key and not force:
            return
        self._status_key = key
        try:
            doc = status_mod.read(self.ws, ask=False)  # the file, on change: a socket round trip per poll would cost both sides
        except (OSError, ValueError) as e:  # a half-written file cannot happen (atomic replace), but survive it
            log.debug("status.json unreadable: %s", e)
            return
        self.post(StatusChanged(doc))

    def check_metrics(self) -> None:
        known = set(self.metrics)
        for job_id in self._job_ids():
            if job_id not in known or job_id == max(known, default=""):
                self._read_metrics(job_id)
        # Older jobs are finished; they are re-read only if a change event names them.

    def check_events(self) -> None:
        events = self.events.read_new()
        if events:
            self.post(EventsAdded(events))

    def changed(self, paths: set[str]) -> None:
        """Files named by the watcher: older jobs' metrics too (the poll covers the newest)."""
        for p in paths:
            path = Path(p)
            if path.name == METRICS_NAME and path.parent.parent == self.ws.runs:
                self._read_metrics(path.parent.name)

    def _job_ids(self) -> list[str]:
        """Job folders under runs/, listed again only when runs/ changed (a stat per poll, not a scan).
        A folder made within the same clock tick as the last listing leaves the mtime as it was, so
        a recent mtime lists again anyway (as git treats racily clean files)."""
        try:
            st = os.stat(self.ws.runs)
            if (st.st_ino, st.st_mtime_ns) != self._runs_key or time.time() - st.st_mtime < 2.0:
                self._job_list = sorted(e.name for e in os.scandir(self.ws.runs)
                                        if e.is_dir() and not e.name.startswith("."))
                self._runs_key = (st.st_ino, st.st_mtime_ns)
        except OSError:
            self._runs_key, self._job_list = None, []
        return self._job_list

    def _read_metrics(self, job_id: str) -> None:
        tail = self.metrics.get(job_id)
        if tail is None:
            tail = self.metrics[job_id] = JsonlTail(self.ws.run_dir(job_id) / METRICS_NAME)
        while True:  # a bounded slice at a time: a long history never sits in memory as one list
            events = tail.read_new(HISTORY_SLICE_BYTES)
            last = None
            for i in range(0, len(events), self.chunk):
                last = MetricsAdded(job_id, events[i : i + self.chunk])
                self.post(last)
            if not tail.more:
                return
            # Nor in the UI's message queue: the next slice is parsed once this one is applied.
            deadline = time.monotonic() + APPLIED_WAIT_S
            while last is not None and not last.applied.wait(0.1):
                if self._stop.is_set() or time.monotonic() > deadline:
                    break

    # -- the loop ------------------------------------------------------------------------------

    def run(self, stop_event: threading.Event) -> None:
        """Follow the workspace until `stop_event` is set. Never raises."""
        self._stop = stop_event
        try:
            self.start()
        except Exception:  # noqa: BLE001 - the reader must outlive anything the files do
            log.exception("reader start")
        while not stop_event.is_set():
            try:
                self._watch(stop_event)
            except Exception:  # noqa: BLE001 - e.g. a watched folder removed: poll, then watch again
                log.debug("watcher failed; polling", exc_info=True)
                self._safe_poll()
                stop_event.wait(self.liveness_interval)

    def _safe_poll(self) -> None:
        try:
            self.poll()
        except Exception:  # noqa: BLE001
            log.exception("reader poll")

    def _watch(self, stop_event: threading.Event) -> None:
        import watchfiles

        def wanted(_change: Any, path: str) -> bool:
            return path.endswith(".jsonl") or path.endswith("status.json")

        for changes in watchfiles.watch(self.ws.state, self.ws.runs, watch_filter=wanted, stop_event=stop_event,
                                        rust_timeout=self.rust_timeout_ms, yield_on_timeout=True,
                                        debounce=self.debounce_ms, step=self.step_ms, raise_interrupt=False):
            if changes:
                try:
                    self.changed({p for _, p in changes})
                except Exception:  # noqa: BLE001
                    log.exception("reader changes")
            self._safe_poll()
            if stop_event.is_set():
                return
