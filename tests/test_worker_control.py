"""Control of a running worker over stdin, and the disk preflight, as the daemon drives them.

Real tiny model on the CPU (see test_worker.py): pause/resume, checkpoint now,
stop, EOF on stdin, and a checkpoint refused while the disk reserve cannot be met.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import time
from pathlib import Path

import pytest

from engine.core import protocol
from engine.store import checkpoints
from engine.worker.control import Commands, StopControl
from worker_runs import losses, make_spec, of, run_worker

pytestmark = pytest.mark.e2e


def send(proc, cmd: str, **fields) -> float:
    """A control line on the worker's stdin; returns when it was sent (wall clock, like event times)."""
    proc.stdin.write((json.dumps({"cmd": cmd, **fields}) + "\n").encode())
    proc.stdin.flush()
    return time.time()


def log_tail(spec) -> str:
    return Path(spec.log_path).read_text()[-3000:]


def test_pause_holds_between_steps_and_resume_continues_the_same_run(tmp_path, tiny_model_dir, text_data,
                                                                       text_reference):
    spec = make_spec(tmp_path, tiny_model_dir, "text", text_data, "pause", step_sleep_seconds=0.1)
    marks: dict[str, float] = {}

    def drive(proc, event):
        if event["event"] == "step" and event["step"] == 6:
            marks["pause"] = send(proc, "pause")
        elif event["event"] == "paused":
            time.sleep(1.0)  # steps emitted meanwhile would queue in the pipe, stamped inside the pause
            marks["resume"] = send(proc, "resume")

    rc, events = run_worker(spec, drive)
    assert rc == protocol.EXIT_DONE, log_tail(spec)
    [paused], [resumed] = of(events, "paused"), of(events, "resumed")
    steps = of(events, "step")
    step_time = statistics.median(b["time"] - a["time"] for a, b in zip(steps, steps[1:]))
    assert paused["time"] - marks["pause"] <= step_time + 0.5, "paused within one step + 0.5 s"
    assert paused["step"] in (6, 7) and resumed["step"] == paused["step"]
    held = [e["step"] for e in steps if paused["time"] <= e["time"] <= marks["resume"]]
    assert held == [], f"steps advanced while paused: {held}"
    after = [e for e in steps if e["time"] > marks["resume"]]
    assert after[0]["step"] == paused["step"] + 1
    assert after[0]["time"] - marks["resume"] < step_time + 0.5

    reference = losses(text_reference[2])
    assert sorted(losses(events)) == sorted(reference)
    for step, loss in losses(events).items():  # pausing changes nothing about the training
        assert loss == pytest.approx(reference[step], abs=1e-6), f"step {step}"


def test_checkpoint_command_saves_off_the_grid_and_training_goes_on(tmp_path, tiny_model_dir, text_data):
    spec = make_spec(tmp_path, tiny_model_dir, "text", text_data, "ckpt", step_sleep_seconds=0.05,
                     checkpoint=dict(every_steps=10, keep=10))

    def drive(proc, event):
        if event["event"] == "step" and event["step"] == 13:
            proc.stdin.write(b"this is not json\n" + json.dumps({"cmd": "dance"}).encode() + b"\n")  # ignored
            send(proc, "checkpoint")

    rc, events = run_worker(spec, drive)
    assert rc == protocol.EXIT_DONE, log_tail(spec)
    off_grid = [e["step"] for e in of(events, "checkpoint") if e["step"] % 10 and e["step"] != events[-1]["step"]]
    assert len(off_grid) == 1 and 13 < off_grid[0] <= 16, off_grid
    assert checkpoints.is_complete(off_grid[0], checkpoints.checkpoint_path(spec.run_dir, off_grid[0]))
    assert max(e["step"] for e in of(events, "step")) == of(events, "job_start")[0]["total_steps"]
    log = Path(spec.log_path).read_text()
    assert "ignored a line that is not JSON" in log and "ignored an unknown request" in log


def test_stop_command_checkpoints_and_exits_interrupted(tmp_path, tiny_model_dir, text_data):
    spec = make_spec(tmp_path, tiny_model_dir, "text", text_data, "stop", step_sleep_seconds=0.05)

    def drive(proc, event):
        if event["event"] == "step" and event["step"] == 5:
            send(proc, "stop")

    rc, events = run_worker(spec, drive)
    assert rc == protocol.EXIT_INTERRUPTED, log_tail(spec)
    end = events[-1]
    assert end["event"] == "job_end" and end["outcome"] == "interrupted" and 5 <= end["step"] < 10
    assert checkpoints.newest_complete(spec.run_dir)[0] == end["step"]
    assert of(events, "checkpoint")[-1]["step"] == end["step"]


def test_checkpoint_and_stop_while_paused(tmp_path, tiny_model_dir, text_data):
    spec = make_spec(tmp_path, tiny_model_dir, "text", text_data, "paused-stop", step_sleep_seconds=0.05)
    seen: dict[str, float] = {}

    def drive(proc, event):
        if event["event"] == "step" and event["step"] == 4:
            send(proc, "pause")
        elif event["event"] == "paused":
            send(proc, "checkpoint")
        elif event["event"] == "checkpoint" and "stop" not in seen:
            time.sleep(0.5)
            seen["stop"] = send(proc, "stop")

    rc, events = run_worker(spec, drive)
    assert rc == protocol.EXIT_INTERRUPTED, log_tail(spec)
    [paused] = of(events, "paused")
    assert [e["step"] for e in of(events, "checkpoint")] == [paused["step"]]  # saved while paused, once
    assert of(events, "resumed") == []
    assert max(e["step"] for e in of(events, "step")) == paused["step"]  # never trained on
    assert events[-1]["event"] == "job_end" and events[-1]["step"] == paused["step"]
    assert checkpoints.newest_complete(spec.run_dir)[0] == paused["step"]


def test_stdin_closed_means_the_daemon_is_gone_and_stops_the_job(tmp_path, tiny_model_dir, text_data):
    spec = make_spec(tmp_path, tiny_model_dir, "text", text_data, "eof", step_sleep_seconds=0.05)

    def drive(proc, event):
        if event["event"] == "step" and event["step"] == 3:
            proc.stdin.close()

    rc, events = run_worker(spec, drive)
    assert rc == protocol.EXIT_INTERRUPTED, log_tail(spec)
    assert events[-1]["event"] == "job_end" and events[-1]["outcome"] == "interrupted"
    assert checkpoints.newest_complete(spec.run_dir)[0] == events[-1]["step"]


def test_commands_are_parsed_strictly():
    commands = Commands(StopControl(), disk_reserve=5)
    assert commands.handle("not json") is None and commands.handle('{"cmd": "dance"}') is None
    assert commands.handle('["pause"]') is None and commands.handle('{"cmd": "set_disk_reserve"}') is None
    assert commands.handle('{"cmd": "set_disk_reserve", "bytes": -1}') is None and commands.disk_reserve == 5
    assert commands.handle('{"cmd": "pause"}') == "pause" and commands.pause
    assert commands.handle('{"cmd": "resume"}') == "resume" and not commands.pause
    assert commands.handle('{"cmd": "checkpoint"}') and commands.take_checkpoint() and not commands.take_checkpoint()
    assert commands.handle('{"cmd": "set_disk_reserve", "bytes": 0}') and commands.disk_reserve == 0
    assert commands.take_disk_reserve_change() and not commands.take_disk_reserve_change()
    assert not commands.stop.requested
    commands.handle('{"cmd": "stop"}')
    assert commands.stop.requested


# --- disk preflight ---------------------------------------------------------------------------------


def impossible_reserve(path: str) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize + 2**40  # a TiB more than is free: no checkpoint can fit


def test_a_checkpoint_that_cannot_fit_blocks_until_the_reserve_allows_it(tmp_path, tiny_model_dir, text_data):
    spec = make_spec(tmp_path, tiny_model_dir, "text", text_data, "disk")
    spec = dataclasses.replace(spec, disk_reserve=impossible_reserve(spec.run_dir))
    ckpts = checkpoints.checkpoints_dir(spec.run_dir)
    seen: dict[str, object] = {}

    def drive(proc, event):
        if event["event"] == "blocked":
            time.sleep(0.5)
            seen["while_blocked"] = sorted(os.listdir(ckpts))
            seen["sent"] = send(proc, "set_disk_reserve", bytes=0)

    rc, events = run_worker(spec, drive)
    assert rc == protocol.EXIT_DONE, log_tail(spec)
    kinds = [e["event"] for e in events if e["event"] != "step"]
    assert kinds[:5] == ["ready", "job_start", "blocked", "unblocked", "checkpoint"], kinds
    [blocked] = of(events, "blocked")
    assert blocked["reason"].startswith("disk: need ") and " free on " in blocked["reason"]
    assert blocked["need_bytes"] > blocked["free_bytes"] and Path(blocked["path"]) == ckpts
    assert seen["while_blocked"] == [], "nothing written, not even an incomplete checkpoint"
    assert max(e["step"] for e in of(events, "step") if e["time"] < seen["sent"]) == 10  # held at the boundary
    assert of(events, "checkpoint")[0]["step"] == 10
    assert of(events, "unblocked")[0]["time"] - seen["sent"] < 1.0


def test_stop_while_blocked_exits_without_writing_a_checkpoint(tmp_path, tiny_model_dir, text_data):
    spec = make_spec(tmp_path, tiny_model_dir, "text", text_data, "disk-stop")
    spec = dataclasses.replace(spec, disk_reserve=impossible_reserve(spec.run_dir))

    def drive(proc, event):
        if event["event"] == "blocked":
            send(proc, "stop")

    rc, events = run_worker(spec, drive)
    assert rc == protocol.EXIT_INTERRUPTED, log_tail(spec)
    assert events[-1]["event"] == "job_end" and events[-1]["outcome"] == "interrupted" and events[-1]["step"] == 10
    assert of(events, "checkpoint") == [] and of(events, "unblocked") == []
    assert os.listdir(checkpoints.checkpoints_dir(spec.run_dir)) == []
