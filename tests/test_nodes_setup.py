"""Several machines, before any training: the settings, `traind node`'s refusals, the head's preflight."""

from __future__ import annotations

import json
import time

import pytest

from engine.cluster import nodes
from engine.core.config import ConfigError, DistributedConfig, from_dict
from test_nodes import start_node, stop_node
from workspaces import make_workspace, run_cli, wait_for


def test_several_nodes_need_the_rendezvous_endpoint():
    with pytest.raises(ConfigError, match=r"traind.toml: distributed.nodes = 2 needs distributed.rdzv_endpoint"):
        from_dict({"distributed": {"nodes": 2}})
    with pytest.raises(ConfigError, match=r"distributed.rdzv_endpoint"):
        from_dict({"distributed": {"nodes": 2, "rdzv_endpoint": "head:port"}})
    assert from_dict({"distributed": {"nodes": 2, "rdzv_endpoint": "10.0.0.1:29400"}}).distributed.nodes == 2


def test_one_follower_per_name_and_a_name_it_can_file(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    bad = run_cli("node", "-w", str(ws.root), "--name", "../etc")
    assert bad.returncode == 2 and "--name '../etc'" in bad.stderr
    first = start_node(ws, "gpu-2")
    try:
        wait_for(lambda: nodes.node_path(ws, "gpu-2").exists(), what="the node's record")
        second = run_cli("node", "-w", str(ws.root), "--name", "gpu-2", timeout=60)
        assert second.returncode == 1
        assert f"another traind node 'gpu-2' (PID {first.pid}) is running on {ws.root}" in second.stderr
    finally:
        assert stop_node(first) == 0
    record = json.loads(nodes.node_path(ws, "gpu-2").read_text())
    assert record["state"] == "stopped" and record["workspace"] == str(ws.root.resolve())


def write_node(ws, name: str, workspace: str, beat_at: float, beat: int = 1) -> None:
    nodes.folder(ws).mkdir(parents=True, exist_ok=True)
    nodes.node_path(ws, name).write_text(json.dumps({
        "name": name, "host": name, "pid": 1, "beat": beat, "beat_at": beat_at, "state": "idle",
        "workspace": workspace}))


def test_the_head_waits_for_live_nodes_on_the_same_path(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    config = DistributedConfig(nodes=3, rdzv_endpoint="127.0.0.1:29400")
    head = nodes.Head(ws)
    here = str(ws.root.resolve())
    write_node(ws, "gpu-2", here, time.time())
    write_node(ws, "gpu-3", here, time.time() - 3600)  # a node that stopped beating an hour ago
    problem = head.problem(config)
    assert "waiting for 1 more node(s)" in problem and "ready: gpu-2" in problem, problem
    assert "waiting for 1 more" in head.problem(config)  # its beat has not moved since
    write_node(ws, "gpu-3", "/mnt/elsewhere/ws", time.time(), beat=2)  # it beats again, mounted elsewhere
    problem = head.problem(config)
    assert problem.startswith("nodes: the workspace must be at the same path on every machine"), problem
    assert "gpu-3 has it at /mnt/elsewhere/ws" in problem
    write_node(ws, "gpu-3", here, time.time(), beat=3)
    assert head.problem(config) is None
    args = head.begin(config, 8, "00001-data", 1)
    assert args[args.index("--node-rank") + 1] == "0" and args[args.index("--run-id") + 1] == "00001-data-1"
    rows = head.status(config)
    assert [(r["name"], r.get("ranks")) for r in rows[1:]] == [("gpu-2", [8, 15]), ("gpu-3", [16, 23])]
    head.end_record()
    assert json.loads(nodes.attempt_path(ws).read_text())["state"] == "ended"
    assert all("ranks" not in r for r in head.status(config))


def test_machines_that_never_meet_fail_the_attempt_saying_where_and_how_long(tmp_path):
    """The head's agent alone at the rendezvous: no rank runs, and the daemon hears why in rank 0's place."""
    import socket
    import subprocess
    import sys

    from test_nodes import free_port
    from workspaces import ROOT, daemon_env

    path = tmp_path / "worker.sock"
    endpoint = f"127.0.0.1:{free_port()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as server:
        server.bind(str(path))
        server.listen(1)
        server.settimeout(120)
        agent = subprocess.Popen([sys.executable, "-m", "engine.worker.launch", "--processes", "1", "--channel",
                                  str(path), "--nodes", "2", "--rdzv-endpoint", endpoint, "--run-id", "00001-a-1",
                                  "--join-timeout", "3", "--node-rank", "0"],
                                 env=daemon_env(fake=False), cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        conn, _ = server.accept()
        event = json.loads(conn.makefile().readline())
        conn.close()
    output = agent.communicate(timeout=60)[0]
    assert agent.returncode == 1
    assert event["event"] == "error"
    assert event["message"].startswith(f"the 2 machine(s) did not all join the rendezvous at {endpoint} within 3s")
    assert "traind-worker: the 2 machine(s) did not all join" in output
