"""The daemon on a real full disk: blocked, answering, and going on by itself once space returns.

A 40 MiB tmpfs holds the workspace; a filler file takes every free byte. The
daemon's own writes (the lock's PID, status.json, events, job records, metrics)
fail with ENOSPC for real. It must stay alive, say `blocked: disk full` on its
socket, keep what it could not write in memory, and when the filler goes,
write it all in order and train the file to the end.
"""

from __future__ import annotations

import json
import time

import pytest

from conftest import fill_disk
from engine.core import atomic
from engine.data import demo_data
from workspaces import (drop, events, make_workspace, run_cli, start_daemon, stop_daemon, text_lines, wait_for,
                        where_is)

SMALL = {"jobs": {"warm_worker": False, "stop_grace_seconds": 10.0}, "inbox": {"settle_seconds": 0.2},
         "disk": {"reserve": 0}}


def live_status(ws) -> dict:
    """What `traind status --json` prints (the daemon asked over its socket), read here: it is polled."""
    from engine.api import status as status_document

    return status_document.read(ws)


def blocked_on_full_disk(ws) -> dict | None:
    doc = live_status(ws)
    d = doc["daemon"]
    return doc if d.get("running") and d["state"] == "blocked" and "disk full" in (d.get("reason") or "") else None


def assert_state_files_whole(ws) -> None:
    for path in [ws.status_path, ws.current_model_pointer, *ws.runs.glob("*/job.json")]:
        json.loads(path.read_text())
    for log in [ws.events_path, *ws.runs.glob("*/metrics.jsonl")]:
        data = log.read_bytes()
        assert not data or data.endswith(b"\n"), f"{log} ends in half a line"
        [json.loads(line) for line in data.splitlines() if line]


def test_a_daemon_started_on_a_full_disk_waits_blocked_and_goes_on_when_space_returns(small_filesystem):
    ws = make_workspace(small_filesystem / "ws", SMALL)
    drop(ws, "early.jsonl", text_lines(5))
    filler = fill_disk(small_filesystem)
    proc = start_daemon(ws, hooks={"fake": {"steps": 10}})
    try:
        doc = wait_for(lambda: blocked_on_full_disk(ws), timeout=60, what="blocked: disk full")
        assert proc.poll() is None and doc["daemon"]["pid"] == proc.pid
        assert where_is(ws, "early.jsonl") == ["inbox"]  # nothing was taken while nothing could be recorded
        filler.unlink()
        wait_for(lambda: where_is(ws, "early.jsonl") == ["done"], timeout=60, what="the file trained")
        assert proc.poll() is None
    finally:
        assert stop_daemon(proc) == 0
    kinds = [e["kind"] for e in events(ws)]
    # What could not be written while the disk was full was written afterwards, in order.
    assert kinds.index("daemon_started") < kinds.index("unblocked") < kinds.index("job_done")
    assert_state_files_whole(ws)


def test_a_disk_that_fills_during_training_blocks_the_daemon_and_no_metric_is_lost(small_filesystem):
    ws = make_workspace(small_filesystem / "ws", SMALL)
    drop(ws, "long.jsonl", text_lines(5))
    proc = start_daemon(ws, hooks={"fake": {"steps": 100, "step_seconds": 0.1, "checkpoint_every": 1000}})
    try:
        metrics = ws.run_dir("00001-long") / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and metrics.read_bytes().count(b'"step"') >= 5, what="training")
        filler = fill_disk(small_filesystem)
        doc = wait_for(lambda: blocked_on_full_disk(ws), timeout=60, what="blocked: disk full")
        assert doc["job"]["id"] == "00001-long"  # the worker goes on; the daemon holds what it cannot write
        filler.unlink()
        wait_for(lambda: where_is(ws, "long.jsonl") == ["done"], timeout=60, what="the file trained")
        assert proc.poll() is None
    finally:
        assert stop_daemon(proc) == 0
    record = json.loads((ws.run_dir("00001-long") / "job.json").read_text())
    assert [a["outcome"] for a in record["attempts"]] == ["done"]  # one attempt: the worker never noticed
    steps = [e["step"] for e in atomic.read_json_lines(metrics) if e["event"] == "step"]
    assert steps == list(range(1, 101))  # every step, once, in order: nothing lost while the disk was full
    assert any(e["kind"] == "unblocked" and "writing works again" in e["message"] for e in events(ws))
    assert_state_files_whole(ws)


@pytest.mark.e2e
def test_the_real_worker_on_a_disk_that_fills_mid_job_waits_and_finishes_finite(small_filesystem, tiny_model_dir):
    from safetensors.numpy import load_file
    import numpy as np

    settings = {**SMALL, "training": {"max_seq_length": 64, "batch_size": 8, "seed": 5},
                "checkpoint": {"every_steps": 5, "keep": 2}}
    ws = make_workspace(small_filesystem / "ws", settings, model_dir=tiny_model_dir)
    lines = [json.dumps(r) for r in demo_data.demo_records(400, "text", seed=3)]
    drop(ws, "real.jsonl", lines)
    proc = start_daemon(ws, fake=False, hooks={"step_sleep_seconds": 0.15})
    try:
        ckpts = ws.run_dir("00001-real") / "checkpoints"
        wait_for(lambda: ckpts.exists() and any(ckpts.glob("*/traind-complete.json")), timeout=180, what="a checkpoint")
        filler = fill_disk(small_filesystem)
        wait_for(lambda: live_status(ws)["daemon"].get("state") == "blocked", timeout=120, what="blocked")
        assert proc.poll() is None
        filler.unlink()
        wait_for(lambda: where_is(ws, "real.jsonl") == ["done"], timeout=300, what="the file trained")
        assert proc.poll() is None
    finally:
        assert stop_daemon(proc) == 0
    weights = load_file(str(ws.models / "00001-real" / "model.safetensors"))
    assert weights and all(np.isfinite(t).all() for t in weights.values())
    kinds = [e["kind"] for e in events(ws)]
    assert "blocked" in kinds or "unblocked" in kinds
    assert_state_files_whole(ws)


def test_commands_answer_at_once_while_the_worker_waits_for_room_and_act_once_there_is_some(small_filesystem):
    ws = make_workspace(small_filesystem / "ws", SMALL)
    drop(ws, "long.jsonl", text_lines(5))
    proc = start_daemon(ws, hooks={"fake": {"steps": 2000, "step_seconds": 0.05, "checkpoint_every": 100000,
                                            "need_free_bytes": 2**20}})
    try:
        metrics = ws.run_dir("00001-long") / "metrics.jsonl"
        wait_for(lambda: metrics.exists() and metrics.read_bytes().count(b'"step"') >= 3, what="training")
        filler = fill_disk(small_filesystem)
        wait_for(lambda: blocked_on_full_disk(ws), timeout=60, what="blocked: disk full")
        answers = {}
        for cmd in ("checkpoint", "pause"):
            started = time.monotonic()
            result = run_cli(cmd, "-w", str(ws.root), timeout=30)
            answers[cmd] = (result.returncode, result.stdout + result.stderr, time.monotonic() - started)
        assert answers["checkpoint"][0] == 0 and answers["checkpoint"][2] < 10, answers
        assert answers["checkpoint"][1].startswith("blocked: disk: need 1048576 B free")
        assert "the checkpoint will be saved when writing works again" in answers["checkpoint"][1]
        assert answers["pause"][0] == 0 and answers["pause"][2] < 10, answers
        assert "pauses when writing works again" in answers["pause"][1]
        filler.unlink()
        wait_for(lambda: live_status(ws)["daemon"].get("state") == "paused", timeout=60, what="paused once there is room")
        saved = [e for e in atomic.read_json_lines(metrics) if e["event"] == "checkpoint"]
        assert len(saved) == 1 and (ws.run_dir("00001-long") / "checkpoints" / f"checkpoint-{saved[0]['step']}").is_dir()
    finally:
        assert stop_daemon(proc) == 0
    assert_state_files_whole(ws)
