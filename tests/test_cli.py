"""The command line as a new user meets it: init, add, validate, status."""

from __future__ import annotations

import json
import tomllib

from engine.core.config import Config
from workspaces import run_cli

LAYOUT = ["inbox", "queue/active", "queue/done", "queue/failed", "queue/rejected", "runs", "models", "snapshots", "state"]


def test_init_tiny_creates_the_layout_config_and_an_offline_model(tmp_path):
    ws = tmp_path / "ws"
    result = run_cli("init", str(ws), "--model", "tiny", fake=False)
    assert result.returncode == 0, result.stderr
    for folder in LAYOUT:
        assert (ws / folder).is_dir(), folder
    assert (ws / "state" / "lock").exists()
    config = tomllib.loads((ws / "traind.toml").read_text())
    assert set(config) == set(Config().to_dict()) and config["model"]["source"] == "tiny"
    current = json.loads((ws / "models" / "current.json").read_text())
    model = ws / current["path"]
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (model / name).exists(), name
    assert "chat_template" in (model / "tokenizer_config.json").read_text() or (model / "chat_template.jinja").exists()

    again = run_cli("init", str(ws), fake=False)
    assert again.returncode == 1 and "already a traind workspace" in again.stderr


def test_init_with_a_model_directory_points_at_it_and_a_missing_one_is_refused(tmp_path, tiny_model_dir):
    ws = tmp_path / "ws"
    assert run_cli("init", str(ws), "--model", str(tiny_model_dir)).returncode == 0
    current = json.loads((ws / "models" / "current.json").read_text())
    assert current["path"] == str(tiny_model_dir)
    missing = run_cli("init", str(tmp_path / "other"), "--model", str(tmp_path / "nope"))
    assert missing.returncode == 2 and "no such model directory" in missing.stderr
    not_a_model = run_cli("init", str(tmp_path / "third"), "--model", str(tmp_path))
    assert not_a_model.returncode == 2 and "no config.json" in not_a_model.stderr


def test_add_validates_then_copies_into_the_inbox_and_status_counts_it(tmp_path, tiny_model_dir):
    ws = tmp_path / "ws"
    assert run_cli("init", str(ws), "--model", str(tiny_model_dir)).returncode == 0
    good = tmp_path / "good.jsonl"
    good.write_text('{"prompt": "1+1=", "completion": "2"}\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1="}\n')
    added = run_cli("add", str(good), str(bad), "-w", str(ws))
    assert added.returncode == 1
    assert "bad.jsonl:1:" in added.stdout + added.stderr
    assert sorted(p.name for p in (ws / "inbox").iterdir()) == ["good.jsonl"]
    assert good.exists() and bad.exists()  # sources are copied, never moved
    status = run_cli("status", "-w", str(ws))
    assert status.returncode == 0
    assert "daemon     not running" in status.stdout and "1 waiting" in status.stdout
    doc = json.loads(run_cli("status", "--json", "-w", str(ws)).stdout)
    assert doc["queue"]["inbox"] == 1 and doc["daemon"]["state"] == "offline"


def test_validate_exit_codes(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text('{"text": "hello"}\n')
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "hello"}\n{"text": NaN}\n')
    assert run_cli("validate", str(good)).returncode == 0
    invalid = run_cli("validate", str(bad))
    assert invalid.returncode == 1 and "bad.jsonl:2:" in invalid.stdout
    assert run_cli("validate", str(tmp_path / "missing.jsonl")).returncode == 2
    doc = json.loads(run_cli("validate", "--json", str(bad)).stdout)
    assert doc["files"][0]["errors"][0]["line"] == 2


def test_commands_outside_a_workspace_say_how_to_make_one(tmp_path):
    result = run_cli("status", "-w", str(tmp_path))
    assert result.returncode == 2 and "traind init" in result.stderr


def test_status_with_no_daemon_shows_the_disk_reserve_traind_toml_sets(tmp_path):
    from engine.api import status
    from engine.core import atomic
    from workspaces import make_workspace

    ws = make_workspace(tmp_path / "ws", {"disk": {"reserve": 2**30}})
    # The last daemon ran with no reserve; traind.toml has been edited since: a daemon started now keeps 1 GiB.
    atomic.write_json_atomic(ws.status_path, {"schema": 1, "daemon": {"state": "idle"},
                                              "resources": {"disk": {"reserve": 0}}})
    shown = run_cli("status", "-w", str(ws.root))
    assert shown.returncode == 0 and "(reserve 1.0 GiB)" in shown.stdout, shown.stdout
    assert json.loads(run_cli("status", "--json", "-w", str(ws.root)).stdout)["resources"]["disk"]["reserve"] == 2**30
    (ws.status_path).unlink()  # a workspace no daemon has run in yet
    assert status.read(ws, ask=False)["resources"]["disk"]["reserve"] == 2**30  # what the UI shows with --no-start
