"""The TUI's workspace reader: history once, then only appended bytes; status replaced; daemon death noticed.

How fast death is noticed (the goal is 2 s) is measured by bench/tui_latency.py, not asserted here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from engine.store.workspace import Workspace
from tui.messages import DaemonLiveness, EventsAdded, MetricsAdded, StatusChanged
from tui.reader import JsonlTail, WorkspaceWatcher

from workspaces import ROOT


class Collector:
    def __init__(self):
        self.messages = []
        self.lock = threading.Lock()

    def __call__(self, message):
        with self.lock:
            self.messages.append(message)

    def of(self, kind):
        with self.lock:
            return [m for m in self.messages if isinstance(m, kind)]

    def steps(self, job_id):
        return [e["step"] for m in self.of(MetricsAdded) if m.job_id == job_id for e in m.events if e["event"] == "step"]

    def wait(self, predicate, timeout=5.0):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return False


def step(i, loss=1.0):
    return json.dumps({"event": "step", "time": 0, "step": i, "loss": loss, "learning_rate": 1e-4}) + "\n"


def write_status(ws, state):
    tmp = ws.state / ".status.tmp"
    tmp.write_text(json.dumps({"schema": 1, "daemon": {"state": state}, "job": None}))
    os.replace(tmp, ws.status_path)


@pytest.fixture
def ws(tmp_path):
    w = Workspace.at(tmp_path / "ws")
    w.create_folders()
    return w


@pytest.fixture
def watcher(ws):
    post = Collector()
    w = WorkspaceWatcher(ws, post, chunk=100)
    stop = threading.Event()
    thread = threading.Thread(target=w.run, args=(stop,), daemon=True)
    yield ws, post, thread
    stop.set()
    thread.join(5)
    assert not thread.is_alive()


def test_history_then_appended_lines_with_a_torn_line(watcher):
    ws, post, thread = watcher
    for job, n in (("00001-a", 250), ("00002-b", 3)):
        (ws.run_dir(job)).mkdir()
        with open(ws.run_dir(job) / "metrics.jsonl", "w") as f:
            f.write(json.dumps({"event": "job_start", "job_id": job}) + "\n")
            f.write("".join(step(i) for i in range(1, n + 1)))
            f.write("not json\n")  # survived, skipped
    with open(ws.events_path, "w") as f:
        f.write("".join(json.dumps({"time": i, "kind": "accepted", "level": "info", "message": f"m{i}"}) + "\n"
                        for i in range(800)))
    write_status(ws, "training")
    thread.start()
    assert post.wait(lambda: len(post.steps("00002-b")) == 3 and post.of(EventsAdded))  # the first picture
    assert post.steps("00001-a") == list(range(1, 251))
    firsts = [m.job_id for m in post.of(MetricsAdded)]
    assert firsts == sorted(firsts) and max(len(m.events) for m in post.of(MetricsAdded)) <= 100  # job order, chunked
    events = post.of(EventsAdded)
    assert len(events) == 1 and len(events[0].events) == 500 and events[0].events[-1]["message"] == "m799"
    assert post.of(DaemonLiveness)[0].running is False
    assert post.of(StatusChanged)

    metrics = ws.run_dir("00002-b") / "metrics.jsonl"
    with open(metrics, "a") as f:  # a torn line: half now, half later
        line = step(4, 0.5)
        f.write(line[:10])
        f.flush()
        time.sleep(0.8)
        assert post.steps("00002-b") == [1, 2, 3]
        f.write(line[10:] + step(5))
    assert post.wait(lambda: post.steps("00002-b") == [1, 2, 3, 4, 5])

    # A new job appears; then events are appended.
    ws.run_dir("00003-c").mkdir()
    (ws.run_dir("00003-c") / "metrics.jsonl").write_text(step(1))
    with open(ws.events_path, "a") as f:
        f.write(json.dumps({"time": 1, "kind": "job_started", "level": "info", "message": "new"}) + "\n")
    assert post.wait(lambda: post.steps("00003-c") == [1])
    assert post.wait(lambda: len(post.of(EventsAdded)) == 2 and post.of(EventsAdded)[1].events[0]["message"] == "new")


def test_replaced_status_and_a_shrunk_file_are_followed(watcher):
    ws, post, thread = watcher
    write_status(ws, "idle")
    thread.start()
    assert post.wait(lambda: post.of(StatusChanged))
    write_status(ws, "paused")
    assert post.wait(lambda: post.of(StatusChanged)[-1].status["daemon"].get("last_state") == "paused")
    run = ws.run_dir("00001-a")
    run.mkdir()
    (run / "metrics.jsonl").write_text(step(1) + step(2))
    assert post.wait(lambda: post.steps("00001-a") == [1, 2])
    tmp = run / "m.tmp"
    tmp.write_text(step(7))
    os.replace(tmp, run / "metrics.jsonl")  # replaced by a shorter file
    assert post.wait(lambda: post.steps("00001-a") == [1, 2, 7])
    run.joinpath("metrics.jsonl").unlink()  # vanished: no crash
    time.sleep(0.6)
    assert thread.is_alive()


def test_daemon_death_is_noticed_without_file_events(watcher):
    ws, post, thread = watcher
    code = ("import sys, time\nfrom pathlib import Path\nfrom engine.store.lock import DaemonLock\n"
            "DaemonLock(Path(sys.argv[1]), Path(sys.argv[2])).acquire()\nprint('held', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(ws.lock_path), str(ws.root)], cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "held"
        thread.start()
        assert post.wait(lambda: post.of(DaemonLiveness))
        first = post.of(DaemonLiveness)[0]
        assert first.running and first.pid == proc.pid
        proc.kill()
        proc.wait()
        assert post.wait(lambda: not post.of(DaemonLiveness)[-1].running, timeout=10.0)
        # The status says so too.
        assert post.wait(lambda: post.of(StatusChanged)[-1].status["daemon"]["running"] is False, timeout=10.0)
    finally:
        proc.kill()
        proc.wait()


def test_tail_keeps_a_partial_line_until_complete(tmp_path):
    path = tmp_path / "m.jsonl"
    tail = JsonlTail(path)
    assert tail.read_new() == []  # no file yet
    path.write_text('{"a": 1}\n{"b"')
    assert tail.read_new() == [{"a": 1}]
    with open(path, "a") as f:
        f.write(': 2}\n[1]\n{"c": 3}\n')
    assert tail.read_new() == [{"b": 2}, {"c": 3}]  # a non-object line is skipped


def test_a_long_history_waits_for_the_ui_slice_by_slice(ws, monkeypatch):
    """Parsed history never piles up ahead of the UI: the next slice is read once the last is applied."""
    from tui import reader

    monkeypatch.setattr(reader, "HISTORY_SLICE_BYTES", 8 << 10)
    monkeypatch.setattr(reader, "APPLIED_WAIT_S", 60.0)
    ws.run_dir("00001-a").mkdir()
    (ws.run_dir("00001-a") / "metrics.jsonl").write_text("".join(step(i) for i in range(1, 2001)))
    post = Collector()
    stop = threading.Event()
    thread = threading.Thread(target=WorkspaceWatcher(ws, post).run, args=(stop,), daemon=True)
    thread.start()
    try:
        assert post.wait(lambda: post.of(MetricsAdded))
        time.sleep(0.5)  # an unhurried reader would have read all 2,000 steps by now
        first = post.steps("00001-a")
        assert 0 < len(first) < 200 and first == list(range(1, len(first) + 1))
        for _ in range(500):  # the UI applies what came, slice after slice
            for m in post.of(MetricsAdded):
                m.applied.set()
            if len(post.steps("00001-a")) == 2000:
                break
            time.sleep(0.01)
        assert post.steps("00001-a") == list(range(1, 2001))
    finally:
        stop.set()
        thread.join(5)
