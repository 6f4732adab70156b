"""Placing files into a new immutable folder (a snapshot, a restored model version), and taking one away.

A file is hard-linked where it can be (no time, no space), else reflinked
where the filesystem can, else copied, and a copy only after a free-space
check: the bytes still to copy plus the reserve (config `disk.reserve`) must be
free. Placed files are made read-only (0444); a hard link shares its inode, so
its source becomes read-only too, which is right: what is placed here is never
changed in place. `fsync_tree` makes the placed entries durable in one pass
before the folder is renamed into place.

It never decides which files to place or what a folder means: the snapshot
store (engine/store/snapshots.py) and restore (engine/store/restore.py) do.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
from pathlib import Path

from engine.core import atomic
from engine.core.resources import disk_usage, format_bytes

READ_ONLY = 0o444
_FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)


class Placer:
    """Puts files into a new folder: hard link, else reflink, else copy (after a free-space check).

    `copy_planned` is the bytes of the files that will be copies (not links); `error` is the exception
    raised when the space check fails (the caller's own, so its callers handle it as theirs)."""

    def __init__(self, dest_root: Path, reserve: int, copy_planned: int, error: type[Exception]) -> None:
        self.dest_root = dest_root
        self.reserve = reserve
        self.copy_left = copy_planned  # bytes of files still to place that were planned as copies
        self.error = error
        self.counts = {"linked": 0, "reflinked": 0, "copied": 0, "copied_bytes": 0}

    def place(self, src: Path, dst: Path, size: int, link: bool) -> str:
        dst.parent.mkdir(parents=True, exist_ok=True)
        if not link:
            self.copy_left -= size
        if link:
            try:
                os.link(src, dst)
                try:
                    os.chmod(dst, READ_ONLY)
                except PermissionError:
                    os.unlink(dst)  # not ours to make read-only: take a copy instead
                    raise
                self.counts["linked"] += 1
                return "linked"
            except OSError as e:
                if e.errno not in (errno.EXDEV, errno.EPERM, errno.EACCES, errno.EMLINK, errno.ENOTSUP):
                    raise
        method = self._clone_or_copy(src, dst, size)
        os.chmod(dst, READ_ONLY)
        self.counts[method] += 1
        return method

    def _clone_or_copy(self, src: Path, dst: Path, size: int) -> str:
        import fcntl

        with atomic.writing(dst), open(src, "rb") as fin, open(dst, "xb") as fout:
            try:
                fcntl.ioctl(fout.fileno(), _FICLONE, fin.fileno())
                return "reflinked"
            except OSError:
                pass
            self._check_space(size + self.copy_left)
            copy_data(fin.fileno(), fout.fileno(), size)
            os.fsync(fout.fileno())
        self.counts["copied_bytes"] += size
        return "copied"

    def _check_space(self, need_copy: int) -> None:
        free = disk_usage(self.dest_root)["free"]
        need = need_copy + self.reserve
        if free < need:
            raise self.error(f"disk: need {format_bytes(need)} free on {self.dest_root.parent}, have "
                             f"{format_bytes(free)} ({format_bytes(need_copy)} to copy + "
                             f"{format_bytes(self.reserve)} reserve)")


def copy_data(fd_in: int, fd_out: int, size: int) -> None:
    copied = 0
    try:
        while copied < size:
            n = os.copy_file_range(fd_in, fd_out, min(size - copied, 1 << 30))
            if n == 0:
                break
            copied += n
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP) or copied:
            raise
        while block := os.read(fd_in, 1 << 22):  # kernels or filesystems without copy_file_range
            os.write(fd_out, block)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    for root, _dirs, _names in os.walk(folder, topdown=False):
        atomic.fsync_dir(root)


def remove_tree(folder: Path) -> None:
    """rmtree that gets past read-only folders (files need only their folder to be writable)."""
    def retry(func, path, _exc):
        os.chmod(os.path.dirname(path), 0o755)
        func(path)

    if sys.version_info >= (3, 12):
        shutil.rmtree(folder, onexc=retry)
    else:
        shutil.rmtree(folder, onerror=retry)
