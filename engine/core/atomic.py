"""Durable writes: the only module that opens a state file for writing.

A state file is replaced whole (temp file in the same directory, fsync, rename,
fsync the directory) or appended one complete line at a time with an fsync, so a
reader or a crash never sees half of one. JSON is written with NaN and Infinity
disallowed: a non-finite number must never reach a file a user or a client reads.

A write the environment refuses (a full disk, an I/O error, a read-only
filesystem) raises `WriteFailed`, naming the path and the cause, and leaves the
old file whole; the daemon's storage layer (engine/store/storage.py) turns it into a
`blocked` state. The `faults` test switch (engine/core/testing.py) makes chosen
writes of this process fail for real, to prove that.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from engine.core import testing

TEMP_PREFIX = ".tmp-"

DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})
IO_ERRORS = frozenset({errno.EIO, errno.EROFS})


class WriteFailed(OSError):
    """The environment refused a write: `kind` is "disk_full" or "io_error"; `problem` says it in one line."""

    def __init__(self, err: OSError, path: str | os.PathLike):
        super().__init__(err.errno, err.strerror, str(path))
        self.path = Path(path)
        self.kind = "disk_full" if err.errno in DISK_FULL else "io_error"
        name = errno.errorcode.get(err.errno, str(err.errno))
        self.problem = (f"disk full: cannot write {self.path}" if self.kind == "disk_full"
                        else f"{err.strerror or 'I/O error'} ({name}): cannot write {self.path}")

    def __str__(self) -> str:
        return self.problem


def classify(err: OSError, path: str | os.PathLike) -> OSError:
    """A WriteFailed for an environmental failure, else the error itself (a bug or a permission)."""
    if isinstance(err, WriteFailed) or err.errno not in DISK_FULL | IO_ERRORS:
        return err
    return WriteFailed(err, path)


@contextlib.contextmanager
def writing(path: str | os.PathLike) -> Iterator[None]:
    """Around a write made outside this module (a copied file): environmental failures become WriteFailed."""
    FAULTS.check(path)
    try:
        yield
    except OSError as e:
        raise classify(e, path) from e


class Faults:
    """Test-only: make the Nth write of this process (and, if persistent, every later one) fail for real.

    The `faults` switch is {"nth": N, "errno": "ENOSPC"|"EIO"|..., "persistent": bool,
    "while_exists": PATH (a persistent fault lasts while this file exists), "count_file": PATH
    (where the number of writes so far is kept, so a test can size a sweep), "sites_file": PATH
    (one line per write: its number and path)}. Unset: no cost.
    """

    def __init__(self, spec: dict[str, Any] | None):
        self.spec = spec
        self.writes = 0

    @classmethod
    def from_env(cls) -> "Faults":
        return cls(testing.get("faults"))

    def check(self, path: str | os.PathLike) -> None:
        spec = self.spec
        if spec is None:
            return
        self.writes += 1
        if spec.get("count_file"):
            with open(spec["count_file"], "w") as f:
                f.write(str(self.writes))
        if spec.get("sites_file"):
            with open(spec["sites_file"], "a") as f:
                f.write(f"{self.writes} {path}\n")
        nth = spec["nth"]
        hit = self.writes == nth or (spec.get("persistent") and self.writes > nth
                                     and os.path.exists(spec.get("while_exists") or os.devnull))
        if hit:
            code = getattr(errno, spec.get("errno", "ENOSPC"))
            raise WriteFailed(OSError(code, os.strerror(code)), path)


FAULTS = Faults.from_env()


def _classified(func):
    """Every write function below: fault hook first, then environmental errors classified."""
    @functools.wraps(func)
    def wrapper(path, *args, **kwargs):
        FAULTS.check(path)
        try:
            return func(path, *args, **kwargs)
        except OSError as e:
            raise classify(e, path) from e
    return wrapper


def fsync_dir(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_rename(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Rename and make the rename itself survive a crash (both directories fsynced)."""
    with writing(dst):
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
    FAULTS.check(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=TEMP_PREFIX, dir=path.parent)
    except OSError as e:
        raise classify(e, path) from e
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError):
            raise classify(e, path) from e
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
    append_bytes(path, (dumps(obj) + "\n").encode(), sync)


@_classified
def append_bytes(path: str | os.PathLike, data: bytes, sync: bool = True) -> None:
    """Append whole lines in one write (O_APPEND); a short write (the disk filled mid-line) is cut back off,
    so the log never keeps half a line."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            os.ftruncate(fd, start)
            raise
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
