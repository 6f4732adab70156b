"""The daemon's supervision, driven through a scripted fake worker (no torch, fast).

The real worker's end-to-end path is in test_end_to_end.py; here every outcome
of a worker (success, error exit, signal, hang on shutdown) and every kind of
bad input is played out against the real daemon, real inotify and real signals.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from engine.store import lock
from workspaces import (drop, events, files_in, make_workspace, reason, run_cli, start_daemon,
                        stop_daemon, text_lines, wait_for, where_is)

FAST = {"jobs": {"warm_worker": False, "stop_grace_seconds": 10.0}, "inbox": {"settle_seconds": 0.5}}


def fake_hooks(**script) -> dict:
    return {"fake": script}


def test_files_are_trained_in_arrival_order_and_the_model_pointer_moves(tmp_path):
    ws = make_workspace(tmp_path / "ws", FAST)
    drop(ws, "first.jsonl", text_lines(5), age=30)
    drop(ws, "second.jsonl", text_lines(5), age=20)
    proc = start_daemon(ws, "--once", hooks=fake_hooks(steps=10))
    assert proc.wait(60) == 0
    assert files_in(ws, "done") == ["00001-first.jsonl", "00002-second.jsonl"]
    current = json.loads(ws.current_model_pointer.read_text())
    assert current["version"] == "00002-second" and (ws.models / "00002-second" / "config.json").exists()
    metrics = [json.loads(line) for line in (ws.run_dir("00001-first") / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics if m["event"] == "step"] == list(range(1, 11))
    status = json.loads(ws.status_path.read_text())
    assert status["daemon"]["state"] == "offline" and status["queue"]["done"] == 2


def test_a_failing_worker_is_retried_then_the_file_fails_with_its_reason(tmp_path):
    ws = make_workspace(tmp_path / "ws", {**FAST, "jobs": {**FAST["jobs"], "max_attempts": 2}})
    drop(ws, "bad-run.jsonl", text_lines(5))
    drop(ws, "next.jsonl", text_lines(5))
    # It fails at step 3, before its first checkpoint (every 5 steps): no progress, so every failure counts.
    proc = start_daemon(ws, "--once", hooks=fake_hooks(steps=10, fail_after=3, exit_code=3, error="CUDA said no"))
    assert proc.wait(60) == 1  # files failed: --once says so
    # Both files fail the same script; each got exactly max_attempts attempts, and the queue went on.
    assert where_is(ws, "bad-run.jsonl") == ["failed"] and where_is(ws, "next.jsonl") == ["failed"]
    why = reason(ws, "failed", "bad-run.jsonl")
    assert why["exit_code"] == 3 and why["error"] == "CUDA said no"
    assert "2 failed attempt(s) in a row without progress" in why["reason"]
    assert "fake worker failing on purpose" in "\n".join(why["log_tail"])
    record = json.loads((ws.run_dir("00001-bad-run") / "job.json").read_text())
    assert [(a["outcome"], a["progress"]) for a in record["attempts"]] == [("failed", False), ("failed", False)]
    messages = [e["message"] for e in events(ws) if e["kind"] == "attempt_failed"]
    assert any("failure 1/2 in a row without progress" in m for m in messages)


def test_a_job_that_keeps_making_checkpoints_is_never_given_up(tmp_path):
    # Every attempt fails 3 steps after it resumed, but checkpoints every 2 steps first: each one makes
    # progress, so none counts against max_attempts (1) and the file is trained to the end.
    ws = make_workspace(tmp_path / "ws", {**FAST, "jobs": {**FAST["jobs"], "max_attempts": 1}})
    drop(ws, "stubborn.jsonl", text_lines(5))
    proc = start_daemon(ws, "--once", hooks=fake_hooks(steps=10, checkpoint_every=2, fail_after=3, exit_code=3))
    assert proc.wait(60) == 0
    assert where_is(ws, "stubborn.jsonl") == ["done"]
    record = json.loads((ws.run_dir("00001-stubborn") / "job.json").read_text())
    assert [(a["outcome"], a["progress"]) for a in record["attempts"]] == [("failed", True)] * 4 + [("done", True)]
    # Each attempt resumed from the previous one's newest checkpoint.
    starts = [line.split()[0] for line in (ws.run_dir("00001-stubborn") / "fake_attempts.log").read_text().splitlines()]
    assert starts == ["0", "2", "4", "6", "8"]
    assert any("it saved progress first, so it does not count" in e["message"] for e in events(ws))


def test_a_kill_from_outside_after_progress_is_an_interruption(tmp_path):
    # SIGKILL (an admin, a scheduler) at step 6, after the checkpoint at 5: interrupted, not failed.
    ws = make_workspace(tmp_path / "ws", {**FAST, "jobs": {**FAST["jobs"], "max_attempts": 1}})
    drop(ws, "killed.jsonl", text_lines(5))
    proc = start_daemon(ws, "--once", hooks=fake_hooks(steps=10, fail_after=6, kill_self="SIGKILL"))
    assert proc.wait(60) == 0
    assert where_is(ws, "killed.jsonl") == ["done"]
    record = json.loads((ws.run_dir("00001-killed") / "job.json").read_text())
    assert [a["outcome"] for a in record["attempts"]] == ["interrupted", "done"]
    assert record["attempts"][0]["signal"] == "SIGKILL"


def test_a_worker_killed_by_a_signal_is_reported_with_the_signal(tmp_path):
    ws = make_workspace(tmp_path / "ws", {**FAST, "jobs": {**FAST["jobs"], "max_attempts": 1}})
    drop(ws, "oom.jsonl", text_lines(5))
    proc = start_daemon(ws, "--once", hooks=fake_hooks(steps=10, fail_after=2, kill_self="SIGKILL"))
    assert proc.wait(60) == 1  # a file failed: --once exits 1
    why = reason(ws, "failed", "oom.jsonl")
    assert why["signal"] == "SIGKILL" and "killed by SIGKILL" in why["reason"]


def test_attempts_survive_a_daemon_restart(tmp_path):
    ws = make_workspace(tmp_path / "ws", {**FAST, "jobs": {**FAST["jobs"], "max_attempts": 2}})
    drop(ws, "flaky.jsonl", text_lines(5))
    # First daemon: one failed attempt, then it is killed while the second attempt runs.
    proc = start_daemon(ws, hooks=fake_hooks(steps=200, step_seconds=0.05, fail_after=3, exit_code=1))
    record = ws.run_dir("00001-flaky") / "job.json"
    wait_for(lambda: record.exists() and len(json.loads(record.read_text())["attempts"]) == 2, what="second attempt")
    proc.kill()
    proc.wait()
    proc = start_daemon(ws, "--once", hooks=fake_hooks(steps=10, fail_after=1, exit_code=1))
    assert proc.wait(60) == 1  # a file failed: --once exits 1
    outcomes = [a.get("outcome") for a in json.loads(record.read_text())["attempts"]]
    # The attempt cut short by the daemon's death does not count; two real failures do.
    assert outcomes.count("failed") == 2 and where_is(ws, "flaky.jsonl") == ["failed"]


def test_bad_inputs_are_rejected_with_reasons_and_good_ones_train(tmp_path):
    ws = make_workspace(tmp_path / "ws", {**FAST, "validation": {"max_line_size": 200}})
    drop(ws, "good-1.jsonl", text_lines(3))
    drop(ws, "malformed.jsonl", b'{"text": "ok"}\n{"text": "unterminated\n')
    drop(ws, "schema.jsonl", b'{"prompt": "2+2="}\n')
    drop(ws, "empty.jsonl", b"")
    drop(ws, "latin1.jsonl", b'{"text": "caf\xe9"}\n')
    drop(ws, "long-line.jsonl", ('{"text": "' + "x" * 500 + '"}\n').encode())
    target = tmp_path / "outside.jsonl"
    target.write_text('{"text": "a secret elsewhere"}\n')
    os.symlink(target, ws.inbox / "link.jsonl")
    (ws.inbox / "partial.jsonl.part").write_text('{"text": "still being wr')
    drop(ws, "good-2.jsonl", text_lines(3))
    proc = start_daemon(ws, hooks=fake_hooks(steps=5))
    try:
        wait_for(lambda: len(files_in(ws, "done")) == 2 and len(files_in(ws, "rejected")) == 6, what="queue to drain")
        expectations = {"malformed.jsonl": "line 2", "schema.jsonl": "completion", "empty.jsonl": "file is empty",
                        "latin1.jsonl": "UTF-8", "long-line.jsonl": "200", "link.jsonl": "symbolic link"}
        for name, needle in expectations.items():
            assert needle.lower() in json.dumps(reason(ws, "rejected", name)).lower(), name
        assert target.read_text() == '{"text": "a secret elsewhere"}\n'  # the link's target was never touched
        assert files_in(ws, "inbox") == ["partial.jsonl.part"]  # left alone while still being written
        # Once renamed, the half-written file is complete and is taken.
        (ws.inbox / "partial.jsonl.part").write_text('{"text": "now complete"}\n')
        os.rename(ws.inbox / "partial.jsonl.part", ws.inbox / "partial.jsonl")
        wait_for(lambda: where_is(ws, "partial.jsonl") == ["done"], what="the renamed file to train")
        assert proc.poll() is None
    finally:
        assert stop_daemon(proc) == 0


def test_a_second_daemon_is_refused_and_a_killed_ones_lock_is_not_stale(tmp_path):
    ws = make_workspace(tmp_path / "ws", FAST)
    first = start_daemon(ws)
    try:
        wait_for(lambda: lock.holder(ws.lock_path) == first.pid, what="first daemon to hold the lock")
        second = run_cli("daemon", "-w", str(ws.root))
        assert second.returncode == 1
        assert f"another traind daemon (PID {first.pid}) is running on {ws.root}" in second.stderr
    finally:
        first.kill()
        first.wait()
    third = start_daemon(ws)
    try:
        wait_for(lambda: lock.holder(ws.lock_path) == third.pid, what="a new daemon after kill -9")
    finally:
        assert stop_daemon(third) == 0
    assert ws.lock_path.exists()


def test_a_stop_signal_the_moment_the_lock_is_taken_is_a_clean_shutdown(tmp_path):
    """SIGTERM as soon as the lock is held, before the daemon has written its PID: a shutdown, exit 0, never a
    death by the signal."""
    ws = make_workspace(tmp_path / "ws", FAST)
    for _ in range(3):
        proc = start_daemon(ws)
        wait_for(lambda: lock.holder(ws.lock_path) is not None, what="the lock taken", interval=0.0005)
        assert stop_daemon(proc) == 0
    assert [e["kind"] for e in events(ws)].count("daemon_stopped") == 3


def test_status_json_always_parses_while_training(tmp_path):
    ws = make_workspace(tmp_path / "ws", FAST)
    drop(ws, "long.jsonl", text_lines(5))
    proc = start_daemon(ws, hooks=fake_hooks(steps=100000, step_seconds=0.001, checkpoint_every=1000))
    try:
        wait_for(lambda: ws.status_path.exists() and json.loads(ws.status_path.read_text())["daemon"]["state"] == "training",
                 what="training")
        steps = []
        for _ in range(200):
            doc = json.loads(ws.status_path.read_text())  # raises on a torn or partial file
            steps.append(doc["job"]["step"])
            time.sleep(0.01)
        assert steps[-1] > steps[0]
    finally:
        assert stop_daemon(proc) == 0


def test_shutdown_lets_the_worker_checkpoint_and_the_next_daemon_resumes(tmp_path):
    ws = make_workspace(tmp_path / "ws", FAST)
    drop(ws, "job.jsonl", text_lines(5))
    proc = start_daemon(ws, hooks=fake_hooks(steps=400, step_seconds=0.01, checkpoint_every=1000))
    status = lambda: json.loads(ws.status_path.read_text()) if ws.status_path.exists() else {}
    wait_for(lambda: (status().get("job") or {}).get("step", 0) > 20, what="steps")
    assert stop_daemon(proc) == 0
    assert files_in(ws, "active") == ["00001-job.jsonl"]
    state = run_cli("status", "-w", str(ws.root), "--json")
    assert json.loads(state.stdout)["daemon"]["running"] is False
    proc = start_daemon(ws, "--once", hooks=fake_hooks(steps=400, checkpoint_every=1000))
    assert proc.wait(60) == 0
    starts = [int(line.split()[0]) for line in (ws.run_dir("00001-job") / "fake_attempts.log").read_text().splitlines()]
    assert starts[0] == 0 and starts[1] > 20  # resumed from the checkpoint written at shutdown
    assert files_in(ws, "done") == ["00001-job.jsonl"]


def test_a_worker_that_ignores_sigterm_is_killed_after_the_grace(tmp_path):
    ws = make_workspace(tmp_path / "ws", {**FAST, "jobs": {**FAST["jobs"], "stop_grace_seconds": 1.0}})
    drop(ws, "stuck.jsonl", text_lines(5))
    proc = start_daemon(ws, hooks=fake_hooks(steps=100000, step_seconds=0.01, checkpoint_every=1000, ignore_term=True))
    wait_for(lambda: ws.worker_record.exists() and json.loads(ws.status_path.read_text()).get("job"), what="job")
    worker_pid = json.loads(ws.worker_record.read_text())["pid"]
    started = time.monotonic()
    assert stop_daemon(proc) == 0
    assert time.monotonic() - started < 15
    with pytest.raises(ProcessLookupError):
        os.kill(worker_pid, 0)


def test_a_warm_worker_waits_while_idle_and_takes_the_next_file(tmp_path):
    ws = make_workspace(tmp_path / "ws", {**FAST, "jobs": {**FAST["jobs"], "warm_worker": True}})
    proc = start_daemon(ws, hooks=fake_hooks(steps=5))
    status = lambda: json.loads(ws.status_path.read_text()) if ws.status_path.exists() else {}
    try:
        wait_for(lambda: status().get("daemon", {}).get("warm_worker"), what="a warm worker")
        warm_pid = status()["daemon"]["worker_pid"]
        drop(ws, "one.jsonl", text_lines(3))
        wait_for(lambda: files_in(ws, "done") == ["00001-one.jsonl"], what="the job")
        log = (ws.run_dir("00001-one") / "worker.log").read_text()
        # The job ran in the worker that was waiting, and a new one is warming for the next file.
        assert f"fake worker for 00001-one (PID {warm_pid})" in log
        wait_for(lambda: status()["daemon"].get("warm_worker") and status()["daemon"]["worker_pid"] != warm_pid,
                 what="the next warm worker")
    finally:
        assert stop_daemon(proc) == 0


@pytest.mark.memory_limit(160 * 2**20)
def test_a_worker_taken_by_the_oom_killer_is_reported_as_such_and_retried(tmp_path, small_memory_cgroup):
    # The daemon and its workers share a 160 MiB cgroup; the worker asks for 400 MiB.
    ws = make_workspace(tmp_path / "ws", {**FAST, "jobs": {**FAST["jobs"], "max_attempts": 1, "max_oom_kills": 2}})
    drop(ws, "hungry.jsonl", text_lines(5))
    proc = start_daemon(ws, "--once", hooks=fake_hooks(steps=10, fail_after=2, allocate_mb=400, exit_code=0),
                        cgroup=small_memory_cgroup)
    assert proc.wait(120) == 1  # the daemon survived its OOM kills; the file failed, so --once exits 1
    record = json.loads((ws.run_dir("00001-hungry") / "job.json").read_text())
    # OOM kills have their own count (max_oom_kills 2), apart from max_attempts (1).
    assert [a["outcome"] for a in record["attempts"]] == ["oom_killed", "oom_killed"]
    assert all(a["signal"] == "SIGKILL" and a["exit"] == "killed by the OOM killer (SIGKILL)" for a in record["attempts"])
    why = reason(ws, "failed", "hungry.jsonl")
    assert "OOM killer" in why["reason"] and "ran out of memory" in why["error"]


def test_a_file_appended_to_while_training_is_failed_and_nothing_is_published(tmp_path):
    ws = make_workspace(tmp_path / "ws", FAST)
    drop(ws, "grows.jsonl", text_lines(5))
    before = ws.current_model_pointer.read_bytes()
    proc = start_daemon(ws, "--once", hooks=fake_hooks(steps=200, step_seconds=0.02))
    active = ws.queue("active") / "00001-grows.jsonl"
    wait_for(lambda: (ws.run_dir("00001-grows") / "metrics.jsonl").exists(), what="training")
    extra = b'{"text": "one more line"}\n'
    with open(active, "ab") as f:
        f.write(extra)
    assert proc.wait(60) == 1  # a file failed: --once exits 1
    why = reason(ws, "failed", "grows.jsonl")
    assert why["reason"] == f"changed while training: appended {len(extra)} bytes"
    assert (ws.queue("failed") / "00001-grows.jsonl").read_bytes().endswith(extra)  # kept as the user left it
    assert ws.current_model_pointer.read_bytes() == before and not (ws.models / "00001-grows").exists()
    assert any(e["kind"] == "file_changed" for e in events(ws))


def test_a_file_removed_while_training_is_failed_with_its_reason(tmp_path):
    ws = make_workspace(tmp_path / "ws", FAST)
    drop(ws, "gone.jsonl", text_lines(5))
    before = ws.current_model_pointer.read_bytes()
    proc = start_daemon(ws, "--once", hooks=fake_hooks(steps=200, step_seconds=0.02))
    wait_for(lambda: (ws.run_dir("00001-gone") / "metrics.jsonl").exists(), what="training")
    (ws.queue("active") / "00001-gone.jsonl").unlink()
    assert proc.wait(60) == 1  # a file failed: --once exits 1
    assert reason(ws, "failed", "gone.jsonl")["reason"] == "changed while training: removed"
    assert ws.current_model_pointer.read_bytes() == before
    assert any(e["kind"] == "file_changed" and "removed" in e["message"] for e in events(ws))


def test_a_burst_of_files_is_validated_ahead_of_training_and_trained_once_each_in_order(tmp_path):
    ws = make_workspace(tmp_path / "ws", FAST)
    names = [f"burst-{i:03d}.jsonl" for i in range(40)]  # bench/intake_burst.py measures bigger bursts
    for i, name in enumerate(names):
        drop(ws, name, text_lines(2, prefix=name) if i != 7 else ["not json"], age=200 - i)
    proc = start_daemon(ws, hooks=fake_hooks(steps=40, step_seconds=0.05))
    # Every file is claimed and validated while the first one still trains: the bad one rejected at once.
    wait_for(lambda: len(files_in(ws, "pending")) == 38, timeout=60, what="the burst validated")
    assert files_in(ws, "done") == [] and files_in(ws, "rejected") == ["00008-burst-007.jsonl"]
    proc.kill()  # kill -9 with 38 files pending and one active
    proc.wait()
    proc = start_daemon(ws, "--once", hooks=fake_hooks(steps=2))
    assert proc.wait(120) == 0
    done = files_in(ws, "done")
    assert done == [f"{i + 1:05d}-burst-{i:03d}.jsonl" for i in range(40) if i != 7]  # arrival order, each once
    for name in done:
        record = json.loads((ws.run_dir(name[:-6]) / "job.json").read_text())
        assert [a["outcome"] for a in record["attempts"]].count("done") == 1
