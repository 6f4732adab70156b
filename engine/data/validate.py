"""Validation of input files: limits, strict UTF-8, JSON and one of the formats (engine/data/formats.py).

Every file is checked here before it is trained on (by the daemon, on a file it
opened itself) and before `traind add` copies it into an inbox. The rules and
the report schema are documented in docs/formats.md; keep the two in step.

The reader streams: memory stays flat whatever the file size, and a line longer
than `max_line_size` is never held whole (it is skipped in bounded chunks and
reported). Per line the hot path is one `orjson.loads` and a few dict lookups;
the depth walk only runs on a line with keys beyond its format's own.

A blank line is no record and no error (reading.py's rule, every reader's).
With a bound on bad lines (`skip_up_to`, from `[inbox] bad_lines = "skip"`), a
file whose only faults are bad lines, no more of them than the bound, is valid:
its report names the lines skipped, every one of them by number
(`skipped_lines`, what the worker passes over) and the first few with why.

This module must never import torch or transformers (the daemon imports it),
and never raises on bad content: bad content is a `Report` with errors. Only a
file that cannot be read at all raises `UnreadableFile`.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
import sys
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Iterable

import orjson

from engine.core import reading
from engine.data import formats
from engine.core.config import ValidationConfig, format_size

SCHEMA_VERSION = 1
SKIP_HINT = "inbox.bad_lines = 'skip' in traind.toml would skip the bad lines and train on the rest"

FORMATS = formats.FORMATS

# Over-long lines are skipped in pieces of this size, so memory stays bounded.
_SKIP_CHUNK = 1 << 20
# Read buffer for files this module opens itself.
_BUFFER = 1 << 20
# orjson refuses nesting deeper than this itself ("depth limit exceeded").
_PARSER_DEPTH = 1024
_NON_FINITE = ("NaN", "Infinity", "-Infinity", "+Infinity", "-NaN")


class UnreadableFile(OSError):
    """The file could not be read at all: missing, no permission, not a regular file, an I/O error.

    An OSError, so a caller that handles OSError from opening also handles this.
    """

    def __init__(self, path: str, reason: str):
        super().__init__(f"{path}: cannot read: {reason}")
        self.path = str(path)
        self.reason = reason


@dataclass
class Report:
    """The outcome of validating one file. `errors` holds the first few, `error_count` all."""

    path: str
    ok: bool = False
    format: str | None = None
    examples: int = 0
    lines: int = 0
    bytes: int = 0
    errors: list[tuple[int, str]] = field(default_factory=list)
    error_count: int = 0
    unreadable: str | None = None  # the reason, when the file could not be read at all
    compression: str | None = None  # "gzip" or "zstd": `bytes` and every limit count the decompressed bytes
    bom: bool = False  # a UTF-8 byte order mark started the file (skipped)
    blank_lines: int = 0  # empty or whitespace-only lines, passed over
    skipped: list[tuple[int, str]] = field(default_factory=list)  # the first bad lines skipped, with why
    skipped_lines: list[int] = field(default_factory=list)  # every bad line skipped (skip_up_to), by number
    could_skip: bool = False  # refused for bad lines alone, with examples left: skipping them would do

    def to_json(self) -> dict:
        """The stable `--json` form (schema 1, documented in docs/formats.md)."""
        return {
            "schema": SCHEMA_VERSION,
            "path": self.path,
            "ok": self.ok,
            "format": self.format,
            "examples": self.examples,
            "lines": self.lines,
            "bytes": self.bytes,
            "error_count": self.error_count,
            "errors": [{"line": line, "message": msg} for line, msg in self.errors],
            "errors_truncated": self.error_count > len(self.errors),
            "unreadable": self.unreadable,
            "compression": self.compression,
            "bom": self.bom,
            "blank_lines": self.blank_lines,
            "skipped_count": len(self.skipped_lines),
            "skipped": [{"line": line, "message": msg} for line, msg in self.skipped],
            "skipped_lines": self.skipped_lines,
        }

    def format_text(self) -> str:
        """`PATH:LINE: message` lines (`PATH: message` for whole-file errors), then one summary line."""
        out = [f"{self.path}:{line}: {msg}" if line else f"{self.path}: {msg}" for line, msg in self.errors]
        out += [f"{self.path}:{line}: skipped: {msg}" for line, msg in self.skipped]
        out += [f"{self.path}: {SKIP_HINT}"] if self.could_skip else []
        out.append(self.summary())
        return "\n".join(out)

    def summary(self) -> str:
        if self.unreadable is not None:
            return f"{self.path}: cannot read: {self.unreadable}"
        if self.ok:
            noun = "example" if self.examples == 1 else "examples"
            notes = "".join(f", {note}" for note in self.notes())
            return f"{self.path}: ok, {self.examples:,} {noun} ({self.format}), {human_size(self.bytes)}{notes}"
        noun = "error" if self.error_count == 1 else "errors"
        lines = "line" if self.lines == 1 else "lines"
        text = f"{self.path}: {self.error_count:,} {noun} in {self.lines:,} {lines}"
        if self.error_count > len(self.errors):
            text += f" (first {len(self.errors)} shown)"
        return text


    def notes(self) -> list[str]:
        """What was taken as it is but is worth knowing: the file's compression, a skipped BOM, blank lines,
        bad lines skipped."""
        skipped = len(self.skipped_lines)
        shown = f" (first {len(self.skipped)} shown)" if skipped > len(self.skipped) else ""
        return ([f"{self.compression}-compressed"] if self.compression else []) + \
            (["a UTF-8 byte order mark (BOM) at its start, skipped"] if self.bom else []) + \
            ([f"{self.blank_lines:,} blank {_plural(self.blank_lines, 'line')} passed over"] if self.blank_lines else []) + \
            ([f"{skipped:,} bad {_plural(skipped, 'line')} skipped{shown}"] if skipped else [])


def _plural(n: int, noun: str) -> str:
    return noun if n == 1 else noun + "s"


def human_size(n: int) -> str:
    """Decimal units, as `ls -h --si` and most file managers show them: 3.1 MB."""
    if n < 1000:
        return f"{n} B"
    for unit in ("kB", "MB", "GB", "TB"):
        n /= 1000
        if n < 999.95 or unit == "TB":
            return f"{n:.1f} {unit}"
    raise AssertionError("unreachable")


def _limit(n: int) -> str:
    text = format_size(n)
    return text if not text.isdigit() else f"{n:,}-byte"


# -- opening ---------------------------------------------------------------------

def _reason(exc: OSError) -> str:
    return {errno.ENOENT: "no such file", errno.EACCES: "permission denied", errno.EPERM: "permission denied",
            errno.EISDIR: "is a directory", errno.ELOOP: "too many levels of symbolic links",
            errno.ENXIO: "is a socket or a device without a reader"}.get(exc.errno, exc.strerror or str(exc))


def file_kind(mode: int) -> str:
    """A short noun phrase for a non-regular file, used in messages."""
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"


def open_for_validation(path: str | os.PathLike) -> BinaryIO:
    """Open a file named on the command line (links followed) without blocking on a FIFO.

    Raises UnreadableFile unless it is a readable regular file.
    """
    name = os.fspath(path)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise UnreadableFile(name, _reason(e)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableFile(name, f"is {file_kind(st.st_mode)}, not a regular file")
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags & ~os.O_NONBLOCK)
        return os.fdopen(fd, "rb", buffering=_BUFFER)
    except BaseException:
        os.close(fd)
        raise


def validate_file(path: str | os.PathLike, limits: ValidationConfig, skip_up_to: int | None = None) -> Report:
    """Validate the file at `path`. Raises UnreadableFile if it cannot be read at all."""
    with open_for_validation(path) as f:
        return validate_fileobj(f, os.fspath(path), limits, skip_up_to)


# -- checking --------------------------------------------------------------------

def _depth_over(obj: object, limit: int) -> bool:
    """True if containers nest deeper than `limit` (the top-level object is depth 1)."""
    stack = [(obj, 1)]
    pop, push = stack.pop, stack.append
    while stack:
        value, depth = pop()
        if depth > limit:
            return True
        children = value.values() if type(value) is dict else value if type(value) is list else ()
        for child in children:  # a scalar (a line that is just `5` or `null`) has none
            if type(child) is dict or type(child) is list:
                push((child, depth + 1))
    return False


def _depth_message(limit: int) -> str:
    if limit < _PARSER_DEPTH:
        return f"JSON nesting is deeper than the {limit}-level limit (max_json_depth)"
    return f"JSON nesting is deeper than {_PARSER_DEPTH} levels, the most the JSON parser accepts (max_json_depth is {limit})"


def check_example(obj: object) -> tuple[str | None, str | None]:
    """(format, None) for a valid example, else (None, message). Depth is not checked here."""
    fmt, problem, _ = formats.check(obj)
    return fmt, problem


def _json_error(line: bytes, exc: orjson.JSONDecodeError) -> str:
    """Explain why orjson refused a line: invalid UTF-8, a non-finite number, a BOM, or syntax."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = line[e.start:e.end]
        return f"not valid UTF-8 at byte column {e.start + 1}: {e.reason} (0x{bad.hex()})"
    pos = max(0, min(getattr(exc, "pos", 0) or 0, len(text)))
    col = len(text[:pos].encode("utf-8")) + 1
    msg = exc.msg if hasattr(exc, "msg") else str(exc)
    if text.startswith("\ufeff"):
        return ("line starts with a UTF-8 byte order mark (BOM): one is skipped only at the very start of the "
                "file; remove this one")
    if "depth limit" in msg:
        return ""  # the caller reports it as too deep
    if "infinity when parsed" in msg:
        return (f"number at byte column {col} is too large (it would be Infinity): "
                "non-finite numbers are not valid JSON")
    for start in (pos - 1, pos):
        if start >= 0 and text.startswith(_NON_FINITE, start):
            token = next(t for t in _NON_FINITE if text.startswith(t, start))
            return (f"{token} at byte column {len(text[:start].encode('utf-8')) + 1} is not valid JSON: "
                    "non-finite numbers (NaN, Infinity) are refused; write null or a finite number")
    if "surrogate" in msg:
        return (f"not valid JSON at byte column {col}: {msg} "
                "(a lone \\ud800-\\udfff escape is not a valid Unicode character)")
    return f"not valid JSON at byte column {col}: {msg}"


class _Collector:
    """Errors as they are found. Lines in no known format are kept aside: when no line of the file is in a
    format they become one error for the whole file, else they are merged back in line order.

    An error of one line is a bad line, which a bound (`skip_up_to`) may let be skipped; an error of the whole
    file (line 0, a damaged stream: nothing after it can be read) never can. The numbers of the bad lines are
    kept up to one past the bound, enough to know when it is passed."""

    __slots__ = ("report", "shown", "unknown", "unknown_count", "unknown_keys", "keep", "bad", "bad_count", "fatal")

    def __init__(self, report: Report, shown: int, skip_up_to: int | None):
        self.report = report
        self.shown = shown
        self.unknown: list[tuple[int, str]] = []
        self.unknown_count = 0
        self.unknown_keys = ""
        self.keep = -1 if skip_up_to is None else skip_up_to + 1
        self.bad: list[int] = []
        self.bad_count = 0
        self.fatal = False

    def add(self, line: int, message: str, fatal: bool = False) -> None:
        r = self.report
        r.error_count += 1
        if len(r.errors) < self.shown:
            r.errors.append((line, message))
        if fatal or not line:
            self.fatal = True
        else:
            self._bad(line)

    def _bad(self, line: int) -> None:
        self.bad_count += 1
        if len(self.bad) < self.keep:
            self.bad.append(line)

    def add_unknown(self, line: int, problem: formats.UnknownShape) -> None:
        if not self.unknown_count:
            self.unknown_keys = problem.keys
        self.unknown_count += 1
        if len(self.unknown) < self.shown:
            self.unknown.append((line, str(problem)))
        self._bad(line)  # a bad line if another line sets the file's format; else `finish` makes it fatal

    def finish(self, file_format: str | None, format_line: int) -> None:
        if not self.unknown_count:
            return
        r = self.report
        if file_format is None:
            lines = "every line" if self.unknown_count == r.lines else f"{self.unknown_count:,} lines"
            r.errors.insert(0, (0, f"{formats.no_known_format(self.unknown_keys)} ({lines})"))
            r.errors = r.errors[: self.shown]
            r.error_count += 1
            self.fatal = True
            return
        where = f"; the file is in the '{file_format}' format (set by line {format_line})"
        r.errors = sorted(r.errors + [(n, m + where) for n, m in self.unknown])[: self.shown]
        r.error_count += self.unknown_count

    def skip(self, limit: int | None) -> None:
        """Bad lines only, no more than `limit`, and examples left: the file is valid, its bad lines skipped.
        More of them: one more error, for the whole file, naming the limit. No limit: noted that one would do."""
        r = self.report
        if self.fatal or not self.bad_count or not r.examples:
            return
        if limit is None:
            r.could_skip = True
            return
        if self.bad_count > limit:
            r.errors = [(0, f"{self.bad_count:,} bad lines, more than the {limit:,} that inbox.max_bad_lines lets "
                            "be skipped: the whole file is rejected")] + r.errors[: self.shown - 1]
            r.error_count += 1
            return
        r.skipped, r.skipped_lines = r.errors, sorted(self.bad)
        r.errors, r.error_count = [], 0


def validate_fileobj(f: BinaryIO, name: str, limits: ValidationConfig, skip_up_to: int | None = None) -> Report:
    """Validate an already-open binary file (the daemon opens with O_NOFOLLOW itself).

    `name` is only used in messages. Reads from the current position to the end. `skip_up_to`: bad lines,
    up to this many, are skipped rather than refusing the file (InboxConfig.skip_up_to); None: any refuses it.
    Raises UnreadableFile on an I/O error while reading.
    """
    report = Report(path=name, compression=reading.COMPRESSION.get(reading.suffix(name) or ""))
    errors = _Collector(report, limits.max_errors_shown, skip_up_to)
    max_line, max_depth, max_file = limits.max_line_size, limits.max_json_depth, limits.max_file_size

    try:
        st = os.fstat(f.fileno())
    except (AttributeError, OSError, ValueError):
        st = None  # not a real file (tests, pipes of bytes): the size is checked while reading
    if st is not None:
        if not stat.S_ISREG(st.st_mode):
            raise UnreadableFile(name, f"is {file_kind(st.st_mode)}, not a regular file")
        if st.st_size > max_file and report.compression is None:  # compressed: the limit is on what it holds
            report.bytes = st.st_size
            errors.add(0, f"file is {human_size(st.st_size)} ({st.st_size:,} bytes), "
                          f"over the {_limit(max_file)} limit (max_file_size)")
            return report

    loads = orjson.loads
    JSONDecodeError = orjson.JSONDecodeError
    check = formats.check
    unknown = formats.UnknownShape
    file_format = None
    format_line = 0
    examples = 0
    lineno = 0
    total = 0
    try:
        f = reading.decompressed(f, name)
        report.bom = f.bom
        total = len(reading.BOM) if f.bom else 0
        readline = f.readline
        while True:
            line = readline(max_line + 1)
            if not line:
                break
            lineno += 1
            n = len(line)
            total += n
            if n > max_line and line[-1] != 10:
                # Over the limit: skip the rest of the line in bounded chunks, counting it.
                del line
                while True:
                    chunk = readline(_SKIP_CHUNK)
                    if not chunk:
                        break
                    n += len(chunk)
                    total += len(chunk)
                    if chunk[-1] == 10:
                        n -= 1
                        break
                    if total > max_file:
                        break
                errors.add(lineno, f"line is {n:,} bytes, over the {_limit(max_line)} limit (max_line_size)")
                if total <= max_file:
                    continue
            if total > max_file:
                errors.add(0, f"decompressed, the file is over the {_limit(max_file)} limit (max_file_size): "
                              f"reading stopped there" if report.compression else
                              f"file grew past the {_limit(max_file)} limit (max_file_size) while being read")
                break
            try:
                obj = loads(line)
            except JSONDecodeError as e:
                if reading.blank(line):
                    report.blank_lines += 1
                else:
                    errors.add(lineno, _json_error(line, e) or _depth_message(max_depth))
                continue
            fmt, problem, depth = check(obj)
            # Depth is fixed by the format unless the line carries extra keys; only then walk it.
            if (depth > max_depth) if depth else _depth_over(obj, max_depth):
                errors.add(lineno, _depth_message(max_depth))
                continue
            if problem is not None:
                if type(problem) is unknown:
                    errors.add_unknown(lineno, problem)
                else:
                    errors.add(lineno, problem)
                continue
            if fmt != file_format:
                if file_format is None:
                    file_format, format_line = fmt, lineno
                else:
                    errors.add(lineno, f"line is in the '{fmt}' format but the file is in the '{file_format}' "
                                       f"format (set by line {format_line}): use one format per file")
                    continue
            examples += 1
    except reading.Corrupt as e:
        errors.add(lineno + 1, f"{e} (after {total:,} decompressed bytes)", fatal=True)
    except OSError as e:
        raise UnreadableFile(name, f"read error after {total:,} bytes: {_reason(e)}") from None

    report.lines, report.bytes, report.examples, report.format = lineno, total, examples, file_format
    errors.finish(file_format, format_line)
    errors.skip(skip_up_to)
    if examples == 0 and report.error_count == 0:
        errors.add(0, "file is empty: at least one example is needed")
    report.ok = report.error_count == 0
    return report


# -- command line ----------------------------------------------------------------

def unreadable_report(path: str, reason: str) -> Report:
    return Report(path=path, ok=False, errors=[(0, f"cannot read: {reason}")], error_count=1, unreadable=reason)


def exit_code(reports: Iterable[Report]) -> int:
    """0 all valid, 1 any invalid, 2 any unreadable."""
    code = 0
    for r in reports:
        if r.unreadable is not None:
            return 2
        if not r.ok:
            code = 1
    return code


def json_document(reports: list[Report]) -> dict:
    return {"schema": SCHEMA_VERSION, "ok": all(r.ok for r in reports), "exit_code": exit_code(reports),
            "files": [r.to_json() for r in reports]}


def validate_paths_main(paths: list[str], limits: ValidationConfig, as_json: bool = False,
                        out=None, err=None, measure=None, skip_up_to: int | None = None) -> int:
    """`traind validate FILE...`: print a report per file; return the exit code (0, 1 or 2). `skip_up_to`:
    as the daemon would, bad lines up to this many are skipped, each named (`[inbox] bad_lines = "skip"`).

    `measure(reports)` ({path: cut figures}, note or None) adds each valid file's share of examples cut at
    max_seq_length (engine/tools/preview.py: it needs the tokenizer); without it they are not measured."""
    out = out or sys.stdout
    err = err or sys.stderr
    if not paths:
        print("traind validate: no files given (usage: traind validate FILE... [--json])", file=err)
        return 2
    reports = []
    for p in paths:
        try:
            report = validate_file(p, limits, skip_up_to)
        except UnreadableFile as e:
            report = unreadable_report(str(p), e.reason)
            if not as_json:
                print(report.summary(), file=err)
        else:
            if not as_json:
                print(report.format_text(), file=out)
        reports.append(report)
    cuts, note = measure(reports) if measure else ({}, None)
    if as_json:
        doc = json_document(reports)
        for entry in doc["files"]:
            entry["cut_at_max_seq_length"] = cuts.get(entry["path"])
        doc["cut_note"] = note
        out.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")
        return exit_code(reports)
    for path, c in cuts.items():
        print(f"{path}: {c['cut']:,} of {c['examples']:,} examples ({c['share']:.1%}) cut at max_seq_length "
              f"{c['max_seq_length']}", file=out)
        if c.get("training"):
            print(f"{path}: trains in {describe_plan(c['training'])}", file=out)
    if note:
        print(note, file=out)
    return exit_code(reports)


def describe_plan(plan: dict[str, Any]) -> str:
    """A file's training plan (from the worker's tokenization) in one phrase, for validate and preview."""
    steps = plan["optimizer_steps"]
    warm = f"{plan['warmup_steps']:,} of them warming up" if plan["warmup_steps"] else "none warming up"
    return (f"about {steps:,} optimizer step{'s' if steps != 1 else ''} ({plan['rows']:,} rows; {warm}; held-out "
            "lines and replay change it a little)")
