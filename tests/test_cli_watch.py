"""`traind events`, `traind logs` and the daemon's console, as a shell sees them: real processes, real files.

Each -f is a real `python -m engine.cli ... -f` reading what another process
appends; Ctrl-C is a real SIGINT. The daemon runs with the scripted fake worker.
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from engine.api import follow
from workspaces import ROOT, daemon_env, drop, make_workspace, run_cli, start_daemon, stop_daemon, text_lines, wait_for

FAST = {"jobs": {"warm_worker": False, "stop_grace_seconds": 10.0}, "inbox": {"settle_seconds": 0.5}}


class Follower:
    """`traind ARGS` in a subprocess, its stdout read line by line on a thread."""

    def __init__(self, *args: str):
        # As from a terminal, where Ctrl-C ends it: a runner started in the background (`make test &`) has SIGINT
        # ignored, and a python started with it ignored keeps it so.
        self.proc = subprocess.Popen([sys.executable, "-m", "engine.cli", *args], env=daemon_env(), cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def next(self, timeout: float = 30.0) -> str:
        try:
            return self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line from {self.proc.args[3:]} within {timeout}s") from None

    def until(self, predicate, timeout: float = 60.0) -> list[str]:
        """Lines up to and including the first one `predicate` accepts."""
        seen = []
        deadline = time.monotonic() + timeout
        while not seen or not predicate(seen[-1]):
            seen.append(self.next(max(0.1, deadline - time.monotonic())))
        return seen

    def interrupt(self) -> tuple[int, str]:
        """Ctrl-C: the exit code and what it said on stderr."""
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(30)
        return code, self.proc.stderr.read()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def followers():
    started: list[Follower] = []

    def start(*args: str) -> Follower:
        started.append(Follower(*args))
        return started[-1]
    yield start
    for f in started:
        f.kill()


def event(kind: str, message: str, level: str = "info", when: float = 1_700_000_000.0) -> bytes:
    return (json.dumps({"time": when, "kind": kind, "level": level, "message": message}) + "\n").encode()


def append(path, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


# -- the tail and follow module --------------------------------------------------------------------


def test_last_lines_are_the_complete_ones_across_read_chunks(tmp_path):
    path = tmp_path / "log"
    lines = [f"line {i} ".encode() + b"x" * (i % 300) + b"\n" for i in range(2000)]  # well over one chunk
    path.write_bytes(b"".join(lines) + b"partial, no newline yet")
    got, offset = follow.last_lines(path, 700)
    assert got == lines[-700:]
    assert offset == sum(map(len, lines))  # following goes on from the partial line's start
    assert follow.last_lines(path, 0) == ([], offset)
    assert follow.last_lines(path, 5000)[0] == lines  # fewer lines than asked: all of them
    assert follow.last_lines(tmp_path / "missing", 10) == ([], 0)


def test_follow_holds_a_partial_line_until_its_end_arrives_and_rereads_a_replaced_file(tmp_path):
    path = tmp_path / "log"
    stop = threading.Event()
    got: queue.Queue[bytes] = queue.Queue()
    reader = threading.Thread(target=lambda: [got.put(line) for line in follow.follow(path, 0, 0.02,
                                                                                        lambda: not stop.is_set())])
    reader.start()
    try:
        path.write_bytes(b"one\ntw")  # written in one go: seen whole, the partial "tw" with it
        assert got.get(timeout=30) == b"one\n"
        append(path, b"o\nthree\n")
        assert [got.get(timeout=30), got.get(timeout=30)] == [b"two\n", b"three\n"]
        replacement = tmp_path / "new"
        replacement.write_bytes(b"fresh\n")
        os.replace(replacement, path)  # a new file under the name (a new warm worker's log): read from its start
        assert got.get(timeout=30) == b"fresh\n"
    finally:
        stop.set()
        reader.join(30)
    assert got.empty()


# -- traind events ---------------------------------------------------------------------------------------


def test_events_follow_prints_appended_events_in_order_holding_a_partial_line(tmp_path, followers):
    ws = make_workspace(tmp_path / "ws")
    ws.events_path.write_bytes(b"".join(event("old", f"old {i}") for i in range(5)))
    f = followers("events", "-f", "-n", "2", "-w", str(ws.root))
    first = [f.next(), f.next()]
    assert [line.split()[-2:] for line in first] == [["old", "3"], ["old", "4"]]
    assert re.match(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d  info +old +old 3$", first[0])

    new = event("job_done", "a.jsonl: trained", when=time.time())
    append(ws.events_path, event("job_started", "a.jsonl: training") + new[:25])  # one write: a line and a half
    assert f.next().endswith("job_started          a.jsonl: training")
    append(ws.events_path, new[25:] + event("job_failed", "b.jsonl: failed", "error"))
    assert f.next().endswith("job_done             a.jsonl: trained")  # the half line, printed once whole
    assert re.search(r"  error    job_failed +b.jsonl: failed$", f.next())
    code, err = f.interrupt()
    assert code == 0 and err == ""  # Ctrl-C ends it quietly
    assert f.lines.empty()


def test_events_follow_waits_for_a_log_that_does_not_exist_yet(tmp_path, followers):
    ws = make_workspace(tmp_path / "ws")
    assert not ws.events_path.exists()
    f = followers("events", "-f", "--json", "-w", str(ws.root))
    line = event("daemon_started", "daemon started")
    ws.events_path.write_bytes(line)
    assert f.next() == line.decode().rstrip("\n")
    assert f.interrupt()[0] == 0


def test_events_kind_and_json_filter_and_n_counts_the_matching_ones(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    wanted = [event("job_failed", "early failure", "error"), event("rejected", "bad.jsonl", "warning")]
    noise = [event("step_note", f"noise {i}") for i in range(3000)]  # more than -n's first window holds
    ws.events_path.write_bytes(wanted[0] + b"".join(noise) + wanted[1] + b"not json\n" + noise[0])
    out = run_cli("events", "--kind", "job_failed", "--kind", "rejected", "--json", "-w", str(ws.root))
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [w.decode().rstrip("\n") for w in wanted]
    assert [json.loads(line)["level"] for line in out.stdout.splitlines()] == ["error", "warning"]
    last = run_cli("events", "-n", "1", "--kind", "job_failed", "-w", str(ws.root))
    assert last.returncode == 0 and "early failure" in last.stdout and len(last.stdout.splitlines()) == 1
    plain = run_cli("events", "-w", str(ws.root))
    assert len(plain.stdout.splitlines()) == 20 and "noise 0" in plain.stdout.splitlines()[-1]


def test_events_refuses_a_kind_traind_never_records_and_names_the_closest_one(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    ws.events_path.write_bytes(event("job_failed", "early failure", "error"))
    typo = run_cli("events", "--kind", "job_faild", "-w", str(ws.root))
    assert typo.returncode == 2 and typo.stdout == ""
    assert "--kind 'job_faild' is no event kind traind records (did you mean 'job_failed'?" in typo.stderr
    assert "rejected" in typo.stderr  # the kinds are listed
    known = run_cli("events", "--kind", "job_failed", "-w", str(ws.root))
    assert known.returncode == 0 and "early failure" in known.stdout


# -- traind logs ------------------------------------------------------------------------------------------


def test_logs_shows_and_follows_a_real_jobs_worker_log_and_refuses_an_unknown_job(tmp_path, followers):
    ws = make_workspace(tmp_path / "ws", FAST)
    drop(ws, "facts.jsonl", text_lines(5))
    # The first attempt fails after 3 steps; the second, appended to the same log, succeeds.
    proc = start_daemon(ws, hooks={"fake": {"steps": 30, "step_seconds": 0.05, "exit_code": 1, "fail_after": 3,
                                            "fail_attempts": 1}})
    try:
        wait_for(lambda: ws.run_dir("00001-facts").is_dir(), what="the job's run folder")
        f = followers("logs", "-f", "00001-facts", "-w", str(ws.root))  # there may be no log yet: -f waits
        seen = f.until(lambda line: "attempt 2 ===" in line)
        seen += f.until(lambda line: line.startswith("traind-worker: fake worker for 00001-facts"))
        where = {what: next(i for i, line in enumerate(seen) if what in line)
                 for what in ("attempt 1 ===", "failing on purpose", "attempt 2 ===")}
        assert where["attempt 1 ==="] < where["failing on purpose"] < where["attempt 2 ==="], seen
        assert f.interrupt() == (0, "==> runs/00001-facts/worker.log <==\n")
        wait_for(lambda: (ws.queue("done") / "00001-facts.jsonl").exists(), what="the job done")
    finally:
        assert stop_daemon(proc) == 0
    latest = run_cli("logs", "-w", str(ws.root))  # no job running: the latest one's log
    assert latest.returncode == 0 and "fake worker for 00001-facts" in latest.stdout
    assert latest.stdout.count("=== ") == 2
    unknown = run_cli("logs", "00009-nope", "-w", str(ws.root))
    assert unknown.returncode == 1
    assert "no job '00009-nope' (recent jobs: 00001-facts)" in unknown.stderr and "traind status" in unknown.stderr


def test_logs_shows_traind_own_lines_and_tracebacks_unless_asked_for_all(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    ws.run_dir("00001-chats").mkdir(parents=True)
    chatter = [f"[transformers] Model config LlamaConfig {{ line {i} }}" for i in range(60)]
    log = ["", "=== 2026-01-01 10:00:00 attempt 1 ===", "traind-worker: pid 7 job 00001-chats", *chatter,
           "traind-worker: step 1/9 loss 2.1000 lr 0.001 grad norm 1.2 900 tokens/s", "{'loss': 2.1}",
           "Traceback (most recent call last):", '  File "train.py", line 3, in run', "    step()",
           "RuntimeError: the disk went away", "[transformers] Saving model checkpoint to x"]
    (ws.run_dir("00001-chats") / "worker.log").write_text("\n".join(log) + "\n")
    own = run_cli("logs", "00001-chats", "-w", str(ws.root))
    assert own.returncode == 0, own.stderr
    assert own.stdout.splitlines() == [log[1], log[2], log[-7], *log[-5:-1]]
    last = run_cli("logs", "-n", "2", "00001-chats", "-w", str(ws.root))  # -n counts the lines shown
    assert last.stdout.splitlines() == log[-3:-1]
    every = run_cli("logs", "--all", "-n", "100", "00001-chats", "-w", str(ws.root))
    assert every.stdout.splitlines() == log


# -- the daemon's console ---------------------------------------------------------------------------------


def test_the_daemon_console_has_journald_levels_when_not_a_terminal(tmp_path):
    ws = make_workspace(tmp_path / "ws", {**FAST, "jobs": {**FAST["jobs"], "max_attempts": 1}})
    drop(ws, "broken.jsonl", text_lines(5), age=30)
    drop(ws, "bad.jsonl", b'{"oops": 1}\n', age=20)
    proc = start_daemon(ws, "--once", hooks={"fake": {"steps": 3, "exit_code": 1}})  # stderr to daemon.log
    assert proc.wait(60) == 1
    lines = (ws.root / "daemon.log").read_text().splitlines()
    assert any(line.startswith("<6>daemon_started: daemon started (PID ") for line in lines), lines
    assert any(line.startswith("<4>rejected: bad.jsonl: rejected") for line in lines), lines
    assert any(line.startswith("<3>job_failed: broken.jsonl: ") for line in lines), lines
    assert not any(re.match(r"\d\d:\d\d:\d\d ", line) for line in lines), lines  # journald stamps lines itself


def test_the_daemon_console_keeps_times_and_marks_on_a_terminal(tmp_path):
    ws = make_workspace(tmp_path / "ws", FAST)
    drop(ws, "bad.jsonl", b'{"oops": 1}\n')
    master, slave = os.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "daemon", "--once", "-w", str(ws.root)],
                            env=daemon_env(), cwd=ROOT, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    out = b""
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer of the terminal has gone
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
        assert proc.wait(60) == 1
    text = out.decode().replace("\r\n", "\n")
    assert re.search(r"^\d\d:\d\d:\d\d daemon started \(PID ", text, re.M), text
    assert re.search(r"^\d\d:\d\d:\d\d warning: bad.jsonl: rejected", text, re.M), text
    assert "<6>" not in text and "<4>" not in text
