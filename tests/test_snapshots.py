"""Snapshots: created by links with the manifest last, verified against it (hashes, safetensors
headers, finite tensors), removed and restored under their rules. No torch: model versions here are
real safetensors files written with numpy."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from engine.core import atomic
from engine.store import models, placing, restore, snapshots, verification
from engine.core.protocol import MODEL_MARKER
from engine.core.resources import dir_size
from engine.store.snapshots import SnapshotError
from engine.store.workspace import Workspace
from workspaces import ROOT

T0 = 1_795_000_000.0  # 2026-11-18 11:06:40 UTC, a fixed clock


def make_version(ws: Workspace, job_id: str, *, nan: bool = False, extra: dict[str, bytes] | None = None) -> Path:
    """A finished model version: two safetensors shards, config, tokenizer, generation config, marker last."""
    out = ws.models / job_id
    out.mkdir(parents=True)
    rng = np.random.default_rng(len(job_id))
    layer0 = rng.standard_normal((64, 48)).astype(np.float32)
    if nan:
        layer0[3, 4] = np.nan
        layer0[10, 0] = np.inf
        layer0[20, 7] = -np.inf
    save_file({"model.embed.weight": rng.standard_normal((100, 48)).astype(np.float32),
               "model.layers.0.weight": layer0}, str(out / "model-00001-of-00002.safetensors"))
    save_file({"model.layers.1.weight": rng.standard_normal((48, 48)).astype(np.float16),
               "model.layers.1.bias": np.zeros(48, dtype=np.float64),
               "model.layers.1.steps": np.arange(5, dtype=np.int64)}, str(out / "model-00002-of-00002.safetensors"))
    (out / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 48}))
    (out / "generation_config.json").write_text(json.dumps({"max_new_tokens": 20}))
    (out / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"vocab": {"a": 0, "b": 1}}}))
    for name, data in (extra or {}).items():
        (out / name).write_bytes(data)
    atomic.write_json_atomic(out / MODEL_MARKER, {"job_id": job_id, "step": 42, "loss": 1.25, "time": T0, "files": {}})
    return out


@pytest.fixture
def ws(tmp_path) -> Workspace:
    ws = Workspace.at(tmp_path / "ws")
    ws.create_folders()
    make_version(ws, "00001-first")
    models.publish(ws, "00001-first", file="first.jsonl", loss=1.25)
    return ws


def content_files(snap) -> list[str]:
    return sorted(snap.manifest["files"])


def writable(path: Path) -> Path:
    os.chmod(path, 0o644)
    return path


def flip_byte(path: Path, offset: int) -> None:
    with open(writable(path), "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def problems_of(result: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in result["problems"]:
        out.setdefault(p["file"], []).append(p["problem"])
    return out


# ---------------------------------------------------------------------------------------------
# create


def test_create_links_read_only_files_and_writes_a_manifest_that_verifies(ws):
    snap = snapshots.create(ws, "scheduled", now=T0)
    assert snap.name == "daily-2026-11-18T1106" and snap.kind == "scheduled" and snap.state == "pending"
    version = ws.models / "00001-first"
    names = sorted(p.name for p in version.iterdir())
    assert content_files(snap) == names  # every file of the version, the marker included
    for rel in names:
        a, b = os.stat(version / rel), os.stat(snap.path / rel)
        assert (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino), f"{rel} was not hard-linked"
        assert stat.S_IMODE(b.st_mode) == 0o444
        assert snap.manifest["files"][rel]["size"] == b.st_size
    m = snap.manifest
    assert m["schema"] == 1 and m["hash_algorithm"] == "blake3" and m["created_at"] == T0
    assert m["source"]["model_version"] == "00001-first" and m["source"]["job_id"] == "00001-first"
    assert m["source"]["file"] == "first.jsonl" and m["source"]["step"] == 42 and m["source"]["loss"] == 1.25
    assert m["placement"]["linked"] == len(names) and m["placement"]["copied"] == 0
    import blake3
    cfg = (snap.path / "config.json").read_bytes()
    assert m["files"]["config.json"]["hash"] == blake3.blake3(cfg).hexdigest()

    result = verification.verify(ws, snap.name, now=T0 + 5)
    assert result["ok"] and result["problems"] == [] and result["checked_at"] == T0 + 5
    assert atomic.read_json(snap.path / snapshots.VERIFY) == result
    [listed] = snapshots.list_snapshots(ws, now=T0 + 60)
    assert listed.state == "ok" and listed.age == 60 and listed.to_json()["verification"]["state"] == "ok"
    assert not [p for p in ws.snapshots.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_a_second_snapshot_of_the_same_version_reuses_hashes_and_refuses_a_taken_name(ws):
    first = snapshots.create(ws, "manual", name="before-change", now=T0)
    second = snapshots.create(ws, "manual", now=T0)
    assert second.manifest["placement"]["hashes_reused"] == len(first.manifest["files"])
    assert second.manifest["files"] == first.manifest["files"]
    assert verification.verify(ws, second.name)["ok"]
    with pytest.raises(SnapshotError, match="exists"):
        snapshots.create(ws, "manual", name="before-change")
    third = snapshots.create(ws, "manual", now=T0)  # same minute: the default name gets a suffix
    assert third.name == second.name + "-2"


@pytest.mark.parametrize("bad", [".hidden", "a/b", "..", "x y", "", "é", "a" * 129])
def test_unsafe_names_are_refused(ws, bad):
    with pytest.raises(SnapshotError, match="name"):
        snapshots.create(ws, "manual", name=bad or ".")
    assert snapshots.list_snapshots(ws) == []


def test_a_hub_model_cannot_be_snapshotted(ws):
    models.set_current(ws, "hub", "Qwen/Qwen2.5-0.5B", None)
    with pytest.raises(SnapshotError, match="hub model 'Qwen/Qwen2.5-0.5B'"):
        snapshots.create(ws, "manual")


def test_a_folder_without_a_manifest_and_a_killed_create_are_never_listed(ws):
    (ws.snapshots / "looks-like-one").mkdir()
    (ws.snapshots / "looks-like-one" / "config.json").write_text("{}")
    bad = ws.snapshots / "bad-manifest"
    bad.mkdir()
    (bad / "manifest.json").write_text('{"schema": 1, "name": "bad-manifest"')  # torn
    # A create killed (SIGKILL) half-way: after the first file was placed and while hashing.
    code = ("import os, signal, sys\n"
            "from engine.store import snapshots\nfrom engine.store.workspace import Workspace\n"
            "snapshots.hash_file = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
            "snapshots.create(Workspace.at(sys.argv[1]), 'manual', name='killed')\n")
    proc = subprocess.run([sys.executable, "-c", code, str(ws.root)], cwd=ROOT, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    temps = [p for p in ws.snapshots.iterdir() if p.name.startswith(".tmp-killed-")]
    assert len(temps) == 1 and not (temps[0] / "manifest.json").exists()
    assert snapshots.list_snapshots(ws) == []
    with pytest.raises(SnapshotError, match="not a snapshot"):
        snapshots.get(ws, "looks-like-one")
    assert snapshots.clean_temp(ws) == temps  # its process is gone: the daemon clears it at start-up
    assert snapshots.create(ws, "manual", name="killed").name == "killed"


def test_copies_when_links_are_refused_after_checking_free_space(ws, monkeypatch):
    def no_links(src, dst, **kw):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    monkeypatch.setattr(placing, "disk_usage", lambda path: {"path": str(path), "total": 10**9, "free": 1000})
    with pytest.raises(SnapshotError, match=r"^disk: need .* free on .*snapshots, have 1000 B"):
        snapshots.create(ws, "manual", name="copied", reserve=500)
    assert os.listdir(ws.snapshots) == []  # nothing half-made left behind
    monkeypatch.setattr(placing, "disk_usage", lambda path: {"path": str(path), "total": 10**12, "free": 10**11})
    snap = snapshots.create(ws, "manual", name="copied", reserve=500)
    version = ws.models / "00001-first"
    for rel in content_files(snap):
        assert os.stat(snap.path / rel).st_ino != os.stat(version / rel).st_ino
        assert (snap.path / rel).read_bytes() == (version / rel).read_bytes()
        assert stat.S_IMODE(os.stat(snap.path / rel).st_mode) == 0o444
    assert snap.manifest["placement"]["linked"] == 0
    assert snap.manifest["placement"]["copied"] + snap.manifest["placement"]["reflinked"] == len(snap.manifest["files"])
    assert snap.unique_bytes == snap.size  # nothing shared: removing it frees all of it
    assert verification.verify(ws, "copied")["ok"]


def test_unique_bytes_count_shared_inodes_once(ws):
    a = snapshots.create(ws, "manual", name="a")
    b = snapshots.create(ws, "manual", name="b")
    size = dir_size(ws.models / "00001-first")
    assert a.size == b.size == size
    assert a.unique_bytes == b.unique_bytes == 0  # every file shared with the version (and each other)
    assert dir_size(ws.root) < 1.05 * size + 8192  # the version and both snapshots: the bytes counted once
    make_version(ws, "00002-second")
    models.publish(ws, "00002-second")
    snapshots.remove_version(ws, "00001-first")
    assert {s.name: s.unique_bytes for s in snapshots.list_snapshots(ws)} == {"a": 0, "b": 0}  # a and b share
    snapshots.remove(ws, "b", current_source=None, newest_verified_name=None)
    assert snapshots.get(ws, "a").unique_bytes == size  # a alone holds them now


def test_optimizer_state_only_when_asked_and_pickles_trusted_only_by_hash(ws, tmp_path):
    make_version(ws, "00002-opt", extra={"optimizer.pt": b"\x80\x04pickled-state", "scheduler.pt": b"\x80\x04s"})
    models.publish(ws, "00002-opt")
    plain = snapshots.create(ws, "manual", name="plain")
    assert "optimizer.pt" not in plain.manifest["files"]
    full = snapshots.create(ws, "manual", name="full", include_optimizer=True)
    assert {"optimizer.pt", "scheduler.pt"} <= set(full.manifest["files"])
    assert verification.pickle_trusted(ws, full.path / "optimizer.pt")
    planted = tmp_path / "optimizer.pt"
    planted.write_bytes(b"\x80\x04pickled-stat!")  # same size, other bytes
    assert not verification.pickle_trusted(ws, planted)


# ---------------------------------------------------------------------------------------------
# verify


def test_a_flipped_byte_is_found_and_named(ws):
    snap = snapshots.create(ws, "manual", name="s")
    shard = "model-00001-of-00002.safetensors"
    flip_byte(snap.path / shard, os.path.getsize(snap.path / shard) - 100)  # in a tensor's data
    result = verification.verify(ws, "s")
    assert not result["ok"]
    assert "hash mismatch" in problems_of(result)[shard]
    assert set(problems_of(result)) == {shard}
    assert snapshots.get(ws, "s").state == "corrupt"
    assert "hash mismatch" in verification.describe_problems(result)


def test_a_truncated_safetensors_file_is_found_by_size_and_header(ws):
    snap = snapshots.create(ws, "manual", name="s")
    shard = snap.path / "model-00002-of-00002.safetensors"
    full = os.path.getsize(shard)
    os.truncate(writable(shard), full - 1000)
    found = problems_of(verification.verify(ws, "s"))["model-00002-of-00002.safetensors"]
    assert f"size {full - 1000:,} != {full:,} in manifest" in found
    assert any(p.startswith("header says") and p.endswith(f"file has {full - 1000 - 8 - _header_len(shard):,}")
               for p in found), found


def _header_len(path: Path) -> int:
    with open(path, "rb") as f:
        return int.from_bytes(f.read(8), "little")


def test_missing_extra_and_unparsable_files_are_reported(ws):
    snap = snapshots.create(ws, "manual", name="s")
    os.unlink(snap.path / "tokenizer.json")
    (snap.path / "stray.bin").write_bytes(b"x")
    writable(snap.path / "config.json").write_text('{"model_type": "ll')
    found = problems_of(verification.verify(ws, "s"))
    assert found["tokenizer.json"] == ["missing"]
    assert found["stray.bin"] == ["not in manifest"]
    assert found["config.json"][0].startswith("size ") and found["config.json"][1].startswith("JSON does not parse")


def test_non_finite_tensors_are_named(ws):
    make_version(ws, "00002-nan", nan=True)
    models.publish(ws, "00002-nan")
    snapshots.create(ws, "manual", name="nan")
    result = verification.verify(ws, "nan")
    assert not result["ok"]
    assert problems_of(result) == {"model-00001-of-00002.safetensors":
                                   ["tensor model.layers.0.weight has 3 non-finite values"]}


def _write_raw_safetensors(path: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + data)


def test_bf16_and_float8_finite_checks(tmp_path):
    values = np.array([1.0, -2.5, 3.0e38, -1.0e-30, 0.0], dtype=np.float32)
    bf16 = (values.view(np.uint32) >> 16).astype(np.uint16)
    bad = np.array([0x7FC0, 0x7F80, 0xFF80], dtype=np.uint16)  # NaN, +Inf, -Inf
    e4m3 = np.array([0x7E, 0xFE, 0x7F, 0x00], dtype=np.uint8)  # 448, -448, NaN, 0
    e5m2 = np.array([0x7B, 0x7C, 0xFD, 0x01], dtype=np.uint8)  # 57344, Inf, NaN, tiny
    path = tmp_path / "m.safetensors"
    _write_raw_safetensors(path, {
        "good.bf16": ("BF16", [5], bf16.tobytes()),
        "bad.bf16": ("BF16", [2, 4], np.concatenate([bf16[:5], bad]).tobytes()),
        "f8a": ("F8_E4M3", [4], e4m3.tobytes()),
        "f8b": ("F8_E5M2", [4], e5m2.tobytes()),
        "ints": ("I32", [2], np.array([-1, 0x7F800000], dtype=np.int32).tobytes()),
    })
    problems, notes = verification.check_safetensors(path)
    assert problems == ["tensor bad.bf16 has 3 non-finite values", "tensor f8a has 1 non-finite value",
                        "tensor f8b has 2 non-finite values"]
    assert notes == []


def test_inconsistent_headers_are_reported(tmp_path):
    path = tmp_path / "m.safetensors"
    _write_raw_safetensors(path, {"w": ("F32", [3], np.ones(3, dtype=np.float32).tobytes())})
    raw = path.read_bytes()
    path.write_bytes(raw.replace(b"[3]", b"[4]"))
    assert verification.check_safetensors(path)[0] == ["tensor w: 12 bytes for F32 [4] (16 expected)"]
    path.write_bytes(raw + b"\0" * 8)
    assert verification.check_safetensors(path)[0] == ["header says 12 bytes of data, file has 20"]
    path.write_bytes((10**9).to_bytes(8, "little") + raw[8:])
    assert verification.check_safetensors(path)[0][0].startswith("header length 1,000,000,000 exceeds the file")
    path.write_bytes(raw[:8] + b"x" + raw[9:])
    assert verification.check_safetensors(path)[0][0].startswith("header is not valid JSON")


def test_sha256_where_blake3_is_missing(ws, monkeypatch):
    with_blake3 = snapshots.create(ws, "manual", name="b3")
    monkeypatch.setitem(sys.modules, "blake3", None)  # import blake3 now raises ImportError
    assert snapshots.hash_algorithm() == "sha256"
    snap = snapshots.create(ws, "manual", name="sha")
    assert snap.manifest["hash_algorithm"] == "sha256"
    assert snap.manifest["placement"]["hashes_reused"] == 0  # BLAKE3 hashes are no use here
    cfg = (snap.path / "config.json").read_bytes()
    assert snap.manifest["files"]["config.json"]["hash"] == hashlib.sha256(cfg).hexdigest()
    assert verification.verify(ws, "sha")["ok"]
    flip_byte(snap.path / "config.json", 2)
    assert problems_of(verification.verify(ws, "sha"))["config.json"][0] == "hash mismatch"
    with pytest.raises(SnapshotError, match="blake3 package is not installed"):
        verification.verify(ws, with_blake3.name)
    assert not (with_blake3.path / snapshots.VERIFY).exists()  # cannot check is not corrupt


# ---------------------------------------------------------------------------------------------
# remove, restore, prune


def test_remove_refuses_the_newest_verified_and_the_current_models_source(ws):
    snapshots.create(ws, "manual", name="old", now=T0)
    assert verification.verify(ws, "old")["ok"]
    snapshots.create(ws, "manual", name="pending", now=T0 + 10)
    with pytest.raises(SnapshotError, match="newest verified"):
        snapshots.remove(ws, "old")
    restored = restore.restore_to_version(ws, "old", now=T0 + 20)
    models.set_current(ws, "local", f"models/{restored.name}", restored.name, restored_from="old")
    snapshots.create(ws, "manual", name="newer", now=T0 + 30)
    assert verification.verify(ws, "newer")["ok"]
    with pytest.raises(SnapshotError, match="current model was restored from"):
        snapshots.remove(ws, "old")
    with pytest.raises(SnapshotError, match="newest verified"):
        snapshots.remove(ws, "newer")
    version_file = ws.models / "00001-first" / "config.json"
    before = version_file.read_bytes()
    snapshots.remove(ws, "pending")
    assert [s.name for s in snapshots.list_snapshots(ws)] == ["old", "newer"]
    assert version_file.read_bytes() == before  # removing a link leaves the version's file alone
    assert not [p for p in ws.snapshots.iterdir() if p.name.startswith(".")]
    with pytest.raises(SnapshotError, match="current model is never pruned"):
        snapshots.remove_version(ws, restored.name)


def test_restore_refuses_a_corrupt_snapshot(ws):
    snapshots.create(ws, "manual", name="s")
    flip_byte(ws.snapshots / "s" / "tokenizer.json", 5)
    with pytest.raises(SnapshotError, match=r"s: corrupt \(tokenizer.json: hash mismatch"):
        restore.restore_to_version(ws, "s")  # pending: verified first, found corrupt
    assert snapshots.get(ws, "s").state == "corrupt"
    with pytest.raises(SnapshotError, match="never restored"):
        restore.restore_to_version(ws, "s")
    assert [p.name for p in ws.models.iterdir() if "restored" in p.name] == []


def test_restore_makes_a_version_identical_to_the_snapshot(ws):
    snap = snapshots.create(ws, "manual", name="good", now=T0)
    version = restore.restore_to_version(ws, "good", now=T0 + 1)
    assert version.parent == ws.models and version.name == "restored-good-20261118T110641"
    assert snapshots.get(ws, "good").state == "ok"  # verified on the way
    content = [rel for rel in snap.manifest["files"] if rel != MODEL_MARKER]
    assert sorted(p.name for p in version.iterdir()) == sorted(content + [MODEL_MARKER])
    for rel in content:
        assert (version / rel).read_bytes() == (snap.path / rel).read_bytes()
        assert os.stat(version / rel).st_ino == os.stat(snap.path / rel).st_ino
    marker = atomic.read_json(version / MODEL_MARKER)
    assert marker["restored_from"] == "good" and marker["job_id"] == "00001-first" and marker["step"] == 42
    assert marker["hashes"] == {rel: snap.manifest["files"][rel]["hash"] for rel in content}
    assert not any(p.name.startswith(".partial") for p in ws.models.iterdir())
    # The restored model, made current and snapshotted, keeps its provenance.
    models.set_current(ws, "local", f"models/{version.name}", version.name)
    again = snapshots.create(ws, "manual", name="again")
    assert again.source["restored_from"] == "good" and again.source["model_version"] == version.name
    assert snapshots.current_source_snapshot(ws) == "good"


def test_versions_in_snapshots_and_model_versions(ws):
    make_version(ws, "00002-second")
    models.publish(ws, "00002-second")
    snapshots.create(ws, "manual", name="s")
    (ws.models / ".partial-00003-x").mkdir()
    assert snapshots.model_versions(ws) == ["00001-first", "00002-second"]
    assert snapshots.versions_in_snapshots(ws) == {"00002-second"}
    assert snapshots.current_version(ws) == "00002-second"


def test_the_module_stays_light():
    code = ("import sys\nimport engine.store.snapshots, engine.store.verification, engine.store.placing, engine.store.restore, engine.store.retention\n"
            "print(','.join(m for m in ('torch', 'transformers', 'safetensors', 'numpy', 'blake3') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
