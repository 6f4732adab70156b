"""Reading a log as it grows: its last N complete lines, then each line appended after them (`tail -n N -f`).

Used by `traind events` (state/events.jsonl) and `traind logs` (a job's
worker.log). Only complete lines are ever handed out: a line being written
(no newline yet) is held back until its end arrives. The file is polled a few
times a second, which works on every filesystem (NFS included) and costs
nothing while it is quiet. A file that does not exist yet is waited for; one
that shrinks or is replaced (the warm worker's log is rewritten by each new
worker) is read again from its start. This module only reads.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

POLL_SECONDS = 0.25
CHUNK = 64 * 1024


def last_lines(path: str | os.PathLike, n: int) -> tuple[list[bytes], int]:
    """The last n complete lines (each with its newline) and the offset just past the last complete line,
    from which `follow` goes on; ([], 0) for a file that is missing."""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            data = b""
            pos = end
            # Read backwards until n+1 newlines are in hand (the extra one bounds the first whole line).
            while pos > 0 and data.count(b"\n") <= n:
                step = min(CHUNK, pos)
                pos -= step
                f.seek(pos)
                data = f.read(step) + data
    except FileNotFoundError:
        return [], 0
    complete = data[:data.rfind(b"\n") + 1]  # a partial last line is not handed out yet
    offset = pos + len(complete)
    lines = complete.splitlines(keepends=True)
    if pos > 0 and lines:
        lines = lines[1:]  # the first may have been cut by the read's start
    return (lines[-n:] if n > 0 else []), offset


def follow(path: str | os.PathLike, offset: int = 0, poll: float = POLL_SECONDS,
           keep_going: Callable[[], bool] = lambda: True) -> Iterator[bytes]:
    """Each complete line written to the file from `offset` on, as it arrives, for as long as `keep_going()`."""
    path = Path(path)
    pending = b""
    identity = _identity(path)
    while keep_going():
        now = _identity(path)
        if now is None:
            time.sleep(poll)
            continue
        size = now[2]
        if identity is not None and (now[:2] != identity[:2] or size < offset):
            offset, pending = 0, b""  # replaced or truncated: its content is new
        identity = now
        if size > offset:
            try:
                with open(path, "rb") as f:
                    f.seek(offset)
                    data = f.read(size - offset)
            except FileNotFoundError:
                continue
            offset += len(data)
            pending += data
            cut = pending.rfind(b"\n") + 1
            if cut:
                yield from pending[:cut].splitlines(keepends=True)
                pending = pending[cut:]
            continue  # more may have come meanwhile: read again before sleeping
        time.sleep(poll)


def _identity(path: Path) -> tuple[int, int, int] | None:
    """(device, inode, size), or None when the file is missing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_size
