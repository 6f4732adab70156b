"""End to end with the real tiny model: the daemon, real workers, the HF Trainer, real kills."""

from __future__ import annotations

import json
import os
import signal

import pytest

from engine.data import demo_data
from engine.store import snapshots, verification
from engine.ops.worker_process import group_alive
from workspaces import (drop, events, files_in, make_workspace, run_cli, start_daemon, stop_daemon, wait_for,
                        where_is)

pytestmark = pytest.mark.e2e
# Two training processes repeat the one-process case under DDP: in `make chaos`, not `make test` (their
# own paths stay in make test: test_two_training_processes_report_once..., LoRA data parallel).
PROCESSES = [1, pytest.param(2, marks=pytest.mark.long)]

# Small and quick on two CPU cores: ~40 optimizer steps a second.
SETTINGS = {"training": {"max_seq_length": 64, "batch_size": 8, "learning_rate": 2e-3},
            "checkpoint": {"every_steps": 15, "keep": 2},
            "jobs": {"warm_worker": True, "stop_grace_seconds": 30.0},
            "inbox": {"settle_seconds": 0.5}}


def demo_lines(n: int, seed: int) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in demo_data.demo_records(n, "text", seed=seed))


def metrics(ws, job_id: str) -> list[dict]:
    path = ws.run_dir(job_id) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def steps(ws, job_id: str) -> list[dict]:
    return [e for e in metrics(ws, job_id) if e["event"] == "step"]


def starts(ws, job_id: str) -> list[dict]:
    return [e for e in metrics(ws, job_id) if e["event"] == "job_start"]


def checkpoint_steps(ws, job_id: str) -> list[int]:
    return [e["step"] for e in metrics(ws, job_id) if e["event"] == "checkpoint"]


def test_two_files_train_in_turn_and_the_model_learns(tmp_path, tiny_model_dir):
    ws = make_workspace(tmp_path / "ws", SETTINGS, model_dir=tiny_model_dir)
    drop(ws, "monday.jsonl", demo_lines(600, seed=1), age=30)
    drop(ws, "tuesday.jsonl", demo_lines(600, seed=2), age=20)
    result = run_cli("daemon", "--once", "-w", str(ws.root), fake=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert files_in(ws, "done") == ["00001-monday.jsonl", "00002-tuesday.jsonl"]
    first, second = steps(ws, "00001-monday"), steps(ws, "00002-tuesday")
    assert first and second and all(e["loss"] is not None for e in first + second)
    assert second[-1]["loss"] < first[0]["loss"] * 0.7
    # The second job started from the first job's model, and its own model is now current.
    current = json.loads(ws.current_model_pointer.read_text())
    assert current["version"] == "00002-tuesday"
    assert (ws.models / "00002-tuesday" / "model.safetensors").exists()
    second_record = json.loads((ws.run_dir("00002-tuesday") / "job.json").read_text())
    assert second_record["attempts"][0]["model_in"] == str(ws.models / "00001-monday")
    for e in first:
        assert {"step", "total_steps", "loss", "learning_rate", "grad_norm", "tokens_per_s", "epoch"} <= set(e)
    status = json.loads(run_cli("status", "--json", "-w", str(ws.root), fake=False).stdout)
    assert status["queue"]["done"] == 2 and status["daemon"]["running"] is False
    # The worker recorded every file's hash: a first snapshot of its model only links, hashing nothing.
    snap = snapshots.create(ws, "manual")
    placed = snap.manifest["placement"]
    assert placed["linked"] == len(snap.manifest["files"])
    assert placed["hashes_reused"] == len(snap.manifest["files"]) - 1  # all but the marker, which lists the rest
    assert verification.verify(ws, snap.name)["ok"]


def with_processes(processes: int) -> dict:
    return {**SETTINGS, "training": {**SETTINGS["training"], "processes": processes}}


@pytest.mark.parametrize("processes", PROCESSES, ids=["one-process", "two-processes"])
def test_a_worker_killed_mid_job_is_retried_from_its_checkpoint(tmp_path, tiny_model_dir, processes):
    ws = make_workspace(tmp_path / "ws", with_processes(processes), model_dir=tiny_model_dir)
    drop(ws, "data.jsonl", demo_lines(800 * processes, seed=3))
    proc = start_daemon(ws, fake=False, hooks={"step_sleep_seconds": 0.03})
    try:
        job = "00001-data"
        wait_for(lambda: len(checkpoint_steps(ws, job)) >= 2, timeout=120, what="two checkpoints")
        saved = max(checkpoint_steps(ws, job))
        worker = json.loads(ws.worker_record.read_text())
        os.killpg(worker["pgid"], signal.SIGKILL)
        wait_for(lambda: len(starts(ws, job)) == 2, timeout=120, what="the retry to start")
        resumed = starts(ws, job)[1]["resumed_from_step"]
        assert resumed >= saved > 0
        wait_for(lambda: files_in(ws, "done") == [f"{job}.jsonl"], timeout=180, what="the job to finish")
        record = json.loads((ws.run_dir(job) / "job.json").read_text())
        # Killed from outside after it had saved checkpoints: an interruption, not a failure.
        assert [a["outcome"] for a in record["attempts"]] == ["interrupted", "done"]
        assert record["attempts"][0]["signal"] == "SIGKILL" and record["attempts"][0]["progress"] is True
        # Steps after the resume continue the count; none before the checkpoint is trained twice.
        after = [e["step"] for e in steps(ws, job) if e["time"] > starts(ws, job)[1]["time"]]
        assert after[0] == resumed + 1
    finally:
        assert stop_daemon(proc) == 0


@pytest.mark.parametrize("processes", PROCESSES, ids=["one-process", "two-processes"])
def test_a_killed_daemons_worker_is_cleaned_up_and_the_job_resumes(tmp_path, tiny_model_dir, processes):
    ws = make_workspace(tmp_path / "ws", with_processes(processes), model_dir=tiny_model_dir)
    drop(ws, "data.jsonl", demo_lines(800 * processes, seed=4))
    drop(ws, "later.jsonl", demo_lines(100, seed=5))
    hooks = {"step_sleep_seconds": 0.03}
    proc = start_daemon(ws, fake=False, hooks=hooks)
    job = "00001-data"
    wait_for(lambda: len(checkpoint_steps(ws, job)) >= 1, timeout=120, what="a checkpoint")
    worker = json.loads(ws.worker_record.read_text())
    proc.kill()
    proc.wait()
    saved_before_kill = max(checkpoint_steps(ws, job))
    # Every input file is in exactly one place the moment the daemon dies.
    assert where_is(ws, "data.jsonl") == ["active"] and where_is(ws, "later.jsonl") == ["pending"]
    proc = start_daemon(ws, fake=False)
    try:
        wait_for(lambda: len(starts(ws, job)) == 2, timeout=120, what="the resumed attempt")
        assert not group_alive(worker["pgid"])  # the orphan went before the new worker started
        # From the newest checkpoint: the one before the kill, or one the orphan wrote on its way out.
        assert starts(ws, job)[1]["resumed_from_step"] >= saved_before_kill > 0
        wait_for(lambda: len(files_in(ws, "done")) == 2, timeout=240, what="both files to finish")
        assert where_is(ws, "data.jsonl") == ["done"] and where_is(ws, "later.jsonl") == ["done"]
        assert any(e["kind"] == "recovered" and "resuming from its checkpoint" in e["message"] for e in events(ws))
    finally:
        assert stop_daemon(proc) == 0
