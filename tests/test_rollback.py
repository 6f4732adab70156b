"""Snapshots and rollback through the daemon and the CLI: verify, refuse the corrupt, survive kill -9."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from safetensors.numpy import load_file, save_file

from engine.core import hashing
from engine.store import models, snapshots
from workspaces import ROOT, daemon_env, make_workspace, run_cli, start_daemon, stop_daemon, wait_for

SETTINGS = {"jobs": {"warm_worker": False}, "inbox": {"settle_seconds": 0.5}, "disk": {"reserve": 0}}


def version_from(ws, tiny_model_dir, name: str, scale: float) -> str:
    """A model version under models/: the tiny model with its weights scaled (so versions differ)."""
    target = ws.models / name
    shutil.copytree(tiny_model_dir, target)
    weights = target / "model.safetensors"
    tensors = {k: (v * scale).astype(v.dtype) for k, v in load_file(str(weights)).items()}
    weights.unlink()
    save_file(tensors, str(weights))
    (target / "traind-model.json").write_text(json.dumps({"job_id": name, "step": 1, "loss": 1.0}))
    return name


def files_hash(folder) -> dict[str, str]:
    return {p.name: hashing.hash_file(p, "blake3") for p in sorted(folder.iterdir())
            if p.is_file() and p.name != "traind-model.json"}


def state(ws) -> str | None:
    return json.loads(ws.status_path.read_text())["daemon"]["state"] if ws.status_path.exists() else None


def current_dir(ws):
    return ws.root / models.current(ws)["path"]


@pytest.fixture
def two_versions(tmp_path, tiny_model_dir):
    """A workspace whose snapshot 'old' holds version v1, while v2 is current."""
    ws = make_workspace(tmp_path / "ws", SETTINGS)
    for name, scale in (("v1", 1.0), ("v2", 0.5)):
        version_from(ws, tiny_model_dir, name, scale)
    models.set_current(ws, "local", "models/v1", "v1")
    assert run_cli("snapshot", "--name", "old", "-w", str(ws.root)).returncode == 0
    models.set_current(ws, "local", "models/v2", "v2")
    return ws


def test_rollback_restores_the_bytes_and_can_itself_be_undone(two_versions):
    ws = two_versions
    old, newer = files_hash(ws.models / "v1"), files_hash(ws.models / "v2")
    proc = start_daemon(ws)
    try:
        wait_for(lambda: state(ws) == "idle", what="idle")
        back = run_cli("rollback", "old", "-w", str(ws.root))
        assert back.returncode == 0, back.stderr
        assert files_hash(current_dir(ws)) == old
        assert models.current(ws)["restored_from"] == "old"
        pre = [s for s in snapshots.list_snapshots(ws) if s.kind == "pre-rollback"]
        assert len(pre) == 1 and pre[0].state == "ok"
        again = run_cli("rollback", pre[0].name, "-w", str(ws.root))
        assert again.returncode == 0, again.stderr
        assert files_hash(current_dir(ws)) == newer
        listing = run_cli("snapshots", "--json", "-w", str(ws.root))
        names = {s["name"]: s for s in json.loads(listing.stdout)["snapshots"]}
        assert {"old", pre[0].name} <= set(names) and all(s["verification"]["state"] == "ok" for s in names.values())
        removed = run_cli("snapshot", "--remove", pre[0].name, "-w", str(ws.root))
        assert removed.returncode == 1 and "restored from this snapshot" in removed.stderr
    finally:
        assert stop_daemon(proc) == 0


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_a_damaged_snapshot_fails_verification_and_is_never_restored(two_versions, damage):
    ws = two_versions
    weights = ws.snapshots / "old" / "model.safetensors"
    weights.chmod(0o644)
    data = bytearray(weights.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0x01
    else:
        del data[len(data) - 100:]
    weights.write_bytes(bytes(data))
    verify = run_cli("verify", "old", "-w", str(ws.root))
    assert verify.returncode == 1 and "model.safetensors" in verify.stderr
    refused = run_cli("rollback", "old", "-w", str(ws.root))
    assert refused.returncode == 1 and "failed verification" in refused.stderr
    assert models.current(ws)["version"] == "v2"
    assert json.loads(run_cli("snapshots", "--json", "-w", str(ws.root)).stdout)["snapshots"][0]["verification"]["state"] == "corrupt"


@pytest.mark.parametrize("point", ["rollback_started", "rollback_pre_snapshot", "rollback_verified",
                                   "rollback_restored", "rollback_switched"])
def test_kill_9_anywhere_in_a_rollback_leaves_the_old_or_the_new_model(two_versions, point):
    ws = two_versions
    old, newer = files_hash(ws.models / "v1"), files_hash(ws.models / "v2")
    proc = start_daemon(ws, hooks={"daemon": {"pause_at": point}})
    paused = ws.state / "test-paused.json"
    try:
        wait_for(lambda: state(ws) == "idle", what="idle")
        client = subprocess.Popen([sys.executable, "-m", "engine.cli", "rollback", "old", "-w", str(ws.root)],
                                  env=daemon_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        wait_for(paused.exists, what=f"the daemon to reach {point}")
        proc.kill()
        proc.wait()
        assert client.wait(30) == 1  # told the daemon went away; it does not redo the rollback itself
        assert b"went away before answering" in client.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
    paused.unlink()
    proc = start_daemon(ws)
    try:
        wait_for(lambda: state(ws) == "idle", what="recovery")
        now = files_hash(current_dir(ws))
        assert now in (old, newer)
        assert now == (old if point == "rollback_switched" else newer)
        assert not (ws.state / "rollback.json").exists()
        assert run_cli("verify", "-w", str(ws.root)).returncode == 0  # every snapshot left behind verifies
    finally:
        assert stop_daemon(proc) == 0


@pytest.mark.e2e
def test_rollback_during_training_restarts_the_active_file_on_the_restored_model(two_versions):
    from engine.data import demo_data

    ws = two_versions
    models.set_current(ws, "local", "models/v2", "v2")
    ws.config_path.write_text(ws.config_path.read_text().replace("warm_worker = false", "warm_worker = true")
                              .replace("every_steps = 200", "every_steps = 5")
                              .replace("max_seq_length = 1024", "max_seq_length = 64"))
    lines = b"".join(json.dumps(r).encode() + b"\n" for r in demo_data.demo_records(400, "text", seed=3))
    from workspaces import drop, files_in
    drop(ws, "data.jsonl", lines)
    proc = start_daemon(ws, fake=False, hooks={"step_sleep_seconds": 0.05})
    metrics = ws.run_dir("00001-data") / "metrics.jsonl"
    events = lambda kind: [e for e in map(json.loads, metrics.read_text().splitlines()) if e["event"] == kind] \
        if metrics.exists() else []
    try:
        wait_for(lambda: len(events("checkpoint")) >= 2, timeout=120, what="checkpoints")
        back = run_cli("rollback", "old", "-w", str(ws.root))
        assert back.returncode == 0, back.stderr
        assert "00001-data starts again from step 0" in back.stdout
        wait_for(lambda: len(events("job_start")) >= 2, timeout=120, what="the file to start again")
        assert events("job_start")[-1]["resumed_from_step"] == 0  # old-weight checkpoints are not resumed
        assert list(ws.run_dir("00001-data").glob("checkpoints-superseded-*/checkpoint-*"))
        record = json.loads((ws.run_dir("00001-data") / "job.json").read_text())
        assert record["attempts"][-1]["model_in"].endswith(models.current(ws)["path"])
        wait_for(lambda: files_in(ws, "done") == ["00001-data.jsonl"], timeout=180, what="the file to finish")
    finally:
        assert stop_daemon(proc) == 0
