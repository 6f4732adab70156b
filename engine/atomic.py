"""Durable writes: the only module that opens a state file for writing.

A state file is replaced whole (temp file in the same directory, fsync, rename,
fsync the directory) or appended one complete line at a time with an fsync, so a
reader or a crash never sees half of one. JSON is written with NaN and Infinity
disallowed: a non-finite number must never reach a file a user or a client reads.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

TEMP_PREFIX = ".tmp-"


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_rename(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename and make the rename itself survive a crash (both directories fsynced)."""
    os.replace(src, dst)
    dst_dir = Path(dst).parent
    fsync_dir(dst_dir)
    src_dir = Path(src).parent
    if src_dir.resolve() != dst_dir.resolve():
        fsync_dir(src_dir)


@contextlib.contextmanager
def replacing(path: str | os.PathLike, mode: int = 0o644) -> Iterator[BinaryIO]:
    """A binary file that replaces `path` whole when the block ends, or leaves it untouched on error."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        durable_rename(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes, mode: int = 0o644) -> None:
    with replacing(path, mode) as f:
        f.write(data)


def dumps(obj: Any, indent: int | None = None) -> str:
    """JSON text with NaN/Infinity refused (ValueError) rather than written."""
    return json.dumps(obj, allow_nan=False, indent=indent, sort_keys=indent is not None)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    write_bytes_atomic(path, (dumps(obj, indent=2) + "\n").encode())


def append_json_line(path: str | os.PathLike, obj: Any, sync: bool = True) -> None:
    """Append one JSON object as one line, in a single write (O_APPEND)."""
    line = (dumps(obj) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def read_json(path: str | os.PathLike) -> Any:
    with open(path, "rb") as f:
        return json.loads(f.read())


def read_json_lines(path: str | os.PathLike) -> list[dict]:
    """Every complete line of a JSON-lines log; a torn last line (a crash mid-append) is skipped."""
    out = []
    try:
        with open(path, "rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break
                try:
                    out.append(json.loads(line))
                except ValueError:
                    continue
    except FileNotFoundError:
        pass
    return out


def read_tail(path: str | os.PathLike, window: int) -> bytes:
    """The last `window` bytes of a file, from the first whole line in them; b"" if it is missing."""
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            f.seek(max(0, size - window))
            data = f.read()
    except FileNotFoundError:
        return b""
    return data[data.find(b"\n") + 1:] if size > window else data


def remove_temp_files(directory: str | os.PathLike) -> list[Path]:
    """Delete temp files this module left behind after a crash; returns what went."""
    removed = []
    try:
        entries = list(os.scandir(directory))
    except FileNotFoundError:
        return removed
    for entry in entries:
        if entry.name.startswith(TEMP_PREFIX) and entry.is_file(follow_symlinks=False):
            os.unlink(entry.path)
            removed.append(Path(entry.path))
    return removed
