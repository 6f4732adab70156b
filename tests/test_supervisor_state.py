"""The supervisor's state: derived in one place, and written only on the event loop's thread.

The whole suite runs its daemons with the thread guard on (tests/workspaces.py's
daemon_env): a write from any other thread ends the daemon at once, with the
field and the stack on stderr, so a regression cannot pass as a mere alert.
"""

from __future__ import annotations

import subprocess
import sys

from engine.core.config import Config
from engine.supervisor.state import SupervisorState, derive
from workspaces import ROOT

GUARDED_WRITE = """
import threading
from engine.core.config import Config
from engine.supervisor.state import SupervisorState

state = SupervisorState(Config(), guard={guard})
state.held = True  # the owner's thread: always allowed
worker = threading.Thread(target=lambda: setattr(state, "last_error", {{"kind": "x"}}), name="intake")
worker.start()
worker.join()
print("survived", state.last_error)
"""


def run_guarded(guard: bool) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", GUARDED_WRITE.format(guard=guard)], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)


def test_a_write_from_another_thread_ends_the_process_with_the_field_and_where_it_came_from():
    result = run_guarded(True)
    assert result.returncode == 70 and "survived" not in result.stdout
    assert "supervisor state 'last_error' assigned from thread 'intake'" in result.stderr
    assert "<lambda>" in result.stderr  # the stack that made the write


def test_without_the_guard_such_a_write_goes_through():
    result = run_guarded(False)
    assert result.returncode == 0 and "survived {'kind': 'x'}" in result.stdout


class _Attempt:
    def __init__(self, blocked=None, paused=False):
        self.blocked, self.paused = blocked, paused


def test_the_shown_state_follows_from_the_facts_in_order_of_precedence():
    s = SupervisorState(Config())
    assert derive(s, None) == ("starting", None)
    s.starting = False
    assert derive(s, None) == ("idle", None)
    s.held = True
    assert derive(s, None) == ("stopped", "stopped by the user: 'traind start' resumes the queue")
    s.attempt = _Attempt(paused=True)
    assert derive(s, None) == ("paused", None)
    s.preflight_problem = "disk: 1 GB free"
    assert derive(s, None) == ("blocked", "disk: 1 GB free")
    s.changing_model = "promote"  # a promote shows as what runs meanwhile
    assert derive(s, None) == ("blocked", "disk: 1 GB free")
    s.changing_model = "rollback"
    assert derive(s, None) == ("rolling_back", None)
    assert derive(s, "disk full: cannot write state/status.json") == ("blocked", "disk full: cannot write state/status.json")
    s.stopping = True
    assert derive(s, "disk full") == ("shutting_down", None)
