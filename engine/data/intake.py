"""Safe intake: which entries of inbox/ may be taken, how to open one, and `traind add`.

Anything in the inbox is hostile until proven otherwise: it may be a symbolic
link to a file elsewhere, a FIFO that would block a reader forever, a hard link
whose other name someone is still writing, or a file still being written in
place. So the scan uses `lstat` only and opens nothing; a file is taken only
once it has settled; and the daemon opens a taken file with `open_claimed`
(O_NOFOLLOW, O_NONBLOCK, then fstat), so what it checked is what it reads.

This module never follows a link in the inbox, never blocks, never deletes or
overwrites a file it was handed, and never imports torch or transformers.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path

from engine.core import reading
from engine.data import duplicates
from engine.core.atomic import fsync_dir, write_bytes_atomic
from engine.core.config import ValidationConfig
from engine.data.validate import (Report, UnreadableFile, file_kind, human_size, open_for_validation,
                             unreadable_report, validate_fileobj)

IN_PROGRESS_SUFFIXES = (".part", ".tmp")


class Duplicate(Exception):
    """`traind add` of content already trained (or waiting to be), without --again; the message says which."""


class UnsafeFile(Exception):
    """A claimed inbox entry is not a plain regular file with one name; `reason` says what it is."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass
class ScanResult:
    ready: list[Path] = field(default_factory=list)  # settled regular files, in arrival order
    rejected: list[tuple[Path, str]] = field(default_factory=list)  # *.jsonl that must never be read
    waiting: list[Path] = field(default_factory=list)  # regular files that may still be being written
    ignored: list[Path] = field(default_factory=list)  # not *.jsonl[.gz|.zst] (and not an in-progress name)


def rejection_reason(st: os.stat_result) -> str | None:
    """Why an inbox entry with this lstat result must not be read, or None if it may be."""
    mode = st.st_mode
    if stat.S_ISLNK(mode):
        return "is a symbolic link: links are never followed; copy the file into the inbox instead"
    if not stat.S_ISREG(mode):
        return f"is {file_kind(mode)}, not a regular file"
    if st.st_nlink > 1:
        return (f"has {st.st_nlink} hard links: another name could still change it; "
                "copy it into the inbox instead")
    return None


def is_in_progress_name(name: str) -> bool:
    """Names the daemon never looks at: dot-files, *.part, *.tmp (writes still under way)."""
    return name.startswith(".") or name.endswith(IN_PROGRESS_SUFFIXES)


def arrival_key(name: str, st: os.stat_result) -> tuple[int, str]:
    """The order files are taken in: when each arrived (its ctime: a rename into the inbox sets it, as
    does writing it there), then its name. The UI's queue panel lists the inbox in the same order."""
    return (st.st_ctime_ns, name)


def scan_inbox(inbox: Path, settle_seconds: float, now: float, seen: dict) -> ScanResult:
    """Classify the entries directly in `inbox` (lstat only; nothing is opened or followed).

    A regular file is ready once complete: its mtime is already `settle_seconds` old
    (the usual case for a file renamed in), or its (size, mtime) stayed the same
    across scans spanning `settle_seconds`. `seen` carries those observations from
    one scan to the next (pass the same dict each time); `now` is time.time().
    Raises OSError if the inbox itself cannot be listed.
    """
    result = ScanResult()
    ready: list[tuple[tuple[int, str], Path]] = []
    present = set()
    with os.scandir(inbox) as it:
        entries = list(it)
    for entry in sorted(entries, key=lambda e: e.name):
        name = entry.name
        if is_in_progress_name(name):
            continue
        path = Path(entry.path)
        if reading.suffix(name) is None:
            result.ignored.append(path)
            continue
        try:
            st = entry.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # gone between listing and lstat
        reason = rejection_reason(st)
        if reason is not None:
            result.rejected.append((path, reason))
            continue
        present.add(name)
        observed = (st.st_size, st.st_mtime_ns, st.st_ino)
        if now - st.st_mtime_ns / 1e9 >= settle_seconds:
            ready.append((arrival_key(name, st), path))
            continue
        previous = seen.get(name)
        if previous is not None and previous[0] == observed:
            if now - previous[1] >= settle_seconds:
                ready.append((arrival_key(name, st), path))
                continue
        else:
            seen[name] = (observed, now)
        result.waiting.append(path)
    for name in list(seen):
        if name not in present:
            del seen[name]
    result.ready = [p for _, p in sorted(ready)]
    return result


def open_claimed(path: str | os.PathLike):
    """Open an inbox file for reading, refusing anything but a regular file with one name.

    O_NOFOLLOW refuses a symlink swapped in after the scan, O_NONBLOCK keeps a FIFO
    from blocking the open; fstat then checks what was actually opened. Returns a
    buffered binary file. Raises UnsafeFile (reject it with `reason`) or
    FileNotFoundError (it went away: nothing to reject).
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeFile("is a symbolic link: links are never followed; copy the file into the inbox instead") from None
        if e.errno == errno.ENXIO:
            raise UnsafeFile("is a socket, not a regular file") from None
        if e.errno in (errno.EACCES, errno.EPERM):
            raise UnsafeFile("cannot be opened: permission denied") from None
        raise UnsafeFile(f"cannot be opened: {e.strerror}") from None
    try:
        reason = rejection_reason(os.fstat(fd))
        if reason is not None:
            raise UnsafeFile(reason)
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb", buffering=1 << 20)
    except BaseException:
        os.close(fd)
        raise


# -- traind add ------------------------------------------------------------------

def waiting_contents(inbox: Path) -> dict[str, str]:
    """Content hash -> name of each file in `inbox` the daemon would take: content that waits to be trained."""
    found: dict[str, str] = {}
    with os.scandir(inbox) as it:
        names = sorted(entry.name for entry in it)
    for name in names:
        if is_in_progress_name(name) or reading.suffix(name) is None:
            continue
        try:
            with open_claimed(inbox / name) as f:
                found.setdefault(duplicates.hash_fd(f.fileno()), name)
        except (UnsafeFile, OSError):  # taken meanwhile, or a file the daemon will reject: nothing waits
            continue
    return found


def inbox_name(source: str | os.PathLike) -> str:
    """The name a source gets in the inbox: its own, made visible and ending in .jsonl (.jsonl.gz, .jsonl.zst
    for a compressed one: `train.json.gz` and `train.gz` become `train.jsonl.gz`)."""
    name = Path(source).name.lstrip(".") or "data"
    for suffix in IN_PROGRESS_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)] or "data"
    if reading.suffix(name) is None:
        compressed = next((c for c in (".gz", ".zst") if name.endswith(c)), "")
        stem = name[: len(name) - len(compressed)]
        stem = stem[: -len(".json")] if stem.endswith(".json") else stem
        name = f"{stem or 'data'}.jsonl{compressed}"
    return name


def _candidates(name: str):
    stem, suffix = reading.stem(name), reading.suffix(name)
    yield name
    n = 2
    while True:
        yield f"{stem}-{n}{suffix}"
        n += 1


_renameat2 = None


def _rename_noreplace(src: Path, dst: Path) -> bool:
    """Rename unless `dst` exists (atomically where the kernel allows); False if it exists."""
    global _renameat2
    if _renameat2 is None:
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            func = libc.renameat2
            func.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
            _renameat2 = func
        except (OSError, AttributeError):
            _renameat2 = False
    if _renameat2:
        import ctypes

        AT_FDCWD, RENAME_NOREPLACE = -100, 1
        if _renameat2(AT_FDCWD, os.fsencode(src), AT_FDCWD, os.fsencode(dst), RENAME_NOREPLACE) == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EEXIST:
            return False
        if err not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(dst))
    # This filesystem cannot refuse atomically: check, then rename (a narrow race).
    if os.path.lexists(dst):
        return False
    os.rename(src, dst)
    return True


def _copy_fd(src_fd: int, dst_fd: int) -> None:
    offset = 0
    try:
        while True:
            n = os.sendfile(dst_fd, src_fd, offset, 1 << 30)
            if n == 0:
                return
            offset += n
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOSYS) or offset:
            raise
    os.lseek(src_fd, 0, os.SEEK_SET)
    while chunk := os.read(src_fd, 1 << 20):
        view = memoryview(chunk)
        while view:
            view = view[os.write(dst_fd, view):]


def add_one(source: str | os.PathLike, inbox: Path, limits: ValidationConfig,
            earlier=None, again: bool = False, skip_up_to: int | None = None) -> tuple[Report, Path | None, str | None]:
    """Validate `source`; if valid, copy it durably into the inbox under a free name.

    Returns (report, destination or None if not added, its content hash). Raises UnreadableFile, or Duplicate when
    `earlier(content_hash)` names a job that has its content and `again` is false.
    The copy is written to a dot-file the daemon ignores, fsynced, given the
    source's mode and mtime, then renamed in without replacing anything; with
    `again`, the marker that lets the daemon train it again is written first.
    """
    with open_for_validation(source) as f:
        report = validate_fileobj(f, os.fspath(source), limits, skip_up_to)
        if not report.ok:
            return report, None, None
        src_fd = f.fileno()
        digest = duplicates.hash_fd(src_fd)
        if earlier is not None and not again and (seen := earlier(digest)):
            raise Duplicate(f"{source}: the same content as {seen}: not added; 'traind add --again {source}' "
                            "trains it again")
        before = os.fstat(src_fd)
        name = inbox_name(source)
        tmp = inbox / f".{name}.{os.getpid()}.tmp"
        try:
            tmp.unlink()  # left by a crashed add with the same pid
        except FileNotFoundError:
            pass
        dst_fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            try:
                _copy_fd(src_fd, dst_fd)
                after = os.fstat(src_fd)
                if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns) or \
                        os.fstat(dst_fd).st_size != before.st_size:
                    raise UnreadableFile(os.fspath(source), "it changed while being copied; try again once it is complete")
                os.fchmod(dst_fd, stat.S_IMODE(before.st_mode) | stat.S_IRUSR)
                os.utime(dst_fd, ns=(before.st_atime_ns, before.st_mtime_ns))
                os.fsync(dst_fd)
            finally:
                os.close(dst_fd)
            for candidate in _candidates(name):
                dst = inbox / candidate
                if os.path.lexists(dst):
                    continue
                if again:
                    write_bytes_atomic(duplicates.again_marker(inbox, candidate), digest.encode() + b"\n")
                if _rename_noreplace(tmp, dst):
                    break
                if again:
                    duplicates.again_marker(inbox, candidate).unlink(missing_ok=True)
            fsync_dir(inbox)
        except BaseException:
            try:
                tmp.unlink()
            except FileNotFoundError:
                pass
            raise
    return report, dst, digest


_ADD_TEMP = re.compile(r"^\..+\.([0-9]+)\.tmp$")


def remove_stale_add_temps(inbox: Path) -> list[Path]:
    """Temp copies of `traind add` runs that were killed: ours to remove, once their process is gone."""
    removed = []
    for entry in os.scandir(inbox):
        m = _ADD_TEMP.match(entry.name)
        if not m or not entry.is_file(follow_symlinks=False):
            continue
        try:
            os.kill(int(m.group(1)), 0)
            continue  # that add is still copying
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        os.unlink(entry.path)
        removed.append(Path(entry.path))
    return removed


def add_files(paths: list[str], inbox: Path, limits: ValidationConfig, out=None, err=None,
              known: "duplicates.Known | None" = None, again: bool = False, skip_up_to: int | None = None) -> int:
    """`traind add FILE...`: validate each, copy the valid ones into the inbox. With `known`, content that a
    job trained (or will), that a file waiting in the inbox has, or that an earlier FILE of this call has, is
    refused unless `again`. `skip_up_to`: the daemon's bound on bad lines (`[inbox] bad_lines = "skip"`): a file
    within it is added, and the lines the daemon will skip are named.

    Returns the exit code: 0 all added, 1 some invalid or duplicate (not added), 2 some unreadable.
    """
    out = out or sys.stdout
    err = err or sys.stderr
    inbox = Path(inbox)
    if not paths:
        print("traind add: no files given (usage: traind add FILE... [-w WORKSPACE])", file=err)
        return 2
    if not inbox.is_dir():
        print(f"traind add: {inbox}: no inbox folder (is this a traind workspace?)", file=err)
        return 2
    code = 0
    added: dict[str, str] = {}  # content hash -> the inbox name, this call
    waiting: dict[str, str] | None = None  # content hash -> the inbox name, of the files there before this call

    def earlier(digest: str) -> str | None:
        nonlocal waiting
        if (record := known.earlier(digest)) is not None:
            return duplicates.describe(record)
        if digest in added:
            return f"inbox/{added[digest]}, added just now"
        if waiting is None:
            waiting = waiting_contents(inbox)
        return f"inbox/{waiting[digest]}, waiting to be trained" if digest in waiting else None

    for p in paths:
        try:
            report, dst, digest = add_one(p, inbox, limits, earlier if known is not None else None, again, skip_up_to)
        except Duplicate as e:
            print(f"warning: {e}", file=err)
            code = max(code, 1)
            continue
        except UnreadableFile as e:
            print(unreadable_report(str(p), e.reason).summary() + "; not added", file=err)
            code = 2
            continue
        except OSError as e:
            print(f"{p}: could not copy into {inbox}: {e.strerror or e}; not added", file=err)
            code = 2
            continue
        if dst is None:
            print(report.format_text(), file=out)
            print(f"{p}: not added (invalid)", file=out)
            code = max(code, 1)
            continue
        added[digest] = dst.name
        for line, message in report.skipped:
            print(f"{p}:{line}: will be skipped: {message}", file=out)
        note = "" if dst.name == inbox_name(p) else f" ({inbox_name(p)} was taken)"
        note += "; it trains again (--again)" if again else ""
        skipped = len(report.skipped_lines)
        print(f"added {p} -> {dst}{note}: {report.examples:,} examples ({report.format}), "
              f"{human_size(report.bytes)}" + (f"; {skipped:,} bad line{'s' if skipped != 1 else ''} will be "
                                               "skipped (inbox.bad_lines = 'skip')" if skipped else ""), file=out)
    return code
