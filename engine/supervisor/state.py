"""The supervisor's state: what the daemon knows of itself, passive, written only on the event loop's thread.

The components (the attempt, the intake, the snapshot task) own their own
fields and expose verbs; what decides (outcomes, recovery, a reload) returns a
value the daemon applies here. Work done in a thread returns or posts to the
loop (`loop.call_soon_threadsafe`); it never assigns these fields. With the
thread guard on (a test-only switch the whole test suite runs with), a write
from any other thread ends the daemon at once, so such a regression fails loudly.

The daemon's published state (idle, training, blocked, ...) is derived from
these facts in one function, `derive`, and from nothing else.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from engine.core.config import Config
from engine.store import jobs

if TYPE_CHECKING:
    from engine.supervisor.attempt import Attempt, Progress


@dataclass(eq=False)
class SupervisorState:
    config: Config
    starting: bool = True  # until the workspace is recovered: only `status` is answered
    stopping: bool = False  # a shutdown was asked for
    held: bool = False  # stopped by the user: the queue waits for 'start', across restarts
    job: jobs.Job | None = None  # the job in hand (validating or training)
    progress: Progress | None = None  # its live numbers, shown from its preflight on
    attempt: Attempt | None = None  # its worker's run, while one runs
    resume: list[jobs.Job] = field(default_factory=list)  # taken back or interrupted: they go first, in order
    changing_model: str | None = None  # "rollback" or "promote" under way: no attempt starts meanwhile
    preflight_problem: str | None = None  # why the next attempt cannot start yet
    skip_job_id: str | None = None  # 'traind skip' on a job not running in a worker right now
    last_error: dict[str, Any] | None = None
    # What status.json shows: derived from the facts above by `derive`, and when it last changed.
    shown: tuple[str, str | None] = ("starting", None)
    since: float = field(default_factory=time.time)
    guard: bool = False  # refuse writes from other threads (the tests turn it on)
    owner: int = field(default_factory=threading.get_ident)

    def __setattr__(self, name: str, value: Any) -> None:
        owner = self.__dict__.get("owner")  # None while __init__ assigns the fields
        if self.__dict__.get("guard") and owner is not None and threading.get_ident() != owner:
            wrong_thread(name)
        object.__setattr__(self, name, value)


def wrong_thread(name: str) -> None:
    """A regression the tests must not miss: said on stderr with where it came from, and the daemon ends at
    once (an exception could be caught on its way back to the loop and become a mere alert)."""
    where = "".join(traceback.format_stack(limit=8)[:-2])
    print(f"traind: supervisor state {name!r} assigned from thread {threading.current_thread().name!r}, not the "
          f"event loop's:\n{where}", file=sys.stderr, flush=True)
    os._exit(70)


def derive(s: SupervisorState, write_problem: str | None) -> tuple[str, str | None]:
    """The daemon's state follows from the facts; nothing else sets it."""
    a = s.attempt
    if s.stopping:
        return "shutting_down", None
    if write_problem:
        return "blocked", write_problem
    if s.starting:
        return "starting", None
    if s.changing_model == "rollback":
        return "rolling_back", None
    if a is not None and a.blocked:
        return "blocked", a.blocked
    if s.preflight_problem:
        return "blocked", s.preflight_problem
    if a is not None and a.paused:
        return "paused", None
    if a is not None:
        return "training", None
    if s.job is not None:  # between attempts, or its worker starting: training all the same
        return ("validating" if s.job.state == "validating" else "training"), None
    if s.held:
        return "stopped", "stopped by the user: 'traind start' resumes the queue"
    return "idle", None
