"""Fault injection at every write the daemon makes, for real (engine/atomic.py's TRAIND_FAULTS hook).

A first run counts the writes of a whole job. Then the Nth write fails with
ENOSPC, then with EIO, once and persistently (until the test clears it). After
each: the daemon never died (it exits 0 by --once only when the queue is
empty), no state file is torn, and the file is trained exactly once. `make
chaos` sweeps every N; `make test` a spread of them.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from workspaces import ROOT, daemon_env, drop, files_in, make_workspace, text_lines, wait_for

import subprocess
import sys

FAST = {"jobs": {"warm_worker": False, "stop_grace_seconds": 10.0}, "inbox": {"settle_seconds": 0.2}}
HOOKS = {"fake": {"steps": 10, "checkpoint_every": 5}}
SAMPLES = int(os.environ.get("TRAIND_FAULT_SAMPLES", "4"))  # N per mode in make test; 0: every N (make chaos)


def run_daemon(ws, faults: dict) -> subprocess.Popen:
    env = daemon_env(True, HOOKS)
    env["TRAIND_FAULTS"] = json.dumps(faults)
    log = open(ws.root.parent / "daemon.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "engine.cli", "daemon", "--once", "-w", str(ws.root)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def fresh(tmp_path, name: str):
    ws = make_workspace(tmp_path / name / "ws", FAST)
    drop(ws, "data.jsonl", text_lines(5))
    return ws


def writes_of_a_whole_job(tmp_path) -> int:
    ws = fresh(tmp_path, "count")
    count = tmp_path / "count" / "writes"
    proc = run_daemon(ws, {"nth": 10**9, "count_file": str(count)})
    assert proc.wait(60) == 0
    assert files_in(ws, "done") == ["00001-data.jsonl"]
    return int(count.read_text())


def assert_whole(ws) -> None:
    for path in [ws.status_path, ws.current_model_pointer, *ws.runs.glob("*/job.json"), *ws.queue("done").glob("*.json")]:
        json.loads(path.read_text())
    for log in [ws.events_path, *ws.runs.glob("*/metrics.jsonl")]:
        data = log.read_bytes() if log.exists() else b""
        assert not data or data.endswith(b"\n"), f"{log}: half a line"
        [json.loads(line) for line in data.splitlines() if line]
    assert [files_in(ws, s) for s in ("inbox", "active", "done", "failed", "rejected")] == \
        [[], [], ["00001-data.jsonl"], [], []]


def picks(total: int) -> list[int]:
    if SAMPLES <= 0 or SAMPLES >= total:
        return list(range(1, total + 1))
    return sorted({1 + round(i * (total - 1) / (SAMPLES - 1)) for i in range(SAMPLES)})


@pytest.mark.parametrize("code", ["ENOSPC", "EIO"])
@pytest.mark.parametrize("persistent", [False, True], ids=["once", "persistent"])
def test_the_nth_write_failing_never_kills_the_daemon_or_tears_a_file(tmp_path, code, persistent):
    total = writes_of_a_whole_job(tmp_path)
    assert total > 20  # the sweep covers a real job's writes: claim, records, metrics, events, status, publish
    for n in picks(total):
        ws = fresh(tmp_path, f"n{n}")
        flag = tmp_path / f"n{n}" / "fault-on"
        flag.touch()
        count = tmp_path / f"n{n}" / "writes"
        proc = run_daemon(ws, {"nth": n, "errno": code, "persistent": persistent, "while_exists": str(flag),
                               "count_file": str(count)})
        try:
            if persistent:  # refused again and again while it retries; then the disk "comes back"
                wait_for(lambda: proc.poll() is not None or (count.exists() and int(count.read_text() or 0) >= n + 5),
                         timeout=60, what=f"write {n} refused repeatedly")
                if proc.poll() is None:
                    time.sleep(0.5)
                    assert proc.poll() is None, f"write {n}: the daemon exited while the fault lasted"
                else:  # only a write of its shutdown, after the queue was done, may be refused for good
                    assert files_in(ws, "done") == ["00001-data.jsonl"], f"write {n}: exited with work left"
                flag.unlink()
            assert proc.wait(60) == 0, f"write {n} failing with {code}: the daemon did not finish the queue"
        finally:
            if proc.poll() is None:
                proc.kill()
        assert_whole(ws)
