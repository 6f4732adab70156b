"""The [adapter] config, base records and the adapter chain: what is refused, and what is hashed once."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from engine.core import config, hashing
from engine.store import bases
from engine.core.config import AdapterConfig, ConfigError
from engine.store.workspace import Workspace
from workspaces import ROOT


def test_adapter_keys_are_checked_and_rendered(tmp_path):
    c = config.from_dict({"adapter": {"method": "lora", "r": 8, "target_modules": ["q_proj", "v_proj"]}})
    assert c.adapter.target_modules == ("q_proj", "v_proj") and c.adapter.modules_to_save == ()
    path = tmp_path / "traind.toml"
    path.write_text(config.render_template(c))
    assert config.load(path) == c
    for bad, expected in (({"method": "dora"}, "one of 'full', 'lora', 'qlora'"),
                          ({"target_modules": "q_proj"}, "'all-linear' or a non-empty list of names"),
                          ({"target_modules": []}, "'all-linear' or a non-empty list of names"),
                          ({"modules_to_save": [""]}, "a list of names"), ({"r": 0}, "an integer >= 1")):
        with pytest.raises(ConfigError, match=f"adapter.{next(iter(bad))} = .*expected {expected}"):
            config.from_dict({"adapter": bad}, path)


def test_qlora_is_refused_without_a_cuda_gpu_at_init_and_at_config_load(tmp_path):
    if config.cuda_gpu():
        pytest.skip("this machine has a CUDA GPU")
    path = tmp_path / "traind.toml"
    path.write_text('[adapter]\nmethod = "qlora"\n')
    with pytest.raises(ConfigError, match=f"{path}: adapter.method = 'qlora': qlora needs a CUDA GPU "
                                          r"\(bitsandbytes 4-bit\); use lora here"):
        config.load(path)
    result = subprocess.run([sys.executable, "-m", "tui.cli", "init", str(tmp_path / "ws"), "--adapter", "qlora"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 2
    assert "qlora needs a CUDA GPU (bitsandbytes 4-bit); use lora here" in result.stderr
    assert not (tmp_path / "ws").exists()


def version(folder, marker: dict | None):
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    if marker is not None:
        (folder / "traind-model.json").write_text(json.dumps(marker))
    return folder


LORA = AdapterConfig(method="lora")
ADAPTER = {"method": "lora", "r": 16, "alpha": 32, "target_modules": "all-linear", "modules_to_save": [],
           "base": {"path": "/b", "content_hash": "x", "hash_algorithm": "blake3"}}


@pytest.mark.parametrize("marker, method, refused", [
    (None, "lora", False),  # a base from outside: any method starts on it
    ({}, "full", False),
    ({"job_id": "00001-a"}, "full", False),  # full goes on full
    ({"job_id": "00001-a"}, "lora", True),  # a full fine-tune continued as LoRA
    ({"job_id": "00001-a", "rebased_from": "00001-a"}, "lora", False),  # a base made by rebase
    ({"job_id": "00002-b", "adapter": ADAPTER}, "lora", False),
    ({"job_id": "00002-b", "adapter": ADAPTER}, "full", True),
])
def test_changing_the_method_mid_stream_is_refused(tmp_path, marker, method, refused):
    current = version(tmp_path / "models" / "v", marker)
    problem = bases.chain_problem(current, AdapterConfig(method=method))
    assert (problem is not None) == refused
    if refused:
        assert "changing [adapter] mid-stream is refused" in problem and "traind rebase" in problem


def test_a_changed_rank_is_refused_and_a_changed_dropout_is_not(tmp_path):
    current = version(tmp_path / "v", {"job_id": "00002-b", "adapter": ADAPTER})
    problem = bases.chain_problem(current, AdapterConfig(method="lora", r=8))
    assert problem and "r 16 -> 8" in problem
    assert bases.chain_problem(current, AdapterConfig(method="lora", dropout=0.2)) is None


def test_a_base_is_hashed_once_and_a_changed_byte_is_named(tmp_path, monkeypatch):
    ws = Workspace.at(tmp_path / "ws")
    ws.state.mkdir(parents=True)
    base = tmp_path / "base"
    base.mkdir()
    (base / "config.json").write_text("{}")
    (base / "model.safetensors").write_bytes(bytes(range(256)) * 64)
    record = bases.record(ws, base)
    pinned = bases.pin(record)
    assert bases.problems(ws, pinned) == []

    hashed = []
    monkeypatch.setattr(hashing, "hash_files", lambda *a: hashed.append(a) or {})
    assert bases.record(ws, base) == record and hashed == []  # unchanged files: the record is reused
    monkeypatch.undo()

    data = bytearray((base / "model.safetensors").read_bytes())
    data[1000] ^= 0xFF
    (base / "model.safetensors").write_bytes(bytes(data))
    assert bases.problems(ws, pinned) == [{"file": f"base {base}", "problem":
                                           "model.safetensors does not match the hash recorded when the adapter was trained"}]


def test_a_version_made_here_is_never_hashed_again_as_a_base(tmp_path, monkeypatch):
    ws = Workspace.at(tmp_path / "ws")
    ws.state.mkdir(parents=True)
    base = version(ws.models / "rebase-1", None)
    files = {"config.json": 2}
    (base / "traind-model.json").write_text(json.dumps(
        {"job_id": "x", "files": files, "hash_algorithm": "blake3", "hashes": {"config.json": "abc"}}))
    monkeypatch.setattr(hashing, "hash_files", lambda *a: pytest.fail("hashed a version with recorded hashes"))
    assert bases.record(ws, base)["hashes"] == {"config.json": "abc"}


def test_the_disk_check_before_a_first_adapter_counts_the_adapter_not_the_base(tmp_path):
    from engine.store import models
    from engine.supervisor import preflight
    from test_memory import LLAMA_7B

    ws = Workspace.at(tmp_path / "ws")
    ws.create_folders()
    base = tmp_path / "llama-7b"
    base.mkdir()
    (base / "config.json").write_text(json.dumps(LLAMA_7B))
    with open(base / "model.safetensors", "wb") as f:
        f.truncate(13 * 2**30)  # sparse: as big as a 7B model in bf16, costing no disk
    models.set_current(ws, "local", str(base), None)
    full = preflight.checkpoint_estimate(ws, None)
    assert full > 40 * 2**30  # weights and two AdamW moments
    plan = {**AdapterConfig(method="lora").chain(), "dropout": 0.05, "base": {"path": str(base)}, "adapter_in": None}
    first = preflight.checkpoint_estimate(ws, None, plan)
    assert 100 * 2**20 < first < 2 * 2**30  # r=16 on every linear of a 7B model: ~40M parameters


def test_an_active_file_starts_again_when_adapter_changes_between_attempts(tmp_path):
    from engine.core import config as config_mod
    from workspaces import events, files_in, make_workspace, start_daemon, stop_daemon, text_lines, wait_for, drop

    ws = make_workspace(tmp_path / "ws", {"jobs": {"warm_worker": False}, "inbox": {"settle_seconds": 0.5}})
    hooks = {"fake": {"steps": 40, "step_seconds": 0.05, "checkpoint_every": 5}}
    proc = start_daemon(ws, hooks=hooks)
    try:
        drop(ws, "a.jsonl", text_lines(20))
        wait_for(lambda: (ws.run_dir("00001-a") / "checkpoints" / "checkpoint-10").exists(), what="checkpoints")
    finally:
        assert stop_daemon(proc) == 0
    ws.config_path.write_text(config_mod.render_template(config_mod.from_dict(
        {"jobs": {"warm_worker": False}, "adapter": {"method": "lora"}})))
    assert start_daemon(ws, "--once", hooks=hooks).wait(60) == 0
    assert files_in(ws, "done") == ["00001-a.jsonl"]
    starts = [int(line.split()[0]) for line in (ws.run_dir("00001-a") / "fake_attempts.log").read_text().splitlines()]
    assert starts == [0, 0]  # its full-model checkpoints were not resumed under lora
    assert list((ws.run_dir("00001-a")).glob("checkpoints-superseded-*")), "they are kept aside"
    assert any(e["kind"] == "restarted" and "[adapter] or its base changed" in e["message"] for e in events(ws))
