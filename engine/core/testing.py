"""Test-only switches: one environment variable, TRAIND_TEST, never set outside tests.

Unset, every switch is off and costs one dictionary lookup. Set, it is a JSON
object whose keys each turn one fault or stand-in on, in every process that
inherits it (the daemon, its workers, the commands):

  crash_at       "POINT:FLAG": the first process to reach POINT while the file FLAG exists
                 removes FLAG and kills itself with SIGKILL there (engine/core/crashpoints.py)
  faults         the Nth write of the daemon fails for real, once or persistently
                 (engine/core/atomic.py's Faults; the worker never inherits it)
  worker         hooks handed to the worker in its job spec: the real worker's
                 (engine/worker/callbacks.py TEST_HOOKS: a NaN, a failure, slow steps) and the
                 scripted fake's ("fake": tests/fake_worker.py)
  worker_module  the module run as the worker, for the scripted fake ("fake_worker")
  fork_server    the socket of a fork server the tests share, in place of the daemon's own
  pause_at       a rollback phase at which the snapshot task holds, so a test can kill the daemon there
  model_recheck_seconds
                 how often a model that could not be loaded is looked at again
  thread_guard   the supervisor's state refuses a write from any thread but the event loop's
                 (engine/supervisor/state.py); the whole test suite runs with it
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

ENV = "TRAIND_TEST"


def switches(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    raw = (os.environ if environ is None else environ).get(ENV)
    return json.loads(raw) if raw else {}


def get(name: str, default: Any = None) -> Any:
    return switches().get(name, default)


def with_switches(environ: Mapping[str, str], **changes: Any) -> dict[str, str]:
    """A copy of `environ` with these switches set (a None value removes one); no switch left: unset."""
    merged = {**switches(environ), **changes}
    merged = {k: v for k, v in merged.items() if v is not None}
    env = {k: v for k, v in environ.items() if k != ENV}
    if merged:
        env[ENV] = json.dumps(merged)
    return env
