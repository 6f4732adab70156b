"""`traind export`: plain transformers and peft load what it writes, and nothing corrupt or half-written is left."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.core import hashing, testing
from engine.store import bases, models, snapshots, verification
from engine.tools import export
from engine.core.protocol import MODEL_MARKER
from workspaces import ROOT, daemon_env, make_workspace, run_cli

JOB = "00001-adapter"
PROMPT = "The quick brown fox jumps over"


def _mark(folder: Path, **extra) -> None:
    """A version's marker as the worker writes it: every file's size and hash."""
    files = {p.relative_to(folder).as_posix(): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}
    algo = hashing.algorithm()
    marker = {"job_id": folder.name, "step": 10, "loss": 1.5, "time": time.time(), "files": files,
              "hash_algorithm": algo, "hashes": hashing.hash_files(folder, list(files), algo), **extra}
    (folder / MODEL_MARKER).write_text(json.dumps(marker))


def _build_adapter(base: Path, out: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base),
                           LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    torch.manual_seed(7)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:  # peft starts B at zero: a merge would change nothing
                param.normal_(0, 0.2)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    # Trainer leftovers a version may hold: never exported.
    (out / "training_args.bin").write_bytes(b"pickle")
    base_hash = bases.content_hash(hashing.hash_files(base, bases.model_files(base), hashing.algorithm()))
    _mark(out, adapter={"method": "lora", "r": 4, "alpha": 8, "target_modules": "all-linear", "modules_to_save": [],
                        "base": {"path": str(base), "content_hash": base_hash, "hash_algorithm": hashing.algorithm()}})


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_model_dir):
    """A base and an adapter of it, made once: (base dir, adapter dir), copied into each workspace."""
    root = tmp_path_factory.mktemp("built")
    base = root / "base-tiny"
    shutil.copytree(tiny_model_dir, base)
    _build_adapter(base, root / JOB)
    return base, root / JOB


def _workspace(root: Path, built) -> tuple:
    """A workspace with the tiny base in models/base-tiny and the adapter version current."""
    base_src, adapter_src = built
    ws = make_workspace(root, model_dir=base_src)
    base = ws.models / "base-tiny"
    shutil.copytree(base_src, base)
    shutil.copytree(adapter_src, ws.models / JOB)
    marker = json.loads((ws.models / JOB / MODEL_MARKER).read_text())
    marker["adapter"]["base"]["path"] = str(base)
    (ws.models / JOB / MODEL_MARKER).write_text(json.dumps(marker))
    models.set_current(ws, "local", f"models/{JOB}", JOB, job_id=JOB)
    return ws, base


@pytest.fixture(scope="module")
def shared(tmp_path_factory, built):
    """One workspace for the tests that only read it."""
    return _workspace(tmp_path_factory.mktemp("ws"), built)


@pytest.fixture(scope="module")
def reference(shared):
    """Logits of PeftModel(base, adapter) on the prompt, in float32: what every export must reproduce."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ws, base = shared
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), ws.models / JOB)
    plain = _logits(AutoModelForCausalLM.from_pretrained(base), base)
    with_adapter = _logits(model, base)
    assert (with_adapter - plain).abs().max() > 1e-3, "the adapter must change the output, or the test proves nothing"
    return with_adapter


def _logits(model, tokenizer_dir: Path):
    import torch
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(tokenizer_dir)(PROMPT, return_tensors="pt")["input_ids"]
    model.eval()
    with torch.no_grad():
        return model.float()(input_ids=ids).logits


def _export_cli(ws, out: Path, *args: str, crash_at: str | None = None) -> subprocess.CompletedProcess:
    env = testing.with_switches(daemon_env(fake=False), crash_at=crash_at)
    return subprocess.run([sys.executable, "-m", "engine.cli", "export", str(out), "-w", str(ws.root), *args],
                          env=env, capture_output=True, text=True, cwd=ROOT, timeout=300)


def _leftovers(out: Path) -> list[str]:
    return sorted(n for n in os.listdir(out.parent) if n.startswith(f".{out.name}.tmp-"))


def test_merged_adapter_loads_with_transformers_alone_and_matches_peft(shared, reference, tmp_path):
    from transformers import AutoModelForCausalLM

    ws, base = shared
    out = tmp_path / "merged"
    result = _export_cli(ws, out, "--merged")
    assert result.returncode == 0, result.stderr
    assert "merged into" in result.stdout
    names = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "tokenizer.json", export.RECORD} <= names
    assert not names & {"adapter_config.json", "adapter_model.safetensors", MODEL_MARKER, "training_args.bin", ".adapter"}
    logits = _logits(AutoModelForCausalLM.from_pretrained(out), out)
    assert (logits - reference).abs().max() < 1e-4
    record = json.loads((out / export.RECORD).read_text())
    assert record["type"] == "merged" and record["from"] == {**record["from"], "kind": "version", "name": JOB}
    assert record["base"]["path"] == str(base) and record["base"]["content_hash"]
    assert record["merged"]["merged_in"] == "float32" and record["merged"]["saved_as"] == "float32"
    assert _leftovers(out) == []
    assert all(os.stat(out / name).st_mode & 0o044 for name in names)  # readable as the user's other files


def test_adapter_export_loads_with_peft_from_its_own_config(shared, reference, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel
    from transformers import AutoModelForCausalLM

    ws, base = shared
    out = tmp_path / "adapter"
    record = export.run(ws, out)  # the default: the current model
    assert record["type"] == "adapter"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(base) and os.path.isabs(config["base_model_name_or_path"])
    assert not {MODEL_MARKER, "training_args.bin"} & set(os.listdir(out))
    with_peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(config["base_model_name_or_path"]), out)
    assert (_logits(with_peft, out) - reference).abs().max() < 1e-4
    assert (_logits(AutoPeftModelForCausalLM.from_pretrained(out), out) - reference).abs().max() < 1e-4
    # The record's hashes are those of the files as exported.
    for rel, info in record["files"].items():
        assert hashing.hash_file(out / rel, record["hash_algorithm"]) == info["hash"], rel


def test_full_version_exports_as_a_plain_model(shared, tmp_path):
    from transformers import AutoModelForCausalLM

    ws, base = shared
    full = ws.models / "00002-full"
    if not full.exists():
        shutil.copytree(base, full)
        (full / "optimizer.pt").write_bytes(b"pickle")
        _mark(full)
    out = tmp_path / "full"
    result = _export_cli(ws, out, "--from", "00002-full", "--merged")  # --merged on a full model: just the model
    assert result.returncode == 0, result.stderr
    assert set(os.listdir(out)) == set(os.listdir(base)) | {export.RECORD}
    expected = _logits(AutoModelForCausalLM.from_pretrained(base), base)
    assert (_logits(AutoModelForCausalLM.from_pretrained(out), out) - expected).abs().max() == 0
    assert json.loads((out / export.RECORD).read_text())["type"] == "model"
    # The tiny base itself, with no marker, exports too.
    assert export.run(ws, tmp_path / "base", "models/base-tiny")["type"] == "model"
    assert (tmp_path / "base" / "model.safetensors").read_bytes() == (base / "model.safetensors").read_bytes()


def test_snapshot_exports_and_a_flipped_byte_is_refused(tmp_path, built, reference):
    from peft import AutoPeftModelForCausalLM

    ws, _base = _workspace(tmp_path / "ws", built)
    snapshots.create(ws, "manual", "before")
    assert verification.verify(ws, "before")["ok"]
    out = tmp_path / "from-snapshot"
    record = export.run(ws, out, "before")
    assert record["from"]["kind"] == "snapshot" and record["from"]["job_id"] == JOB
    assert (_logits(AutoPeftModelForCausalLM.from_pretrained(out), out) - reference).abs().max() < 1e-4

    # One byte of tensor data flipped after the snapshot was verified: its recorded result still says ok.
    weights = ws.snapshots / "before" / "adapter_model.safetensors"
    os.chmod(weights, 0o644)
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x01
    weights.write_bytes(bytes(data))
    refused = tmp_path / "refused"
    result = _export_cli(ws, refused, "--from", "snapshots/before")
    assert result.returncode == 1
    assert "snapshot before is corrupt: adapter_model.safetensors: hash mismatch" in result.stderr
    assert "Traceback" not in result.stderr
    assert not refused.exists() and _leftovers(refused) == []
    # Once verification recorded it, it is refused before anything is copied.
    assert not verification.verify(ws, "before")["ok"]
    with pytest.raises(export.ExportError, match="is corrupt .*never exported"):
        export.run(ws, refused, "before")


def test_a_changed_or_missing_version_file_is_refused(tmp_path, built):
    ws, _base = _workspace(tmp_path / "ws", built)
    weights = ws.models / JOB / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(export.ExportError, match=f"models/{JOB} is corrupt: adapter_model.safetensors: hash mismatch"):
        export.run(ws, tmp_path / "out")
    weights.unlink()  # as retention pruning it would
    with pytest.raises(export.ExportError, match="adapter_model.safetensors is missing"):
        export.run(ws, tmp_path / "out")
    assert not (tmp_path / "out").exists() and _leftovers(tmp_path / "out") == []


def test_a_version_pruned_while_it_is_copied_is_still_exported_whole(tmp_path, built, monkeypatch):
    ws, _base = _workspace(tmp_path / "ws", built)
    models.set_current(ws, "local", "models/base-tiny", "base-tiny")
    copy = export._copy_file
    pruned = []

    def prune_after_first_file(fd, dst):
        if not pruned:
            snapshots.remove_version(ws, JOB)  # retention's own pruning, mid-export
            pruned.append(JOB)
        copy(fd, dst)

    monkeypatch.setattr(export, "_copy_file", prune_after_first_file)
    record = export.run(ws, tmp_path / "out", JOB)
    assert pruned and not (ws.models / JOB).exists()
    assert (tmp_path / "out" / "adapter_model.safetensors").stat().st_size > 0
    for rel, info in record["files"].items():
        assert hashing.hash_file(tmp_path / "out" / rel, record["hash_algorithm"]) == info["hash"], rel


def test_an_existing_out_dir_is_refused_and_left_alone(shared, tmp_path):
    ws, _base = shared
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    result = _export_cli(ws, out)
    assert result.returncode == 1 and "exists and is not empty" in result.stderr
    assert os.listdir(out) == ["mine.txt"]
    (out / "mine.txt").unlink()  # an empty folder is filled
    assert export.run(ws, out)["type"] == "adapter" and (out / "adapter_config.json").is_file()
    for bad, why in (("nope", "no model version or snapshot"), ("../x", "not a model version or a snapshot name")):
        with pytest.raises(export.ExportError, match=why):
            export.run(ws, tmp_path / "other", bad)
    with pytest.raises(export.ExportError, match="which traind owns"):
        export.run(ws, ws.models / "exported")


def test_a_killed_export_leaves_no_out_dir_and_the_next_one_cleans_up(shared, tmp_path):
    ws, _base = shared
    out = tmp_path / "killed"
    flag = tmp_path / "crash-flag"
    flag.touch()
    result = _export_cli(ws, out, crash_at=f"export:{flag}")
    assert result.returncode == -9  # killed itself with everything copied, before the rename
    assert not out.exists()
    assert len(_leftovers(out)) == 1
    result = _export_cli(ws, out)
    assert result.returncode == 0, result.stderr
    assert _leftovers(out) == [] and (out / "adapter_model.safetensors").is_file()


def test_an_adapter_whose_base_is_gone_is_refused(tmp_path, built):
    ws, base = _workspace(tmp_path / "ws", built)
    shutil.rmtree(base)
    for merged in (False, True):
        with pytest.raises(export.ExportError, match="its base model .* cannot be loaded"):
            export.run(ws, tmp_path / "out", merged=merged)
    assert not (tmp_path / "out").exists()


def test_an_adapter_whose_base_changed_is_refused(tmp_path, built):
    ws, base = _workspace(tmp_path / "ws", built)
    weights = base / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0x01
    weights.write_bytes(bytes(data))
    for merged in (False, True):
        with pytest.raises(export.ExportError, match="its base is not the one it was trained on"):
            export.run(ws, tmp_path / "out", merged=merged)
    assert not (tmp_path / "out").exists()


def test_a_failed_merge_says_why_and_leaves_nothing(tmp_path, built):
    ws, base = _workspace(tmp_path / "ws", built)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "hidden_size": 32}))  # weights no longer fit
    marker_path = ws.models / JOB / MODEL_MARKER
    marker = json.loads(marker_path.read_text())
    marker["adapter"]["base"] = bases.pin(bases.record(ws, base))  # as if it had been trained on this base
    marker_path.write_text(json.dumps(marker))
    out = tmp_path / "out"
    result = _export_cli(ws, out, "--merged")
    assert result.returncode == 1
    assert f"traind export: merging the adapter into {base} failed: RuntimeError" in result.stderr
    assert "size mismatch" in result.stderr and "Traceback" not in result.stderr
    assert not out.exists() and _leftovers(out) == []


def test_hub_model_has_nothing_to_export(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    models.set_current(ws, "hub", "org/some-model", None)
    result = run_cli("export", str(tmp_path / "out"), "-w", str(ws.root))
    assert result.returncode == 1 and "hub model 'org/some-model'" in result.stderr
