"""The daemon's console: one line per event on stderr, for a person at a terminal or for journald.

On a terminal a line is `HH:MM:SS message` (`warning: ` or `error: ` before the
message when it is one). Anywhere else (a systemd unit, a file, a pipe) it is
`<N>kind: message`: the sd-daemon(3) level prefix, which journald turns into
the line's priority (<6> info, <4> warning, <3> error), and no time, since
journald and log collectors stamp lines themselves; `state/events.jsonl` keeps
the exact time of every event. A text of several lines (a traceback) gets the
prefix on each, so journald keeps them all at its priority.

Writing never raises: the console may be a file on the full disk.
"""

from __future__ import annotations

import sys
import time

LEVEL_PREFIX = {"info": "<6>", "warning": "<4>", "error": "<3>"}
TERMINAL_MARK = {"info": "", "warning": "warning: ", "error": "error: "}


def journal_style(stream=None) -> bool:
    """True when the stream is not a terminal: lines are then written for journald."""
    stream = sys.stderr if stream is None else stream
    try:
        return not stream.isatty()
    except (OSError, ValueError, AttributeError):
        return True


def format_line(text: str, level: str = "info", kind: str = "daemon", when: float | None = None,
                journal: bool = False) -> str:
    assert level in LEVEL_PREFIX, level
    if journal:
        prefix = LEVEL_PREFIX[level]
        first, *rest = text.split("\n")
        return "\n".join([f"{prefix}{kind}: {first}", *(f"{prefix}{line}" for line in rest)])
    stamp = time.strftime("%H:%M:%S", time.localtime(time.time() if when is None else when))
    return f"{stamp} {TERMINAL_MARK[level]}{text}"


def console(text: str, level: str = "info", kind: str = "daemon", when: float | None = None) -> None:
    """A line (or a few) of the daemon's on stderr, as the stream wants it (see the module's docstring)."""
    plain(format_line(text, level, kind, when, journal_style()))


def plain(text: str) -> None:
    """Text on stderr as it is (a command's own message, not the daemon's)."""
    try:
        print(text, file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass
