"""Test helpers: workspaces, a daemon in a subprocess, dropping files into the inbox."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from engine.core import reading, testing
from engine.store import models
from engine.core.atomic import read_json_lines
from engine.core import config
from engine.core.config import render_template
from engine.store.workspace import QUEUE_STATES, Workspace

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def make_workspace(root: Path, settings: dict | None = None, model_dir: Path | None = None) -> Workspace:
    """A workspace whose current model is model_dir (a real tiny model), or a placeholder for the fake worker."""
    ws = Workspace.at(root)
    ws.create_folders()
    if model_dir is None:
        model_dir = ws.models / "base-fake"
        model_dir.mkdir()
        (model_dir / "config.json").write_text("{}")
    models.set_current(ws, "local", str(model_dir), model_dir.name, origin="test")
    ws.config_path.write_text(render_template(config.from_dict(settings or {})))
    return ws


_SETS = itertools.count(1)


def text_lines(n: int, prefix: str = "row") -> list[str]:
    """n text examples; each call's are another file's content (an ignored key differs), since the daemon
    refuses content it trained before (engine/data/duplicates.py)."""
    serial = next(_SETS)
    return [json.dumps({"text": f"{prefix} {i}: {i}+{i}={2 * i}", "set": serial}) for i in range(n)]


def drop(ws: Workspace, name: str, lines: list[str] | bytes, age: float = 10.0) -> Path:
    """Write a file elsewhere, age it, and rename it into the inbox, as users are told to."""
    staging = ws.root / "staging"
    staging.mkdir(exist_ok=True)
    src = staging / name
    src.write_bytes(lines if isinstance(lines, bytes) else ("\n".join(lines) + "\n").encode())
    past = time.time() - age
    os.utime(src, (past, past))
    dst = ws.inbox / name
    os.rename(src, dst)
    return dst


def daemon_env(fake: bool = True, hooks: dict | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS)])
    env["PYTHONUNBUFFERED"] = "1"
    # One torch thread a worker, as tests/worker_runs.py has: three test processes share two cores, and a tiny
    # model's steps gain nothing from a second thread.
    env.setdefault("OMP_NUM_THREADS", "1")
    hooks = dict(hooks or {})
    return testing.with_switches(env, thread_guard=True, worker_module="fake_worker" if fake else None,
                                 worker={k: v for k, v in hooks.items() if k != "daemon"} or None,
                                 **hooks.get("daemon", {}))


def start_daemon(ws: Workspace, *extra: str, fake: bool = True, hooks: dict | None = None,
                 cgroup: Path | None = None) -> subprocess.Popen:
    log = open(ws.root / "daemon.log", "ab")

    def enter_cgroup() -> None:
        (cgroup / "cgroup.procs").write_text(str(os.getpid()))

    return subprocess.Popen([sys.executable, "-m", "engine.cli", "daemon", "-w", str(ws.root), *extra],
                            env=daemon_env(fake, hooks), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                            preexec_fn=enter_cgroup if cgroup else None)


def run_cli(*args: str, fake: bool = True, hooks: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine.cli", *args], env=daemon_env(fake, hooks),
                          capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def wait_for(predicate, timeout: float = 60.0, what: str = "condition", interval: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def stop_daemon(proc: subprocess.Popen, timeout: float = 60.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout)


def files_in(ws: Workspace, state: str) -> list[str]:
    folder = ws.inbox if state == "inbox" else ws.queue(state)
    return sorted(n for n in os.listdir(folder) if not n.endswith(".reason.json") and not n.startswith("."))


def where_is(ws: Workspace, original_name: str) -> list[str]:
    """Every queue folder (or the inbox) holding the file that arrived under this name."""
    found = [("inbox", n) for n in files_in(ws, "inbox") if n == original_name]
    for state in QUEUE_STATES:
        for n in files_in(ws, state):
            record = ws.run_dir(reading.stem(n)) / "job.json"
            if record.exists() and json.loads(record.read_text())["original_name"] == original_name:
                found.append((state, n))
    return [s for s, _ in found]


def reason(ws: Workspace, state: str, original_name: str) -> dict:
    for r in sorted(ws.queue(state).glob("*.reason.json")):  # also of a file that was removed: only its reason is left
        doc = json.loads(r.read_text())
        if doc["original_name"] == original_name:
            return doc
    raise AssertionError(f"no reason for {original_name} in queue/{state}")


def events(ws: Workspace) -> list[dict]:
    return read_json_lines(ws.events_path)
