"""An input file as the stream of its JSONL bytes: plain, gzip or zstd by its name, a UTF-8 BOM skipped.

`.jsonl.gz` and `.jsonl.zst` are decompressed as they are read, a buffer at a
time: the reader never holds more than `BUFFER` decompressed bytes ahead of
its caller, so a decompression bomb costs no memory or disk, and the caller's
limits (validate.py's `max_file_size`, `max_line_size`) count decompressed
bytes. A damaged stream raises `Corrupt` where it is met. A byte order mark
at the start of a file is skipped and noted (`Stream.bom`), so every reader
(validation, tokenization, the hold-out) sees the same lines.

Which lines hold a record is this module's rule too, for every reader: lines
are numbered from 1, a blank line (empty, or whitespace only: exports often end
with one) holds none and is passed over, and the lines validation skipped
(`[inbox] bad_lines = "skip"`) are passed over by number (`records`).

The names of input files are this module's too: which suffixes are taken (in
any case: `alpaca.JSONL` is a `.jsonl`), and a name without its suffix. It
never writes, and never imports torch.
"""

from __future__ import annotations

import io
import os
import zlib
from collections.abc import Container, Iterator
from typing import BinaryIO

SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
COMPRESSION = {".jsonl.gz": "gzip", ".jsonl.zst": "zstd"}
BOM = b"\xef\xbb\xbf"
BUFFER = 1 << 20


class Corrupt(OSError):
    """The compressed stream is damaged or cut short; the message says which format and how."""


def suffix(name: str | os.PathLike) -> str | None:
    """The input suffix `name` ends with, in any case (the longest: `.jsonl.gz` before `.jsonl`), as it is
    spelt in SUFFIXES; or None. Exports from other tools often shout: `alpaca.JSONL` is taken as `.jsonl`."""
    name = os.fspath(name).lower()
    return next((s for s in sorted(SUFFIXES, key=len, reverse=True) if name.endswith(s)), None)


def stem(name: str | os.PathLike) -> str:
    """`name` without its input suffix: `chats.jsonl.gz` -> `chats`."""
    name = os.fspath(name)
    found = suffix(name)
    return name[: -len(found)] if found else name


class _ZstdFrames:
    """The compressed bytes passed through unchanged, their frame structure followed (headers only, nothing
    decompressed), so a file cut short inside a frame is noticed: zstandard's reader ends there quietly."""

    _MAGIC, _SKIPPABLE = 0xFD2FB528, range(0x184D2A50, 0x184D2A60)

    def __init__(self, f: BinaryIO):
        self._f = f
        self._state, self._want, self._skip = "magic", 4, 0
        self._after_skip = "magic"
        self._checksum = False
        self._buf = bytearray()

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        if data:
            self._follow(memoryview(data))
        elif self._state != "magic" or self._buf or self._skip:
            raise Corrupt("not a valid zstd stream: the file ends inside a frame (cut short?)")
        return data

    def _follow(self, data: memoryview) -> None:
        while data:
            if self._skip:
                take = min(self._skip, len(data))
                self._skip -= take
                data = data[take:]
                if not self._skip:
                    self._expect(self._after_skip)
                continue
            take = min(self._want - len(self._buf), len(data))
            self._buf += data[:take]
            data = data[take:]
            if len(self._buf) == self._want:
                field, self._buf = bytes(self._buf), bytearray()
                self._header(field)

    _SIZES = {"magic": 4, "skippable": 4, "descriptor": 1, "block": 3, "checksum": 4}

    def _expect(self, state: str) -> None:
        self._state, self._want = state, self._SIZES[state]

    def _skip_then(self, size: int, state: str) -> None:
        self._after_skip = state
        if size:
            self._skip = size
        else:
            self._expect(state)

    def _header(self, field: bytes) -> None:
        if self._state == "magic":
            magic = int.from_bytes(field, "little")
            if magic in self._SKIPPABLE:
                self._expect("skippable")
            elif magic == self._MAGIC:
                self._expect("descriptor")
            else:
                raise Corrupt("not a valid zstd stream: no zstd frame where one should start")
        elif self._state == "skippable":
            self._skip_then(int.from_bytes(field, "little"), "magic")
        elif self._state == "descriptor":
            fhd = field[0]
            single = bool(fhd & 0x20)
            self._checksum = bool(fhd & 0x04)
            rest = (0 if single else 1) + (0, 1, 2, 4)[fhd & 3] + ((1 if single else 0), 2, 4, 8)[fhd >> 6]
            self._skip_then(rest, "block")
        elif self._state == "block":
            header = int.from_bytes(field, "little")
            last, kind, size = header & 1, (header >> 1) & 3, header >> 3
            if kind == 3:
                raise Corrupt("not a valid zstd stream: a reserved block type")
            after = "block" if not last else ("checksum" if self._checksum else "magic")
            self._skip_then(1 if kind == 1 else size, after)
        elif self._state == "checksum":
            self._expect("magic")

class _Decompressing(io.RawIOBase):
    """A raw stream of decompressed bytes, each read bounded by the caller's buffer."""

    def __init__(self, f: BinaryIO, compression: str, owns: bool):
        self._source, self._owns = f, owns
        self.compression = compression
        if compression == "gzip":
            import gzip

            self._reader = gzip.GzipFile(fileobj=f, mode="rb")
            self._damaged = (EOFError, zlib.error, gzip.BadGzipFile)
        else:
            import zstandard

            self._reader = zstandard.ZstdDecompressor().stream_reader(_ZstdFrames(f), read_size=1 << 17,
                                                                     read_across_frames=True, closefd=False)
            self._damaged = (zstandard.ZstdError,)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        try:
            return self._reader.readinto(b)
        except self._damaged as e:  # an I/O error of the file itself stays an OSError
            raise Corrupt(f"not a valid {self.compression} stream: {e}") from None

    def close(self) -> None:
        if not self.closed:
            try:
                self._reader.close()
            finally:
                if self._owns:
                    self._source.close()
        super().close()


class _Passing(io.RawIOBase):
    """An already-open binary file as a raw stream (a plain .jsonl); its file number stays visible."""

    def __init__(self, f: BinaryIO, owns: bool):
        self._owns = owns
        # Read the file's own raw stream when its buffer holds nothing ahead: one buffer, not two.
        self._source = f
        raw = getattr(f, "raw", None)
        try:
            if isinstance(f, io.BufferedReader) and raw is not None and f.tell() == raw.tell():
                self._source = raw
        except OSError:  # a pipe cannot tell: its buffer is read through
            pass
        self._closing = f

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        return self._source.readinto(b)

    def fileno(self) -> int:
        return self._source.fileno()

    def close(self) -> None:
        if not self.closed and self._owns:
            self._closing.close()
        super().close()


class Stream(io.BufferedReader):
    """The JSONL bytes of an input file. `compression` is None, "gzip" or "zstd"; `bom` says one was skipped.

    A compressed stream has no file number (`fileno()` raises io.UnsupportedOperation): its size on disk
    is not the size of what it holds."""

    compression: str | None
    bom: bool

    def __init__(self, f: BinaryIO, name: str | os.PathLike, owns: bool = False):
        self.compression = COMPRESSION.get(suffix(name) or "")
        self._file = f
        super().__init__(_Decompressing(f, self.compression, owns) if self.compression else _Passing(f, owns), BUFFER)
        self.bom = self.peek(len(BOM))[: len(BOM)] == BOM
        if self.bom:
            self.read(len(BOM))

    def bytes_read(self) -> int | None:
        """How far into the file on disk reading has come, read ahead included (for a compressed file, whose
        lines are not its bytes on disk: progress against its size). None where the file cannot tell (a pipe)."""
        try:
            return self._file.tell()
        except OSError:
            return None


def decompressed(f: BinaryIO, name: str | os.PathLike) -> Stream:
    """Read an already-open binary file (opened with whatever care the caller takes) as JSONL bytes, by
    `name`'s suffix. `f` stays the caller's to close. Raises Corrupt if a compressed file's header is bad."""
    return Stream(f, name)


def open_jsonl(path: str | os.PathLike) -> Stream:
    """Open an input file the caller trusts (already checked: a queue file, a command-line file)."""
    f = open(path, "rb", buffering=0)
    try:
        return Stream(f, path, owns=True)
    except BaseException:
        f.close()
        raise


def blank(line: bytes) -> bool:
    """An empty or whitespace-only line: no record, and no error either."""
    return not line.strip()


def records(stream: Stream, skip: Container[int] = frozenset()) -> Iterator[tuple[int, bytes]]:
    """(number, line) of each line that holds a record, numbered as validation numbers them: blank lines and
    the lines numbered in `skip` (those validation skipped) are passed over, a skipped one read in bounded
    pieces (it may be an over-long line), never whole."""
    n = 0
    while True:
        n += 1
        if n in skip:
            while (piece := stream.readline(BUFFER)) and not piece.endswith(b"\n"):
                pass
            if not piece:
                return
            continue
        line = stream.readline()
        if not line:
            return
        if not blank(line):
            yield n, line
