"""Control and safety end to end: the daemon, the real worker and the tiny model, steered from the CLI."""

from __future__ import annotations

import json
import os
import time

import pytest
from safetensors.numpy import load_file

from engine.core import config
from engine.data import demo_data
from engine.core.config import render_template
from workspaces import drop, events, files_in, make_workspace, reason, run_cli, start_daemon, stop_daemon, wait_for, where_is

pytestmark = pytest.mark.e2e
# Two training processes repeat the one-process case under DDP: in `make chaos`, not `make test` (their
# own paths stay in make test: test_two_training_processes_report_once..., LoRA data parallel).
PROCESSES = [1, pytest.param(2, marks=pytest.mark.long)]

SETTINGS = {"training": {"max_seq_length": 64, "batch_size": 8, "learning_rate": 2e-3, "seed": 11},
            "checkpoint": {"every_steps": 10, "keep": 3},
            "jobs": {"warm_worker": True, "stop_grace_seconds": 30.0},
            "inbox": {"settle_seconds": 0.5}, "disk": {"reserve": 0}}


def demo_lines(n: int, seed: int) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in demo_data.demo_records(n, "text", seed=seed))


def metrics(ws, job_id: str) -> list[dict]:
    path = ws.run_dir(job_id) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def of_kind(ws, job_id: str, kind: str) -> list[dict]:
    return [e for e in metrics(ws, job_id) if e["event"] == kind]


def status(ws) -> dict:
    """What `traind status --json` prints (the daemon asked over its socket), read here: polled every 50 ms, a
    command's own python would cost a core."""
    from engine.api import status as status_document

    return json.loads(json.dumps(status_document.read(ws)))


def losses_by_step(ws, job_id: str) -> dict[int, float]:
    return {e["step"]: e["loss"] for e in of_kind(ws, job_id, "step")}


def all_finite(path) -> bool:
    import numpy as np

    return all(np.isfinite(t).all() for t in load_file(str(path)).values())


def test_pause_holds_the_step_and_resume_continues_the_same_curve(tmp_path, tiny_model_dir):
    data = demo_lines(400, seed=7)
    plain = make_workspace(tmp_path / "plain", SETTINGS, model_dir=tiny_model_dir)
    drop(plain, "data.jsonl", data)
    assert run_cli("daemon", "--once", "-w", str(plain.root), fake=False).returncode == 0
    expected = losses_by_step(plain, "00001-data")

    ws = make_workspace(tmp_path / "steered", SETTINGS, model_dir=tiny_model_dir)
    drop(ws, "data.jsonl", data)
    proc = start_daemon(ws, fake=False, hooks={"step_sleep_seconds": 0.05})
    try:
        wait_for(lambda: (status(ws)["job"] or {}).get("step", 0) >= 5, timeout=120, what="training")
        paused = run_cli("pause", "-w", str(ws.root))
        assert paused.returncode == 0, paused.stderr
        assert status(ws)["daemon"]["state"] == "paused"
        held = status(ws)["job"]["step"]
        time.sleep(1.0)
        assert status(ws)["job"]["step"] == held and len(of_kind(ws, "00001-data", "step")) == held
        assert run_cli("resume", "-w", str(ws.root)).returncode == 0
        wait_for(lambda: files_in(ws, "done") == ["00001-data.jsonl"], timeout=180, what="the job to finish")
    finally:
        assert stop_daemon(proc) == 0
    got = losses_by_step(ws, "00001-data")
    assert got.keys() == expected.keys()
    assert all(abs(got[s] - expected[s]) < 1e-6 for s in expected), "pausing changed the loss curve"


@pytest.mark.parametrize("processes", PROCESSES, ids=["one-process", "two-processes"])
def test_pause_resume_stop_and_start_from_the_stop_checkpoint(tmp_path, tiny_model_dir, processes):
    settings = {**SETTINGS, "training": {**SETTINGS["training"], "processes": processes}}
    ws = make_workspace(tmp_path / "ws", settings, model_dir=tiny_model_dir)
    drop(ws, "data.jsonl", demo_lines(600 * processes, seed=8))
    proc = start_daemon(ws, fake=False, hooks={"step_sleep_seconds": 0.03})
    job = "00001-data"
    try:
        wait_for(lambda: (status(ws)["job"] or {}).get("step", 0) >= 5, timeout=120, what="training")
        assert run_cli("pause", "-w", str(ws.root)).returncode == 0  # every rank holds on the same step
        held = status(ws)["job"]["step"]
        time.sleep(1.0)
        assert status(ws)["daemon"]["state"] == "paused" and status(ws)["job"]["step"] == held
        assert run_cli("resume", "-w", str(ws.root)).returncode == 0
        wait_for(lambda: (status(ws)["job"] or {}).get("step", 0) >= 13, timeout=120, what="training again")
        stopped = run_cli("stop", "-w", str(ws.root))
        assert stopped.returncode == 0, stopped.stderr
        stop_step = of_kind(ws, job, "job_end")[-1]["step"]
        assert stop_step in [c["step"] for c in of_kind(ws, job, "checkpoint")]  # checkpointed on the way out
        doc = status(ws)
        assert doc["daemon"]["state"] == "stopped" and doc["daemon"]["worker_pid"] is None
        assert of_kind(ws, job, "job_end")[-1]["outcome"] == "interrupted"  # every rank left with the stop's code
        assert run_cli("start", "-w", str(ws.root)).returncode == 0
        wait_for(lambda: len(of_kind(ws, job, "job_start")) == 2, timeout=120, what="the job to start again")
        assert of_kind(ws, job, "job_start")[1]["resumed_from_step"] == stop_step
        wait_for(lambda: files_in(ws, "done") == [f"{job}.jsonl"], timeout=180, what="the job to finish")
    finally:
        assert stop_daemon(proc) == 0


def test_a_nan_rolls_back_past_the_bad_batch_and_nothing_non_finite_is_saved(tmp_path, tiny_model_dir):
    ws = make_workspace(tmp_path / "ws", SETTINGS, model_dir=tiny_model_dir)
    drop(ws, "data.jsonl", demo_lines(400, seed=9))
    hooks = {"inject_nonfinite": {"step": 15, "value": "nan"}}
    assert run_cli("daemon", "--once", "-w", str(ws.root), fake=False, hooks=hooks).returncode == 0
    job = "00001-data"
    assert files_in(ws, "done") == [f"{job}.jsonl"]
    anomaly = of_kind(ws, job, "anomaly")
    assert [(a["step"], a["kind"]) for a in anomaly] == [(15, "nan")]
    restart = of_kind(ws, job, "job_start")[1]
    assert restart["rolled_back_from"] == 10 and restart["skipped"] == [11, 15]
    steps = [e["step"] for e in of_kind(ws, job, "step") if e["time"] > restart["time"]]
    assert steps[0] == 16
    assert all(e["loss"] is not None for e in of_kind(ws, job, "step"))
    assert any(e["kind"] == "rollback" and "step 15" in e["message"] for e in events(ws))
    assert all_finite(ws.models / job / "model.safetensors")


def test_a_nan_at_every_step_fails_the_file_after_three_rollbacks_and_keeps_the_model(tmp_path, tiny_model_dir):
    ws = make_workspace(tmp_path / "ws", SETTINGS, model_dir=tiny_model_dir)
    before = ws.current_model_pointer.read_bytes()
    drop(ws, "poison.jsonl", demo_lines(200, seed=10))
    hooks = {"inject_nonfinite": {"step": 1, "value": "inf", "every": True}}
    assert run_cli("daemon", "--once", "-w", str(ws.root), fake=False, hooks=hooks).returncode == 1  # failed
    assert where_is(ws, "poison.jsonl") == ["failed"]
    why = reason(ws, "failed", "poison.jsonl")
    assert "after 3 rollbacks" in why["reason"] and len(why["rollbacks"]) == 4
    assert ws.current_model_pointer.read_bytes() == before
    assert not list(ws.models.glob(".partial-*")) and not (ws.models / "00001-poison").exists()


def test_a_checkpoint_that_would_not_fit_blocks_until_the_reserve_is_lowered(tmp_path, tiny_model_dir):
    settings = {**SETTINGS, "checkpoint": {"every_steps": 25, "keep": 2}}
    ws = make_workspace(tmp_path / "ws", settings, model_dir=tiny_model_dir)
    drop(ws, "data.jsonl", demo_lines(600, seed=12))
    proc = start_daemon(ws, fake=False, hooks={"step_sleep_seconds": 0.05})
    job = "00001-data"
    try:
        wait_for(lambda: (status(ws)["job"] or {}).get("step", 0) >= 3, timeout=120, what="training")
        huge = {**settings, "disk": {"reserve": "1000 TiB"}}
        ws.config_path.write_text(render_template(config.from_dict(huge)))  # applies live
        wait_for(lambda: status(ws)["daemon"].get("state") == "blocked", timeout=60, what="blocked")
        doc = status(ws)
        assert doc["daemon"]["reason"].startswith("disk: need ") and str(ws.root) in doc["daemon"]["reason"]
        held = doc["job"]["step"]
        time.sleep(1.0)
        assert status(ws)["job"]["step"] == held == 25  # held before the step-25 save
        assert not (ws.run_dir(job) / "checkpoints" / "checkpoint-25").exists()  # not even a partial one
        for cmd in ("checkpoint", "pause"):  # the worker hears nothing until there is room: the daemon answers now
            started = time.monotonic()
            answer = run_cli(cmd, "-w", str(ws.root), timeout=30)
            assert answer.returncode == 0 and time.monotonic() - started < 10, (cmd, answer.stderr)
            assert answer.stdout.startswith("blocked: disk: need ") and "when writing works again" in answer.stdout
        ws.config_path.write_text(render_template(config.from_dict(settings)))
        wait_for(lambda: status(ws)["daemon"].get("state") == "paused", timeout=120, what="paused once there is room")
        paused_at = status(ws)["job"]["step"]
        assert run_cli("resume", "-w", str(ws.root)).returncode == 0
        wait_for(lambda: files_in(ws, "done") == [f"{job}.jsonl"], timeout=180, what="the job to finish")
    finally:
        assert stop_daemon(proc) == 0
    saved = [c["step"] for c in of_kind(ws, job, "checkpoint")]
    assert 25 in saved and any(25 < step <= paused_at for step in saved), (saved, paused_at)  # the one asked for
    kinds = [e["kind"] for e in events(ws)]
    assert "blocked" in kinds and "unblocked" in kinds


def test_a_job_that_cannot_fit_its_first_checkpoint_does_not_start(tmp_path, tiny_model_dir):
    ws = make_workspace(tmp_path / "ws", {**SETTINGS, "disk": {"reserve": "1000 TiB"}}, model_dir=tiny_model_dir)
    drop(ws, "data.jsonl", demo_lines(100, seed=13))
    proc = start_daemon(ws, fake=False)
    try:
        wait_for(lambda: status(ws)["daemon"].get("state") == "blocked", timeout=60, what="blocked")
        assert status(ws)["daemon"]["reason"].startswith("disk: need ")
        assert metrics(ws, "00001-data") == []  # no attempt began
        ws.config_path.write_text(render_template(config.from_dict(SETTINGS)))
        wait_for(lambda: files_in(ws, "done") == ["00001-data.jsonl"], timeout=120, what="the job to run")
    finally:
        assert stop_daemon(proc) == 0


def test_two_training_processes_report_once_and_keep_the_rollback_exit_code(tmp_path, tiny_model_dir):
    """`training.processes = 2`: two ranks (gloo on this CPU) under engine.worker.launch. One stream of
    events (rank 0's), the spec reached both, and a NaN's exit code 76 survives the launcher: the rollback
    happens and the file completes with a finite model."""
    settings = {**SETTINGS, "training": {**SETTINGS["training"], "processes": 2}}
    ws = make_workspace(tmp_path / "ws", settings, model_dir=tiny_model_dir)
    drop(ws, "data.jsonl", demo_lines(800, seed=9))
    hooks = {"inject_nonfinite": {"step": 12, "value": "nan"}}
    assert run_cli("daemon", "--once", "-w", str(ws.root), fake=False, hooks=hooks).returncode == 0
    job = "00001-data"
    assert files_in(ws, "done") == [f"{job}.jsonl"], (ws.run_dir(job) / "worker.log").read_text()[-3000:]
    assert [(a["step"], a["kind"]) for a in of_kind(ws, job, "anomaly")] == [(12, "nan")]
    starts = of_kind(ws, job, "job_start")
    assert len(starts) == 2 and starts[1]["rolled_back_from"] == 10
    for start, end in ((starts[0]["time"], starts[1]["time"]), (starts[1]["time"], float("inf"))):
        steps = [e["step"] for e in of_kind(ws, job, "step") if start <= e["time"] < end]
        assert steps == sorted(set(steps)) and steps, "one rank reports, each step once"
    log = (ws.run_dir(job) / "worker.log").read_text()
    assert log.count(f"job {job}") >= 4  # each rank took the spec, in each of the two attempts
    assert all_finite(ws.models / job / "model.safetensors")


def test_a_file_appended_to_while_the_real_worker_trains_is_failed_and_not_published(tmp_path, tiny_model_dir):
    ws = make_workspace(tmp_path / "ws", SETTINGS, model_dir=tiny_model_dir)
    ws.inbox.joinpath("grows.jsonl").write_bytes(demo_lines(400, seed=4))
    os.utime(ws.inbox / "grows.jsonl", (time.time() - 10, time.time() - 10))
    before = ws.current_model_pointer.read_bytes()
    proc = start_daemon(ws, fake=False, hooks={"step_sleep_seconds": 0.1})
    try:
        wait_for(lambda: len(of_kind(ws, "00001-grows", "step")) >= 3, timeout=120, what="training")
        with open(ws.queue("active") / "00001-grows.jsonl", "ab") as f:
            f.write(demo_lines(3, seed=5))
        wait_for(lambda: (ws.queue("failed") / "00001-grows.jsonl.reason.json").exists(), timeout=60, what="failed")
    finally:
        assert stop_daemon(proc) == 0
    why = json.loads((ws.queue("failed") / "00001-grows.jsonl.reason.json").read_text())
    assert why["reason"].startswith("changed while training: appended ") and why["reason"].endswith(" bytes")
    assert ws.current_model_pointer.read_bytes() == before and not (ws.models / "00001-grows").exists()
