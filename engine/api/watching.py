"""`traind events` and `traind logs`: the event log and a job's worker log from any shell, like `pueue follow`.

Both read files only (no daemon needed) through engine/api/follow.py: the last
complete lines, then, with -f, each line as it is completed, until Ctrl-C.
`traind logs` shows traind's own lines of a worker log unless given --all.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from engine.api import follow, status
from engine.core import reading
from engine.store import eventlog
from engine.core.config import did_you_mean
from engine.store.workspace import Workspace


def count(text: str) -> int:
    """argparse's type for -n: a count, 0 or more."""
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text}: expected 0 or more")
    return n


def _event_line(raw: bytes, kinds: set[str] | None, as_json: bool) -> str | None:
    """One line of the event log as `traind events` prints it, or None (another kind, or not an event)."""
    try:
        event = json.loads(raw)
        when, kind, level, message = event["time"], event["kind"], event["level"], event["message"]
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(when))
    except (ValueError, TypeError, KeyError, OverflowError, OSError):
        return None
    if kinds and kind not in kinds:
        return None
    return raw.decode().rstrip("\n") if as_json else f"{stamp}  {level:<7}  {kind:<20} {message}"


def _print_lines(lines, show) -> None:
    for raw in lines:
        if (text := show(raw)) is not None:
            print(text, flush=True)


def events(ws: Workspace, args: argparse.Namespace) -> int:
    """`traind events`: the last events, then (-f) those that follow."""
    kinds = set(args.kind or ())
    for kind in sorted(kinds - eventlog.KINDS):  # a typo would print nothing, as if no such event had happened
        print(f"traind events: --kind {kind!r} is no event kind traind records ({did_you_mean(kind, eventlog.KINDS)}"
              f"the kinds: {', '.join(sorted(eventlog.KINDS))})", file=sys.stderr)
    if kinds - eventlog.KINDS:
        return 2

    def show(raw: bytes) -> str | None:
        return _event_line(raw, kinds, args.json)
    try:
        # With --kind, -n counts the matching events: read further back until that many are found.
        window = max(args.n, 1)
        while True:
            lines, offset = follow.last_lines(ws.events_path, window)
            shown = [raw for raw in lines if show(raw) is not None]
            if len(shown) >= args.n or len(lines) < window:
                break
            window *= 4
        _print_lines(shown[-args.n:] if args.n else [], show)
        if args.follow:
            _print_lines(follow.follow(ws.events_path, offset), show)
    except KeyboardInterrupt:  # Ctrl-C is how -f ends
        return 0
    return 0


def _job_log(ws: Workspace, job: str | None) -> Path | str:
    """The worker log `traind logs` shows, or why there is none."""
    how = f"'traind status -w {ws.root}' names the job in training; the job ids are the folders in {ws.runs}"
    runs = sorted((p for p in ws.runs.iterdir() if p.is_dir()), key=lambda p: p.name) if ws.runs.is_dir() else []
    if job is not None:
        job = reading.stem(Path(job).name)  # a queue file's name will do
        if not ws.run_dir(job).is_dir():
            recent = ", ".join(p.name for p in runs[-5:]) or "none yet"
            return f"no job {job!r} (recent jobs: {recent}); {how}"
        return ws.run_dir(job) / "worker.log"
    current = (status.read(ws, ask=False).get("job") or {}).get("id")
    if current and ws.run_dir(current).is_dir():
        return ws.run_dir(current) / "worker.log"
    with_logs = [p for p in runs if (p / "worker.log").exists()]
    if with_logs:
        return with_logs[-1] / "worker.log"
    if ws.idle_worker_log.exists():
        return ws.idle_worker_log
    return f"no job has run yet; {how}"


OWN_PREFIXES = (b"traind-worker: ", b"=== ")  # the worker's own lines; the daemon's `=== TIME attempt N ===`
TRACEBACK = b"Traceback (most recent call last):"
CHAINED = (b"During handling of the above exception", b"The above exception was the direct cause")


class OwnLines:
    """Which lines of a worker log are traind's own: its `traind-worker:` lines, the attempt headers, and
    any traceback whole (a failure's cause), not the libraries' chatter. Fed the lines in order."""

    def __init__(self) -> None:
        self.in_traceback = False

    def __call__(self, line: bytes) -> bool:
        if line.startswith(TRACEBACK) or line.startswith(CHAINED):
            self.in_traceback = True
            return True
        if self.in_traceback:
            if line[:1] in (b" ", b"\t"):
                return True
            self.in_traceback = False
            return True  # the exception's own line ends the traceback
        return line.startswith(OWN_PREFIXES)


def logs(ws: Workspace, args: argparse.Namespace) -> int:
    """`traind logs`: a job's worker log (traind's own lines, or --all), then (-f) what is appended to it."""
    log = _job_log(ws, args.job)
    if isinstance(log, str):
        print(f"traind logs: {log}", file=sys.stderr)
        return 1
    if not log.exists() and not args.follow:
        print(f"traind logs: {ws.relative(log)}: no log yet (the job has not started training; -f waits for it)",
              file=sys.stderr)
        return 1
    print(f"==> {ws.relative(log)} <==", file=sys.stderr, flush=True)
    out = sys.stdout.buffer
    try:
        # Without --all, -n counts the lines shown: read further back until that many are found.
        window = max(args.n, 1)
        while True:
            lines, offset = follow.last_lines(log, window)
            shown = (lambda line: True) if args.all else OwnLines()  # -f goes on with the state the window left
            kept = [line for line in lines if shown(line)]
            if len(kept) >= args.n or len(lines) < window:
                break
            window *= 4
        out.writelines(kept[-args.n:] if args.n else [])
        out.flush()
        if args.follow:
            for line in follow.follow(log, offset):
                if shown(line):
                    out.write(line)
                    out.flush()
    except KeyboardInterrupt:  # Ctrl-C is how -f ends
        return 0
    return 0


def add_commands(sub, common: argparse.ArgumentParser, workspace) -> None:
    """`events` and `logs` among the CLI's sub-commands; `workspace(args)` is the CLI's -w."""
    p = sub.add_parser("events", parents=[common], help="the event log (state/events.jsonl): time, level, kind, "
                       "message; -f follows it; no daemon needed")
    p.add_argument("-f", "--follow", action="store_true", help="print new events as they are logged, until Ctrl-C")
    p.add_argument("--json", action="store_true", help="the events' own JSON lines (schema in docs/status.md)")
    p.add_argument("--kind", action="append", metavar="KIND", help="only events of this kind (repeatable), e.g. "
                   "job_failed")
    p.add_argument("-n", type=count, default=20, help="how many of the last events to show first (default 20)")
    p.set_defaults(func=lambda a: events(workspace(a), a))

    p = sub.add_parser("logs", parents=[common], help="a job's worker log (default: the job in training, else the "
                       "latest): traind's own lines, --all for every line; -f follows it")
    p.add_argument("job", nargs="?", metavar="JOB", help="a job id, e.g. 00003-support-chats (see 'traind status')")
    p.add_argument("-f", "--follow", action="store_true", help="print new lines as they are written, until Ctrl-C "
                   "(the same job's log: run it again for the next job)")
    p.add_argument("--all", action="store_true", help="every line, the libraries' (transformers, torch) too; "
                   "by default only traind's own lines and tracebacks")
    p.add_argument("-n", type=count, default=40, help="how many of the last lines to show first (default 40)")
    p.set_defaults(func=lambda a: logs(workspace(a), a))
