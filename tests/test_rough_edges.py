"""What a new user met on a first hour, each told the truth now: status with no daemon computed from the files,
offline changes in the event log, a refused rollback that leaves nothing behind and pre-rollback retention, the
exit code and summary of `daemon --once`, one start-up line for verified snapshots and one line per command."""

from __future__ import annotations

import json
import shutil

import pytest

from engine import models, restore, retention, snapshots
from workspaces import drop, events, make_workspace, run_cli, start_daemon, stop_daemon, text_lines, wait_for

FAST = {"jobs": {"warm_worker": False}, "inbox": {"settle_seconds": 0.5}, "disk": {"reserve": 0}}


def version(ws, tiny_model_dir, name: str) -> str:
    shutil.copytree(tiny_model_dir, ws.models / name)
    (ws.models / name / "traind-model.json").write_text(json.dumps({"job_id": name, "step": 1, "loss": 1.0}))
    return name


@pytest.fixture
def ws_with_snapshot(tmp_path, tiny_model_dir):
    """A workspace whose snapshot 'old' holds v1 while v2 is current, with no daemon."""
    ws = make_workspace(tmp_path / "ws", FAST)
    for name in ("v1", "v2"):
        version(ws, tiny_model_dir, name)
    models.set_current(ws, "local", "models/v1", "v1")
    assert run_cli("snapshot", "--name", "old", "-w", str(ws.root)).returncode == 0
    models.set_current(ws, "local", "models/v2", "v2")
    return ws


def test_status_without_a_daemon_is_computed_from_the_files_and_offline_changes_are_logged(ws_with_snapshot):
    ws = ws_with_snapshot
    stale = {"schema": 1, "daemon": {"state": "training", "pid": 4242, "worker_pid": 4243},
             "job": {"id": "00001-gone", "phase": "training", "step": 5, "eta_s": 30, "tokens_per_s": 900.0},
             "model": {"kind": "local", "path": "models/v9", "version": "v9"},
             "resources": {"worker_rss": 123_456_789, "memory": {"total": 1, "available": 1}, "gpu": {"mode": "cpu"}},
             "snapshots": {"count": 0}, "last_error": None}
    ws.status_path.write_text(json.dumps(stale))
    rolled = run_cli("rollback", "old", "-w", str(ws.root))
    assert rolled.returncode == 0, rolled.stderr
    doc = json.loads(run_cli("status", "--json", "-w", str(ws.root)).stdout)
    assert doc["daemon"]["state"] == "offline" and doc["daemon"]["last_state"] == "training"
    assert doc["daemon"]["worker_pid"] is None and doc["resources"]["worker_rss"] is None
    assert doc["model"]["version"] == models.current(ws)["version"] != "v9"
    assert doc["model"]["restored_from"] == "old"
    assert doc["job"] is None  # no file is active: the stale job is history
    assert doc["snapshots"]["count"] == 2 and doc["snapshots"]["current_from"] == "old"
    text = run_cli("status", "-w", str(ws.root)).stdout
    assert "worker RSS" not in text and "v9" not in text
    logged = [(e["kind"], e.get("offline")) for e in events(ws)]
    assert ("snapshot", True) in logged and ("rolled_back_model", True) in logged
    assert any("rolled back to old" in e["message"] for e in events(ws))


def test_a_refused_rollback_leaves_no_pre_rollback_snapshot(ws_with_snapshot):
    ws = ws_with_snapshot
    weights = ws.snapshots / "old" / "model.safetensors"
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    refused = run_cli("rollback", "old", "-w", str(ws.root))
    assert refused.returncode == 1 and "failed verification" in refused.stderr
    missing = run_cli("rollback", "nonesuch", "-w", str(ws.root))
    assert missing.returncode == 1
    assert [s.name for s in snapshots.list_snapshots(ws)] == ["old"]
    assert models.current(ws)["version"] == "v2" and not restore.journal_path(ws).exists()


def test_only_the_newest_ten_pre_rollback_snapshots_are_kept(ws_with_snapshot):
    ws = ws_with_snapshot
    made = [snapshots.create(ws, "pre-rollback", reserve=0).name for _ in range(12)]
    assert len(set(made)) == 12
    assert retention.PRE_ROLLBACK_KEPT == 10
    assert restore.prune_pre_rollback(ws) == made[:2]
    left = sorted(s.name for s in snapshots.list_snapshots(ws) if s.kind == "pre-rollback")
    assert left == sorted(made[2:]) and "old" in {s.name for s in snapshots.list_snapshots(ws)}


def test_daemon_once_exits_1_with_a_summary_when_files_failed_or_were_rejected(tmp_path):
    ws = make_workspace(tmp_path / "ws", FAST)
    drop(ws, "good.jsonl", text_lines(5), age=30)
    drop(ws, "bad.jsonl", b'{"text": "fine"}\n{"oops": 1}\n', age=20)
    proc = start_daemon(ws, "--once", hooks={"fake": {"steps": 3}})
    assert proc.wait(60) == 1
    log = (ws.root / "daemon.log").read_text()
    assert "traind daemon --once: 2 files: 1 done, 1 rejected (reasons beside the files in queue/rejected/)" in log
    drop(ws, "fine.jsonl", text_lines(5))
    proc = start_daemon(ws, "--once", hooks={"fake": {"steps": 3}})
    assert proc.wait(60) == 0
    assert "traind daemon --once: 1 file: 1 done\n" in (ws.root / "daemon.log").read_text()


def test_start_logs_one_line_for_verified_snapshots_and_a_command_once(ws_with_snapshot):
    ws = ws_with_snapshot
    assert run_cli("snapshot", "--name", "second", "-w", str(ws.root)).returncode == 0
    before = len(events(ws))
    proc = start_daemon(ws)
    try:
        wait_for(lambda: any(e["kind"] == "snapshots_verified" for e in events(ws)), what="verification at start")
        taken = run_cli("snapshot", "--name", "third", "-w", str(ws.root))
        assert taken.returncode == 0, taken.stderr
        paused = run_cli("pause", "-w", str(ws.root))
        assert paused.returncode == 1
    finally:
        assert stop_daemon(proc) == 0
    new = events(ws)[before:]
    kinds = [e["kind"] for e in new]
    summary = [e for e in new if e["kind"] == "snapshots_verified"]
    assert len(summary) == 1 and summary[0]["message"].startswith("snapshots verified at start: 2 ok")
    assert [e["name"] for e in new if e["kind"] == "snapshot_verified"] == ["third"]  # not one per old snapshot
    assert sum("third" in e["message"] for e in new) == 2  # taken, verified: no echo of the command
    assert kinds.count("command") == 1 and "pause" in next(e for e in new if e["kind"] == "command")["message"]
