"""Several machines, played on this one: the head daemon and `traind node` followers on one workspace, the
real tiny model, gloo over 127.0.0.1, PyTorch's c10d rendezvous. Each "node" runs one process."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from engine.cluster import nodes
from engine.ops.worker_process import group_alive
from test_end_to_end_control import SETTINGS, all_finite, demo_lines, metrics, of_kind, status
from workspaces import ROOT, daemon_env, drop, files_in, make_workspace, run_cli, start_daemon, stop_daemon, wait_for

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machines(n: int) -> dict:
    return {**SETTINGS, "jobs": {**SETTINGS["jobs"], "max_attempts": 2},
            "distributed": {"nodes": n, "rdzv_endpoint": f"127.0.0.1:{free_port()}", "join_timeout": 120}}


def start_node(ws, name: str) -> subprocess.Popen:
    log = open(ws.root / f"{name}.out", "ab")
    return subprocess.Popen([sys.executable, "-m", "engine.cli", "node", "-w", str(ws.root), "--name", name],
                            env=daemon_env(fake=False), stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)


def stop_node(proc: subprocess.Popen) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    return proc.wait(60)


def node_record(ws, name: str) -> dict:
    path = nodes.node_path(ws, name)
    return json.loads(path.read_text()) if path.exists() else {}


def test_three_nodes_wait_for_each_other_train_one_model_and_roll_back_together(tmp_path, tiny_model_dir):
    ws = make_workspace(tmp_path / "ws", machines(3), model_dir=tiny_model_dir)
    drop(ws, "data.jsonl", demo_lines(800, seed=21))
    daemon = start_daemon(ws, fake=False, hooks={"inject_nonfinite": {"step": 12, "value": "nan"}})
    followers = []
    job = "00001-data"
    try:
        # No attempt starts until every other node is there: blocked, saying so and how.
        followers.append(start_node(ws, "node-b"))
        wait_for(lambda: "waiting for 1 more node(s)" in (status(ws)["daemon"].get("reason") or ""), timeout=120,
                 what="the head to wait for its last node")
        reason = status(ws)["daemon"]["reason"]
        assert "traind node -w" in reason and "ready: node-b" in reason and of_kind(ws, job, "job_start") == []
        followers.append(start_node(ws, "node-c"))
        seen = wait_for(lambda: [n for n in status(ws)["nodes"] or [] if n.get("ranks")] or None, timeout=120,
                        what="every node in the status with its ranks")
        assert [(n["name"], n["role"], n["ranks"]) for n in seen[1:]] == [("node-b", "node", [1, 1]),
                                                                          ("node-c", "node", [2, 2])]
        assert (seen[0]["role"], seen[0]["ranks"]) == ("head", [0, 0])
        text = run_cli("status", "-w", str(ws.root)).stdout
        assert "node-b" in text and "ranks 1-1" in text, text
        wait_for(lambda: files_in(ws, "done") == [f"{job}.jsonl"], timeout=300, what="the job to finish")
    finally:
        assert stop_daemon(daemon) == 0
        assert [stop_node(f) for f in followers] == [0] * len(followers)
    log = (ws.run_dir(job) / "worker.log").read_text()
    # The NaN at step 12 rolled every node back together: one anomaly, a second attempt from step 10.
    assert [(a["step"], a["kind"]) for a in of_kind(ws, job, "anomaly")] == [(12, "nan")], log[-3000:]
    starts = of_kind(ws, job, "job_start")
    assert len(starts) == 2 and starts[1]["rolled_back_from"] == 10
    assert log.count(f"job {job}") >= 6  # each node's rank took the spec, in each attempt
    steps = [e["step"] for e in metrics(ws, job) if e["event"] == "step" and e["time"] >= starts[1]["time"]]
    assert steps == sorted(set(steps)) and steps, "rank 0 alone reports, each step once"
    assert all_finite(ws.models / job / "model.safetensors")
    for name in ("node-b", "node-c"):
        record = node_record(ws, name)
        assert record["state"] == "stopped" and record["outcome"]["exit_code"] == 0  # its last run ended well


def test_a_node_killed_mid_job_fails_the_attempt_which_resumes_and_stop_start_crosses_nodes(tmp_path, tiny_model_dir):
    ws = make_workspace(tmp_path / "ws", machines(2), model_dir=tiny_model_dir)
    drop(ws, "data.jsonl", demo_lines(800, seed=22))
    job = "00001-data"
    follower = start_node(ws, "node-b")
    daemon = start_daemon(ws, fake=False, hooks={"step_sleep_seconds": 0.05})
    try:
        steps = lambda: [e["step"] for e in of_kind(ws, job, "step")]  # noqa: E731
        wait_for(lambda: of_kind(ws, job, "checkpoint") and len(steps()) >= 12, timeout=180,
                 what="training across two nodes past a checkpoint")
        agent = node_record(ws, "node-b")["agent_pid"]
        os.kill(agent, signal.SIGKILL)  # the other machine's elastic agent dies mid-job
        wait_for(lambda: len(of_kind(ws, job, "job_start")) == 2, timeout=120, what="the attempt after the node's")
        record = json.loads((ws.run_dir(job) / "job.json").read_text())
        first = record["attempts"][0]
        assert first["outcome"] in ("failed", "interrupted"), first
        if first["outcome"] == "failed":
            assert first["error"].startswith("node node-b failed (killed by SIGKILL)"), first
        assert not group_alive(agent)
        second = of_kind(ws, job, "job_start")[1]
        assert second["resumed_from_step"] >= 10  # from the checkpoint on the shared workspace

        # Stop checkpoints every rank on both nodes and ends both agents; start resumes on both.
        wait_for(lambda: len([s for s in steps() if s > second["resumed_from_step"]]) >= 3, timeout=120,
                 what="training again")
        assert run_cli("stop", "-w", str(ws.root), timeout=120).returncode == 0
        wait_for(lambda: node_record(ws, "node-b").get("state") == "idle"
                 and node_record(ws, "node-b")["outcome"]["exit_code"] == 75, timeout=120,
                 what="the node's agent to end with a checkpoint (exit 75)")
        wait_for(lambda: json.loads((ws.run_dir(job) / "job.json").read_text())["attempts"][-1].get("outcome")
                 == "stopped", timeout=60, what="the head to record the attempt as stopped")
        stopped_at = of_kind(ws, job, "checkpoint")[-1]["step"]
        assert run_cli("start", "-w", str(ws.root)).returncode == 0
        wait_for(lambda: files_in(ws, "done") == [f"{job}.jsonl"], timeout=300, what="the job to finish")
        assert of_kind(ws, job, "job_start")[-1]["resumed_from_step"] == stopped_at
    finally:
        assert stop_daemon(daemon) == 0
        assert stop_node(follower) == 0
    assert all_finite(ws.models / job / "model.safetensors")
