"""The control socket and the commands, against the real daemon with a scripted worker."""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from engine.api import control
from workspaces import (drop, events, files_in, make_workspace, reason, run_cli, start_daemon, stop_daemon,
                        text_lines, wait_for, where_is)

SETTINGS = {"jobs": {"warm_worker": False, "stop_grace_seconds": 10.0}, "inbox": {"settle_seconds": 0.5},
            "disk": {"reserve": 0}}


def status(ws) -> dict:
    try:
        return json.loads(ws.status_path.read_text())
    except FileNotFoundError:
        return {}


def state(ws) -> str | None:
    return status(ws).get("daemon", {}).get("state")


def raw_exchange(ws, payload: bytes) -> list[dict]:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(ws.control_socket))
        sock.sendall(payload)
        sock.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    return [json.loads(line) for line in data.splitlines()]


@pytest.fixture
def idle_daemon(tmp_path):
    ws = make_workspace(tmp_path / "ws", SETTINGS)
    proc = start_daemon(ws, hooks={"fake": {"steps": 100000, "step_seconds": 0.02, "checkpoint_every": 1000}})
    wait_for(lambda: state(ws) == "idle", what="an idle daemon")
    yield ws, proc
    assert stop_daemon(proc) == 0


def test_the_socket_is_private_and_bad_requests_get_error_replies(idle_daemon):
    ws, proc = idle_daemon
    assert stat.S_IMODE(os.stat(ws.control_socket).st_mode) == 0o600
    replies = raw_exchange(ws, b'garbage\n[1, 2]\n{"v": 1, "cmd": "explode"}\n{"v": 99, "cmd": "status"}\n'
                               b'{"v": 1, "cmd": "status"}\n')
    assert [r["ok"] for r in replies] == [False, False, False, False, True]
    assert "not JSON" in replies[0]["message"] and "JSON object" in replies[1]["message"]
    assert "unknown command 'explode'" in replies[2]["message"] and "version 99" in replies[3]["message"]
    assert replies[4]["status"]["daemon"]["state"] == "idle"
    huge = raw_exchange(ws, b'{"v": 1, "cmd": "status", "pad": "' + b"x" * (control.MAX_REQUEST_BYTES + 10) + b'"}\n')
    assert huge == [{"v": 1, "ok": False, "cmd": None, "message": f"request over {control.MAX_REQUEST_BYTES} bytes"}]
    assert proc.poll() is None
    assert control.request(ws.control_socket, "status")["ok"]


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to act as another user")
def test_another_user_is_refused_even_through_an_open_socket():
    # The folders must let 'nobody' reach the socket (pytest's own temp folders do not).
    root = tempfile.mkdtemp()
    os.chmod(root, 0o711)
    ws = make_workspace(Path(root) / "ws", SETTINGS)
    proc = start_daemon(ws)
    try:
        wait_for(lambda: state(ws) == "idle", what="an idle daemon")
        _refused_as_nobody(ws)
    finally:
        assert stop_daemon(proc) == 0
        shutil.rmtree(root)


def _refused_as_nobody(ws) -> None:
    os.chmod(ws.control_socket, 0o666)  # only the credentials check stands in the way now
    code = ("import json, socket, os, sys\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "s = socket.socket(socket.AF_UNIX); s.connect(sys.argv[1])\n"
            "s.sendall(b'{\"v\": 1, \"cmd\": \"shutdown\"}\\n'); print(s.recv(4096).decode())\n")
    out = subprocess.run([sys.executable, "-c", code, str(ws.control_socket)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    assert answer["ok"] is False and "permission denied" in answer["message"]
    assert state(ws) == "idle"


def test_pause_resume_checkpoint_stop_start_skip_from_the_command_line(idle_daemon):
    ws, proc = idle_daemon
    refused = run_cli("pause", "-w", str(ws.root))
    assert refused.returncode == 1 and "nothing is training" in refused.stderr
    drop(ws, "long.jsonl", text_lines(5))
    wait_for(lambda: (status(ws).get("job") or {}).get("step", 0) > 3, what="training")

    paused = run_cli("pause", "-w", str(ws.root))
    assert paused.returncode == 0 and "paused at step" in paused.stdout
    wait_for(lambda: state(ws) == "paused", what="paused state")
    held_at = status(ws)["job"]["step"]
    assert run_cli("pause", "-w", str(ws.root)).returncode == 1  # already paused
    saved = run_cli("checkpoint", "-w", str(ws.root))
    assert saved.returncode == 0 and f"checkpoint saved at step {held_at}" in saved.stdout
    assert status(ws)["job"]["step"] == held_at
    resumed = run_cli("resume", "-w", str(ws.root))
    assert resumed.returncode == 0
    wait_for(lambda: status(ws)["job"]["step"] > held_at + 3, what="steps after resume")

    stopped = run_cli("stop", "-w", str(ws.root))
    assert stopped.returncode == 0 and "released the GPU" in stopped.stdout
    wait_for(lambda: state(ws) == "stopped", what="stopped state")
    assert status(ws)["daemon"]["worker_pid"] is None and files_in(ws, "active") == ["00001-long.jsonl"]
    stop_step = int(stopped.stdout.split("at step ")[1].split()[0])

    started = run_cli("start", "-w", str(ws.root))
    assert started.returncode == 0 and "resuming 00001-long.jsonl" in started.stdout
    log = ws.run_dir("00001-long") / "fake_attempts.log"
    wait_for(lambda: len(log.read_text().splitlines()) == 2, what="the second attempt")
    assert int(log.read_text().splitlines()[1].split()[0]) == stop_step  # resumed from the checkpoint written at stop

    skipped = run_cli("skip", "-w", str(ws.root))
    assert skipped.returncode == 0
    wait_for(lambda: where_is(ws, "long.jsonl") == ["failed"], what="the skipped file in failed/")
    assert reason(ws, "failed", "long.jsonl")["reason"] == "skipped by user"
    assert run_cli("start", "-w", str(ws.root)).returncode == 1  # not stopped
    logged = [(e["command"], e["ok"]) for e in events(ws) if e["kind"] == "command"]
    assert logged == [("pause", False), ("pause", True), ("pause", False), ("checkpoint", True), ("resume", True),
                      ("stop", True), ("start", True), ("skip", True), ("start", False)]



def test_pause_toggles_follow_what_was_asked_not_what_the_worker_reported_yet(tmp_path):
    """The UI's p sends pause with toggle: two presses before the worker held (a slow step) are a pause and a
    resume, training goes on, and neither answer waits for a hold that never comes."""
    import threading

    ws = make_workspace(tmp_path / "ws", SETTINGS)
    proc = start_daemon(ws, hooks={"fake": {"steps": 100000, "step_seconds": 1.5, "checkpoint_every": 1000}})
    try:
        drop(ws, "slow.jsonl", text_lines(5))
        wait_for(lambda: (status(ws).get("job") or {}).get("step", 0) >= 1, what="training")
        first: dict = {}

        def press() -> None:
            started = time.monotonic()
            first.update(control.request(ws.control_socket, "pause", toggle=True), took=time.monotonic() - started)

        pressing = threading.Thread(target=press)
        pressing.start()
        time.sleep(0.3)  # the worker is mid-step and has not held
        second = control.request(ws.control_socket, "pause", toggle=True)
        pressing.join(30)
        assert first["ok"] and second["ok"], (first, second)
        assert sorted([first["did"], second["did"]]) == ["pause", "resume"], (first, second)  # in either order
        assert first["took"] < 10, first  # answered when withdrawn, not after the 30 s wait for a hold
        at = status(ws)["job"]["step"]
        wait_for(lambda: status(ws)["job"]["step"] >= at + 2, what="training going on after pause, resume")
        assert state(ws) == "training"

        held = control.request(ws.control_socket, "pause", toggle=True)  # one press: the worker holds
        assert (held["ok"], held["did"]) == (True, "pause") and "paused at step" in held["message"], held
        wait_for(lambda: state(ws) == "paused", what="paused")
        again = control.request(ws.control_socket, "pause", toggle=True)  # the next press resumes
        assert (again["ok"], again["did"]) == (True, "resume") and "resumed at step" in again["message"], again
        wait_for(lambda: state(ws) == "training", what="training again")
    finally:
        assert stop_daemon(proc) == 0


def test_a_stopped_queue_stays_stopped_across_a_restart(tmp_path):
    ws = make_workspace(tmp_path / "ws", SETTINGS)
    proc = start_daemon(ws)
    wait_for(lambda: state(ws) == "idle", what="idle")
    assert run_cli("stop", "-w", str(ws.root)).returncode == 0
    assert stop_daemon(proc) == 0
    drop(ws, "waits.jsonl", text_lines(3))
    proc = start_daemon(ws, hooks={"fake": {"steps": 5}})
    try:
        wait_for(lambda: state(ws) == "stopped", what="stopped after restart")
        # Held: it is taken in and validated (so a bad file is reported at once), but nothing trains.
        wait_for(lambda: files_in(ws, "pending") == ["00001-waits.jsonl"], what="validated, waiting")
        time.sleep(0.5)
        assert files_in(ws, "pending") == ["00001-waits.jsonl"] and files_in(ws, "done") == []
        assert run_cli("start", "-w", str(ws.root)).returncode == 0
        wait_for(lambda: where_is(ws, "waits.jsonl") == ["done"], what="the file to train after start")
    finally:
        assert stop_daemon(proc) == 0


def test_shutdown_command_stops_the_daemon_like_sigterm(idle_daemon):
    ws, proc = idle_daemon
    assert run_cli("shutdown", "-w", str(ws.root)).returncode == 0
    assert proc.wait(30) == 0
    assert run_cli("status", "-w", str(ws.root)).returncode == 0
    gone = run_cli("pause", "-w", str(ws.root))
    assert gone.returncode == 1 and "no traind daemon is running" in gone.stderr


def test_rollback_policy_retries_past_an_anomaly_then_gives_up(tmp_path):
    ws = make_workspace(tmp_path / "ws", {**SETTINGS, "guard": {"max_rollbacks": 2}})
    drop(ws, "once.jsonl", text_lines(3))
    proc = start_daemon(ws, "--once", hooks={"fake": {"steps": 12, "checkpoint_every": 5, "anomaly_at": 7}})
    assert proc.wait(60) == 0
    assert where_is(ws, "once.jsonl") == ["done"]
    starts = (ws.run_dir("00001-once") / "fake_attempts.log").read_text().split("\n")
    assert starts[1].split()[0] == "7"  # resumed past the bad step: the batches of steps 6-7 skipped
    assert any(e["kind"] == "rollback" and "step 7: rolling back to the checkpoint at step 5" in e["message"]
               for e in events(ws))
    good = json.loads(ws.current_model_pointer.read_text())

    drop(ws, "always.jsonl", text_lines(3))
    proc = start_daemon(ws, "--once", hooks={"fake": {"steps": 12, "anomaly_every": True}})
    assert proc.wait(60) == 1  # the file failed
    assert where_is(ws, "always.jsonl") == ["failed"]
    why = reason(ws, "failed", "always.jsonl")
    assert "after 2 rollbacks" in why["reason"] and len(why["rollbacks"]) == 3
    assert json.loads(ws.current_model_pointer.read_text()) == good  # the model stays at the last good state


def test_cuda_oom_retries_with_half_the_micro_batch(tmp_path):
    ws = make_workspace(tmp_path / "ws", {**SETTINGS, "training": {"batch_size": 8}})
    drop(ws, "big.jsonl", text_lines(3))
    hooks = {"fake": {"steps": 10, "fail_after": 2, "exit_code": 77, "error": "CUDA out of memory", "error_kind": "cuda_oom"}}
    proc = start_daemon(ws, "--once", hooks=hooks)
    assert proc.wait(60) == 1  # the file failed in the end
    sizes = [int(line.split()[1]) for line in (ws.run_dir("00001-big") / "fake_attempts.log").read_text().splitlines()]
    assert sizes[:4] == [8, 4, 2, 1]  # halved each time while possible, not counted as failures
    record = json.loads((ws.run_dir("00001-big") / "job.json").read_text())
    assert record["batch"] == {"batch_size": 1, "gradient_accumulation_steps": 8}
    assert where_is(ws, "big.jsonl") == ["failed"]


def test_a_daemon_that_does_not_answer_in_time_is_said_in_one_line_not_a_traceback(tmp_path, monkeypatch, capsys):
    from engine import cli
    from engine.cli import daemon as daemon_commands

    ws = make_workspace(tmp_path / "ws", SETTINGS)
    mute = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)  # takes connections, never answers: a daemon stuck
    mute.bind(str(ws.control_socket))
    mute.listen()
    monkeypatch.setattr(daemon_commands, "CONTROL_TIMEOUT", 0.5)
    try:
        code = cli.main(["checkpoint", "-w", str(ws.root)])
    finally:
        mute.close()
    err = capsys.readouterr().err
    assert code == 1 and len(err.splitlines()) == 1, err
    assert err.startswith(f"traind checkpoint: the daemon on {ws.root} gave no answer to 'checkpoint' within 0.5s; "
                          "it may still act on it")
