"""Fault injection at every write the daemon makes, for real (the `faults` test switch, engine/core/testing.py).

A first run counts the writes of a whole job. Then the Nth write fails with
ENOSPC, then with EIO, once and persistently (until the test clears it). After
each: the daemon never died (it exits 0 by --once only when the queue is
empty), no state file is torn, and the file is trained exactly once. `make
chaos` sweeps every N in four modes; `make test` the first write of each site
(each file the daemon writes), in turn with ENOSPC once and EIO persistently.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import pytest

from engine.core import testing
from workspaces import ROOT, daemon_env, drop, files_in, make_workspace, text_lines, wait_for

import subprocess
import sys

FAST = {"jobs": {"warm_worker": False, "stop_grace_seconds": 10.0}, "inbox": {"settle_seconds": 0.2}}
HOOKS = {"fake": {"steps": 10, "checkpoint_every": 5}}
EVERY_WRITE = os.environ.get("TRAIND_FAULT_SWEEP") == "all"  # make chaos: every N, every mode
LAYOUT = {"inbox", "queue", "pending", "active", "done", "failed", "rejected", "runs", "models", "snapshots", "state"}
MODES = [("ENOSPC", False), ("EIO", False), ("ENOSPC", True), ("EIO", True)]


def run_daemon(ws, faults: dict) -> subprocess.Popen:
    env = daemon_env(True, HOOKS)
    env = testing.with_switches(env, faults=faults)
    log = open(ws.root.parent / "daemon.log", "ab")
    return subprocess.Popen([sys.executable, "-m", "engine.cli", "daemon", "--once", "-w", str(ws.root)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def fresh(tmp_path, name: str):
    ws = make_workspace(tmp_path / name / "ws", FAST)
    drop(ws, "data.jsonl", text_lines(5))
    return ws


def writes_of_a_whole_job(tmp_path) -> list[str]:
    """The site (file name) of every write of a whole job, in order."""
    ws = fresh(tmp_path, "count")
    sites = tmp_path / "count" / "sites"
    proc = run_daemon(ws, {"nth": 10**9, "sites_file": str(sites)})
    assert proc.wait(60) == 0
    assert files_in(ws, "done") == ["00001-data.jsonl"]
    return [Path(line.split(" ", 1)[1]).name for line in sites.read_text().splitlines()]


def assert_whole(ws) -> None:
    for path in [ws.status_path, ws.current_model_pointer, *ws.runs.glob("*/job.json"), *ws.queue("done").glob("*.json")]:
        json.loads(path.read_text())
    for log in [ws.events_path, *ws.runs.glob("*/metrics.jsonl")]:
        data = log.read_bytes() if log.exists() else b""
        assert not data or data.endswith(b"\n"), f"{log}: half a line"
        [json.loads(line) for line in data.splitlines() if line]
    assert [files_in(ws, s) for s in ("inbox", "active", "done", "failed", "rejected")] == \
        [[], [], ["00001-data.jsonl"], [], []]


def picks(sites: list[str], mode: int) -> list[int]:
    if EVERY_WRITE:
        return list(range(1, len(sites) + 1))
    # The first write to each file (the layout's folders, made at start, are one site between them),
    # every other one in each of the two modes make test runs.
    firsts = sorted({sites.index(site) + 1 for site in sites if site not in LAYOUT})
    return firsts[mode % 2::2]


@pytest.mark.parametrize("code,persistent", MODES if EVERY_WRITE else [MODES[0], MODES[3]],
                         ids=lambda v: {False: "once", True: "persistent"}.get(v, v))
def test_the_nth_write_failing_never_kills_the_daemon_or_tears_a_file(tmp_path, code, persistent):
    sites = writes_of_a_whole_job(tmp_path)
    # The sweep covers a real job's writes: the claim, records, metrics, events, status, the model's publication.
    assert {"00001-data.jsonl", "job.json", "metrics.jsonl", "events.jsonl", "status.json", "current.json",
            "00001-data"} <= set(sites)
    chosen = picks(sites, MODES.index((code, persistent)))
    print(f"\n{code} {'persistent' if persistent else 'once'}: {len(chosen)} of {len(sites)} writes failed in turn; "
          f"sites: {dict(sorted(Counter(sites[n - 1] for n in chosen).items()))}")
    for n in chosen:
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
