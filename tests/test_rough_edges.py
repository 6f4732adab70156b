"""What a new user met on a first hour, each told the truth now: status with no daemon computed from the files,
offline changes in the event log, a refused rollback that leaves nothing behind and pre-rollback retention, the
exit code and summary of `daemon --once`, one start-up line for verified snapshots and one line per command."""

from __future__ import annotations

import json
import shutil

import pytest

from engine.store import models, restore, retention, snapshots
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


def test_the_same_file_twice_is_refused_by_add_and_rejected_from_the_inbox_unless_asked_again(tmp_path):
    ws = make_workspace(tmp_path / "ws", FAST)
    data = tmp_path / "facts.jsonl"
    data.write_text("\n".join(text_lines(5)) + "\n")
    copy = tmp_path / "facts-copy.jsonl"
    copy.write_bytes(data.read_bytes())
    first = run_cli("add", str(data), str(copy), "-w", str(ws.root))
    assert first.returncode == 1 and "facts-copy.jsonl: the same content as inbox/facts.jsonl" in first.stderr
    assert start_daemon(ws, "--once", hooks={"fake": {"steps": 3}}).wait(60) == 0
    again = run_cli("add", str(data), "-w", str(ws.root))
    assert again.returncode == 1
    assert "the same content as job 00001-facts (facts.jsonl, done)" in again.stderr and "--again" in again.stderr
    assert sorted(p.name for p in ws.inbox.iterdir()) == []
    drop(ws, "facts-dropped.jsonl", data.read_bytes())  # straight into the inbox
    forced = run_cli("add", "--again", str(data), "-w", str(ws.root))
    assert forced.returncode == 0, forced.stderr
    assert start_daemon(ws, "--once", hooks={"fake": {"steps": 3}}).wait(60) == 1  # the dropped one is rejected
    records = {p.name: json.loads((p / "job.json").read_text()) for p in ws.runs.iterdir()}
    assert {k: r["state"] for k, r in records.items()} == {"00001-facts": "done", "00002-facts-dropped": "rejected",
                                                          "00003-facts": "done"}
    assert records["00003-facts"]["again"] is True
    assert "same content as job 00001-facts" in records["00002-facts-dropped"]["reason"]["reason"]
    assert (ws.queue("rejected") / "00002-facts-dropped.jsonl").read_bytes() == data.read_bytes()  # kept
    assert sorted(p.name for p in ws.inbox.iterdir()) == []  # the marker went with its file


def test_add_refuses_content_that_already_waits_in_the_inbox(tmp_path):
    ws = make_workspace(tmp_path / "ws", FAST)
    data = tmp_path / "facts.jsonl"
    data.write_text("\n".join(text_lines(5)) + "\n")
    assert run_cli("add", str(data), "-w", str(ws.root)).returncode == 0
    drop(ws, "dropped.jsonl", text_lines(4))  # renamed in by hand: it waits too
    (tmp_path / "dropped-copy.jsonl").write_bytes((ws.inbox / "dropped.jsonl").read_bytes())
    twice = run_cli("add", str(data), str(tmp_path / "dropped-copy.jsonl"), "-w", str(ws.root))  # no daemon ran yet
    assert twice.returncode == 1
    assert f"{data}: the same content as inbox/facts.jsonl, waiting to be trained: not added" in twice.stderr
    assert "dropped-copy.jsonl: the same content as inbox/dropped.jsonl, waiting to be trained" in twice.stderr
    assert sorted(p.name for p in ws.inbox.iterdir()) == ["dropped.jsonl", "facts.jsonl"]
    forced = run_cli("add", "--again", str(data), "-w", str(ws.root))
    assert forced.returncode == 0 and sorted(p.name for p in ws.inbox.iterdir()) == [
        ".facts-2.jsonl.again", "dropped.jsonl", "facts-2.jsonl", "facts.jsonl"]


def edit_config(ws, old: str, new: str) -> None:
    text = ws.config_path.read_text()
    assert old in text
    ws.config_path.write_text(text.replace(old, new, 1))


def edited_and_noticed(ws, old: str, new: str, kind: str) -> dict:
    """Edit traind.toml and wait for the daemon's event of `kind`; the file is saved again while none comes
    (the daemon watches it only once recovery is done)."""
    edit_config(ws, old, new)

    def noticed():
        found = [e for e in events(ws) if e["kind"] == kind]
        if not found:
            ws.config_path.write_text(ws.config_path.read_text())
        return found
    return wait_for(noticed, what=kind, interval=0.3)[0]


def test_a_rejected_config_edit_stops_only_the_commands_that_need_the_bad_key(tmp_path):
    ws = make_workspace(tmp_path / "ws", FAST)
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(text_lines(3)) + "\n")
    proc = start_daemon(ws)
    try:
        wait_for(lambda: any(e["kind"] == "daemon_started" for e in events(ws)), what="daemon start")
        edited_and_noticed(ws, "[training]\n", "[training]\nlearnin_rate = 1e-4\n", "config_invalid")
        for args in (("add", str(data)), ("validate", str(data)), ("snapshot", "--name", "s1"), ("status",)):
            result = run_cli(*args, "-w", str(ws.root))
            assert result.returncode == 0, (args, result.stderr)
        edit_config(ws, "[validation]\n", "[validation]\nmax_line_sise = 5\n")
        refused = run_cli("add", str(data), "-w", str(ws.root))
        assert refused.returncode == 2
        assert "unknown key 'validation.max_line_sise': did you mean 'max_line_size'?" in refused.stderr
    finally:
        assert stop_daemon(proc) == 0
    invalid = [e["message"] for e in events(ws) if e["kind"] == "config_invalid"]
    assert "did you mean 'learning_rate'?" in invalid[0]


def test_model_source_empty_gets_a_true_message_and_an_edit_after_init_is_answered(tmp_path):
    from engine.core.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match=r"model.source = '' is empty: expected a string"):
        from_dict({"model": {"source": ""}})
    with pytest.raises(ConfigError, match=r"unknown section or key 'trainig': did you mean 'training'\?"):
        from_dict({"trainig": {}})
    ws = make_workspace(tmp_path / "ws", FAST)
    proc = start_daemon(ws)
    try:
        wait_for(lambda: any(e["kind"] == "daemon_started" for e in events(ws)), what="daemon start")
        note = edited_and_noticed(ws, 'source = "tiny"', 'source = "Qwen/Qwen2.5-0.5B"', "config_no_effect")
    finally:
        assert stop_daemon(proc) == 0
    assert note["level"] == "warning" and "changes no model" in note["message"]
    assert "traind init DIR --model Qwen/Qwen2.5-0.5B" in note["message"] and "base-fake" in note["message"]


def test_init_with_a_missing_model_leaves_nothing_behind(tmp_path):
    result = run_cli("init", str(tmp_path / "ws"), "--model", str(tmp_path / "nonexistent"))
    assert result.returncode == 2 and "no such model directory" in result.stderr
    assert list(tmp_path.iterdir()) == []
    here = tmp_path / "existing"
    here.mkdir()
    (here / "notes.txt").write_text("mine")
    assert run_cli("init", str(here), "--model", str(tmp_path / "nonexistent")).returncode == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["existing"]
    assert [p.name for p in here.iterdir()] == ["notes.txt"]


def test_an_unknown_option_shows_the_commands_usage_and_restarts_read_well(tmp_path):
    bogus = run_cli("status", "--bogus")
    assert bogus.returncode == 2
    assert bogus.stderr.startswith("usage: traind status") and "unrecognized arguments: --bogus" in bogus.stderr
    assert restore.restarted_text(["00001-arith"]) == "; 00001-arith starts again from step 0 on it"
    assert restore.restarted_text(["00001-a", "00002-b"]) == "; 00001-a and 00002-b start again from step 0 on it"
    assert restore.restarted_text([]) == ""


def test_an_edit_of_model_source_made_with_no_daemon_is_answered_at_start(tmp_path, tiny_model_dir):
    ws_root = tmp_path / "ws"
    assert run_cli("init", str(ws_root), "--model", str(tiny_model_dir)).returncode == 0
    from engine.store.workspace import Workspace

    ws = Workspace.at(ws_root)
    assert json.loads(ws.init_record.read_text())["model_source"] == str(tiny_model_dir)
    edit_config(ws, f'source = "{tiny_model_dir}"', 'source = "gpt2"')
    proc = start_daemon(ws)
    try:
        note = wait_for(lambda: [e for e in events(ws) if e["kind"] == "config_no_effect"], what="the warning")[0]
    finally:
        assert stop_daemon(proc) == 0
    assert "model.source = 'gpt2' changes no model" in note["message"]


def test_a_workspace_too_deep_for_its_control_socket_is_refused_in_one_line(tmp_path):
    ws = make_workspace(tmp_path / ("d" * 120) / "ws", FAST)
    answer = run_cli("daemon", "--once", "-w", str(ws.root))
    assert answer.returncode == 2 and "Traceback" not in answer.stderr, answer.stderr
    assert answer.stderr.strip().endswith("a unix socket's path has at most 107: the daemon cannot listen there; "
                                          "move the workspace to a shorter path"), answer.stderr
    again = run_cli("daemon", "--once", "-w", str(ws.root))  # the lock was let go: the same answer, not "running"
    assert (again.returncode, again.stderr) == (answer.returncode, answer.stderr)
