"""Whether a model source can be loaded, as `traind init` and the daemon judge it (no torch).

Model folders are written by hand in the layouts of the hub (a Llama-style single
file, a Qwen2-style sharded index) with real safetensors headers.
"""

from __future__ import annotations

import json
import struct
import time

import pytest

from engine.core import model_check
from engine.store import models
from engine.supervisor import preflight
from engine.store.workspace import Workspace
from workspaces import run_cli


def write_safetensors(path, tensors: dict[str, int]) -> None:
    """A valid safetensors file: one F32 vector of the given length per name."""
    header, offset = {}, 0
    for name, n in tensors.items():
        header[name] = {"dtype": "F32", "shape": [n], "data_offsets": [offset, offset + 4 * n]}
        offset += 4 * n
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * offset)


def llama_dir(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    write_safetensors(path / "model.safetensors", {"embed": 16, "head": 16})
    (path / "tokenizer.json").write_text("{}")
    (path / "tokenizer_config.json").write_text("{}")
    return path


def qwen2_sharded_dir(path):
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    shards = {"embed": "model-00001-of-00002.safetensors", "head": "model-00002-of-00002.safetensors"}
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": shards}))
    for name, shard in shards.items():
        write_safetensors(path / shard, {name: 8})
    (path / "vocab.json").write_text("{}")
    (path / "merges.txt").write_text("")
    (path / "tokenizer_config.json").write_text("{}")
    return path


def test_complete_model_directories_pass(tmp_path, tiny_model_dir):
    assert model_check.dir_problems(llama_dir(tmp_path / "llama")) == []
    assert model_check.dir_problems(qwen2_sharded_dir(tmp_path / "qwen")) == []
    assert model_check.dir_problems(tiny_model_dir) == []
    assert model_check.source_problem("Qwen/Qwen2-0.5B") is None  # a hub id: only downloading can tell


def test_each_missing_or_damaged_part_is_named(tmp_path):
    d = llama_dir(tmp_path / "no-weights")
    (d / "model.safetensors").unlink()
    assert model_check.dir_problems(d) == ["no weights (model.safetensors or pytorch_model.bin, or a sharded "
                                           "model.safetensors.index.json or pytorch_model.bin.index.json)"]
    d = llama_dir(tmp_path / "no-tokenizer")
    (d / "tokenizer.json").unlink()  # tokenizer_config.json alone cannot build a tokenizer
    assert model_check.dir_problems(d) == ["no tokenizer (tokenizer.json, or a vocabulary file such as vocab.json "
                                           "or tokenizer.model)"]
    d = llama_dir(tmp_path / "no-config")
    (d / "config.json").unlink()
    assert model_check.dir_problems(d) == ["no config.json"]
    d = qwen2_sharded_dir(tmp_path / "shard-gone")
    (d / "model-00002-of-00002.safetensors").unlink()
    assert model_check.dir_problems(d) == ["model-00002-of-00002.safetensors missing (named in model.safetensors.index.json)"]

    d = llama_dir(tmp_path / "truncated")
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    assert model_check.dir_problems(d) == ["model.safetensors: truncated or corrupt: the header describes 128 bytes "
                                           "of data, the file holds 118"]
    d = llama_dir(tmp_path / "garbled")
    raw = bytearray((d / "model.safetensors").read_bytes())
    raw[8:12] = b"#!@?"
    (d / "model.safetensors").write_bytes(bytes(raw))
    [problem] = model_check.dir_problems(d)
    assert problem.startswith("model.safetensors: corrupt safetensors header (not JSON")

    problem = model_check.source_problem(str(tmp_path / "deleted"))
    assert problem == f"model unavailable: {tmp_path / 'deleted'}: no such directory"


def hf_env(tmp_path) -> dict:
    return {"HF_HUB_CACHE": str(tmp_path / "hf-cache"), "HF_HUB_OFFLINE": "1"}


def test_init_refuses_a_directory_that_cannot_load_and_names_what_is_missing(tmp_path):
    d = llama_dir(tmp_path / "llama")
    (d / "model.safetensors").unlink()
    (d / "tokenizer.json").unlink()
    result = run_cli("init", str(tmp_path / "ws"), "--model", str(d))
    assert result.returncode == 2
    assert f"{d}: no weights (model.safetensors" in result.stderr and "; no tokenizer (" in result.stderr
    assert not (tmp_path / "ws" / "traind.toml").exists()  # not a workspace


def test_init_with_a_hub_id_not_in_the_cache_warns_and_succeeds(tmp_path, monkeypatch):
    for key, value in hf_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    result = run_cli("init", str(tmp_path / "ws"), "--model", "some-org/missing")
    assert result.returncode == 0, result.stderr
    assert ("warning: model some-org/missing is not in the local Hugging Face cache and this machine may be "
            "offline; the worker will try to download it") in result.stderr
    current = json.loads((tmp_path / "ws" / "models" / "current.json").read_text())
    assert current["kind"] == "hub" and current["path"] == "some-org/missing"

    # In the cache (the hub's own layout: refs/main names the snapshot): no warning.
    repo = tmp_path / "hf-cache" / "models--some-org--cached"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    (repo / "snapshots" / "0123abcd").mkdir(parents=True)
    (repo / "snapshots" / "0123abcd" / "config.json").write_text("{}")
    result = run_cli("init", str(tmp_path / "ws2"), "--model", "some-org/cached")
    assert result.returncode == 0 and "warning" not in result.stderr, result.stderr


def test_while_the_model_is_unavailable_the_source_is_looked_at_only_when_due(tmp_path):
    ws = Workspace.at(tmp_path / "ws")
    ws.create_folders()
    d = llama_dir(tmp_path / "llama")
    models.set_current(ws, "local", str(d), None)
    wait = preflight.ModelWait(recheck_seconds=0.2)
    assert wait.problem(ws) is None  # nothing reported: nothing to wait for
    (d / "model.safetensors").rename(tmp_path / "aside.safetensors")
    wait.unavailable("model unavailable: what the worker said")
    assert wait.problem(ws) == "model unavailable: what the worker said"  # not looked at again before it is due
    time.sleep(0.25)
    assert wait.problem(ws).startswith(f"model unavailable: {d}: no weights")
    (tmp_path / "aside.safetensors").rename(d / "model.safetensors")
    assert wait.problem(ws) is not None
    time.sleep(0.25)
    assert wait.problem(ws) is None

    models.set_current(ws, "hub", "some-org/missing", None)  # a hub id: tried again once the time is up
    wait.unavailable("model unavailable: some-org/missing: cannot connect")
    assert wait.problem(ws) is not None
    time.sleep(0.25)
    assert wait.problem(ws) is None


@pytest.mark.parametrize("source", ["./relative/missing", "/abs/missing", "a/b/c"])
def test_a_path_that_does_not_exist_is_refused_not_taken_for_a_hub_id(tmp_path, source):
    ws = Workspace.at(tmp_path / "ws")
    ws.create_folders()
    with pytest.raises(models.ModelError, match="no such model directory"):
        models.init_base(ws, source)
