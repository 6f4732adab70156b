"""LoRA adapters in the real worker: what a job trains, checkpoints and saves, and how the next job goes on.

Real tiny model, real peft, one torch thread (so two runs of a spec compute identical losses).
"""

from __future__ import annotations

import dataclasses
import json
import math
import signal
from pathlib import Path

import pytest

from engine.core import protocol
from engine.store import checkpoints
from engine.data.demo_data import write_demo_file
from worker_runs import TRAINING, losses, make_spec, of, run_worker

pytestmark = pytest.mark.e2e

LORA = {"method": "lora", "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear",
        "modules_to_save": []}
LORA_TRAINING = {**TRAINING, "learning_rate": 1e-2}


def lora_spec(tmp: Path, base: Path, data: Path, name: str, adapter_in: Path | None = None, fmt: str = "text",
              **hooks) -> protocol.JobSpec:
    spec = make_spec(tmp, adapter_in or base, fmt, data, name, **hooks)
    pinned = {"path": str(base), "content_hash": "0" * 64, "hash_algorithm": "blake3"}
    adapter = {**LORA, "base": pinned, "adapter_in": str(adapter_in) if adapter_in else None}
    return dataclasses.replace(spec, training=LORA_TRAINING, adapter=adapter)


def size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


@pytest.fixture(scope="module")
def lora_reference(tmp_path_factory, tiny_model_dir, text_data):
    spec = lora_spec(tmp_path_factory.mktemp("lora"), tiny_model_dir, text_data, "ref")
    rc, events = run_worker(spec)
    assert rc == protocol.EXIT_DONE, Path(spec.log_path).read_text()[-3000:]
    return spec, events


def test_a_lora_job_trains_and_saves_only_the_adapter(lora_reference, tiny_model_dir):
    spec, events = lora_reference
    start = of(events, "job_start")[0]
    assert start["method"] == "lora"
    assert 0 < start["trainable_params"] < start["total_params"] / 4
    steps = of(events, "step")
    assert all(math.isfinite(e["loss"]) for e in steps)
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.3, "the adapter should visibly learn"

    # Checkpoints hold the adapter and its optimizer state, never the base's weights.
    newest = checkpoints.newest_complete(spec.run_dir)[1]
    names = {p.name for p in newest.iterdir()}
    assert "adapter_model.safetensors" in names and "model.safetensors" not in names
    adapter_bytes = (newest / "adapter_model.safetensors").stat().st_size
    assert (newest / "optimizer.pt").stat().st_size < 3 * adapter_bytes

    out = Path(spec.model_out)
    marker = json.loads((out / protocol.MODEL_MARKER).read_text())
    assert marker["adapter"]["method"] == "lora" and marker["adapter"]["base"]["path"] == str(tiny_model_dir)
    assert set(marker["files"]) >= {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"}
    assert not (out / "model.safetensors").exists()
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_model_dir)
    assert size(out) < size(tiny_model_dir) / 2

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    ids = torch.tensor([[5, 6, 7, 8]])
    assert torch.isfinite(model(ids).logits).all()


def test_the_next_job_goes_on_training_the_current_adapter(tmp_path, lora_reference, tiny_model_dir, text_data):
    first_spec, first = lora_reference
    spec = lora_spec(tmp_path, tiny_model_dir, text_data, "next", adapter_in=Path(first_spec.model_out))
    rc, second = run_worker(spec)
    assert rc == protocol.EXIT_DONE, Path(spec.log_path).read_text()[-3000:]
    before, after = of(first, "step"), of(second, "step")
    # It starts where the first adapter ended, not from the untrained base.
    assert after[0]["loss"] < before[0]["loss"] - 0.3
    assert after[0]["loss"] == pytest.approx(before[-1]["loss"], abs=0.5)
    marker = json.loads((Path(spec.model_out) / protocol.MODEL_MARKER).read_text())
    assert marker["adapter"]["base"]["path"] == str(tiny_model_dir)


def test_kill_9_mid_job_resumes_from_the_adapter_checkpoint_loss_for_loss(tmp_path, lora_reference, tiny_model_dir,
                                                                          text_data):
    spec = lora_spec(tmp_path, tiny_model_dir, text_data, "killed", step_sleep_seconds=0.05)

    def kill_mid_job(proc, event):
        if event["event"] == "step" and event["step"] == 13:
            proc.send_signal(signal.SIGKILL)

    rc, first = run_worker(spec, kill_mid_job)
    assert rc == -signal.SIGKILL
    assert checkpoints.newest_complete(spec.run_dir)[0] == 10
    rc, second = run_worker(dataclasses.replace(spec, test_hooks={}))
    assert rc == protocol.EXIT_DONE, Path(spec.log_path).read_text()[-3000:]
    assert of(second, "job_start")[0]["resumed_from_step"] == 10
    reference = losses(lora_reference[1])
    resumed = losses(second)
    assert sorted(resumed) == list(range(11, max(reference) + 1))
    for step, loss in resumed.items():
        assert loss == pytest.approx(reference[step], abs=1e-5), f"step {step}"


def test_a_nan_with_lora_is_rolled_back_past(tmp_path, tiny_model_dir, text_data):
    spec = lora_spec(tmp_path, tiny_model_dir, text_data, "nan", inject_nonfinite={"step": 15, "value": "nan"})
    rc, events = run_worker(spec)
    assert rc == protocol.EXIT_ROLLBACK
    assert of(events, "anomaly")[0]["step"] == 15
    rc, events = run_worker(dataclasses.replace(spec, rollback={"bad_step": 15, "kind": "nan"}))
    assert rc == protocol.EXIT_DONE, Path(spec.log_path).read_text()[-3000:]
    start = of(events, "job_start")[0]
    assert start["resumed_from_step"] == 15 and start["skipped"] == [11, 15]
    assert all(math.isfinite(e["loss"]) for e in of(events, "step"))


def make_qwen2_dir(path: Path) -> Path:
    """A user's model directory, as from the hub: Qwen2 architecture, its own tokenizer and chat template."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from engine.worker.tiny_model import build_tokenizer, builtin_corpus

    tokenizer = build_tokenizer(builtin_corpus())
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(1)
    Qwen2ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_lora_on_a_qwen2_model_directory_with_a_chat_template(tmp_path):
    base = make_qwen2_dir(tmp_path / "Qwen2-stand-in")
    assert json.loads((base / "tokenizer_config.json").read_text()).get("chat_template") or \
        (base / "chat_template.jinja").exists()
    data = write_demo_file(tmp_path / "chats.jsonl", 200, "messages", seed=4)
    spec = lora_spec(tmp_path, base, data, "chats", fmt="messages")
    rc, events = run_worker(spec)
    assert rc == protocol.EXIT_DONE, Path(spec.log_path).read_text()[-3000:]
    start = of(events, "job_start")[0]
    assert start["trainable_params"] < start["total_params"] / 4
    steps = of(events, "step")
    assert steps[-1]["loss"] < steps[0]["loss"] - 0.3
    out = Path(spec.model_out)
    assert size(out) < size(base) / 2
    config = json.loads((out / "adapter_config.json").read_text())
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= \
        {name.rsplit(".", 1)[-1] for name in config["target_modules"]}


# --- through the daemon ---------------------------------------------------------------------------

DAEMON_SETTINGS = {"training": {**LORA_TRAINING, "learning_rate": 1e-2},
                   "checkpoint": {"every_steps": 15, "keep": 2}, "adapter": {"method": "lora", "r": 8},
                   "jobs": {"warm_worker": True}, "inbox": {"settle_seconds": 0.5}, "disk": {"reserve": 0},
                   "snapshots": {"every_files": 1, "daily_at": "off"}}


def adapter_bytes(folder: Path) -> bytes:
    return (folder / "adapter_model.safetensors").read_bytes()


def test_lora_through_the_daemon_versions_snapshots_rollback_and_the_pinned_base(tmp_path, tiny_model_dir):
    import shutil

    from engine.store import models, snapshots
    from workspaces import drop, files_in, make_workspace, run_cli, start_daemon, stop_daemon, text_lines, wait_for

    root = tmp_path / "ws"
    base = root / "models" / "base-tiny"
    shutil.copytree(tiny_model_dir, base)
    # The gate only warns: each version must become current here, and whether a tiny model's second file improves
    # on its own held-out lines depends on which lines they are (text_lines differ with every call in the process).
    ws = make_workspace(root, {**DAEMON_SETTINGS, "eval": {"gate": "warn"}}, model_dir=base)
    proc = start_daemon(ws, fake=False)
    try:
        drop(ws, "a.jsonl", text_lines(300, "a"), age=30)
        wait_for(lambda: files_in(ws, "done") == ["00001-a.jsonl"], timeout=240, what="the first file trained")
        taken = run_cli("snapshot", "--name", "first", "-w", str(ws.root), fake=False)
        assert taken.returncode == 0, taken.stderr
        drop(ws, "b.jsonl", text_lines(300, "b"), age=30)
        wait_for(lambda: len(files_in(ws, "done")) == 2, timeout=240, what="the second file trained")
        wait_for(lambda: any(s.source.get("model_version") == "00002-b" for s in snapshots.list_snapshots(ws)),
                 timeout=60, what="the snapshot after the second file")

        first, second = ws.models / "00001-a", ws.models / "00002-b"
        record = json.loads((ws.run_dir("00002-b") / "job.json").read_text())
        assert record["attempts"][-1]["model_in"] == str(first)  # the second job went on from the first adapter
        assert models.current(ws)["version"] == "00002-b"
        assert size(second) < size(base) / 2
        status = json.loads(run_cli("status", "--json", "-w", str(ws.root), fake=False).stdout)
        assert status["model"]["adapter"]["method"] == "lora" and status["model"]["adapter"]["r"] == 8
        exported = run_cli("export", str(tmp_path / "merged"), "--merged", "-w", str(ws.root), fake=False)
        assert exported.returncode == 0, exported.stderr
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        snaps = {s.source.get("model_version"): s for s in snapshots.list_snapshots(ws)}
        assert snaps["00001-a"].manifest["base"]["path"] == str(base)
        assert base.is_dir(), "the base every version needs is never pruned"

        back = run_cli("rollback", snaps["00001-a"].name, "-w", str(ws.root), fake=False)
        assert back.returncode == 0, back.stderr
        assert adapter_bytes(ws.root / models.current(ws)["path"]) == adapter_bytes(first)

        ok = run_cli("verify", snaps["00002-b"].name, "-w", str(ws.root), fake=False)
        assert ok.returncode == 0, ok.stdout + ok.stderr
        weights = base / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x01
        weights.chmod(0o644)
        weights.write_bytes(bytes(data))
        bad = run_cli("verify", snaps["00002-b"].name, "-w", str(ws.root), fake=False)
        assert bad.returncode == 1
        assert f"base {base}: model.safetensors does not match" in bad.stdout + bad.stderr
    finally:
        assert stop_daemon(proc) == 0


def test_a_method_changed_mid_stream_holds_the_queue_until_it_is_put_back(tmp_path):
    from engine.core import config
    from engine.store import bases, models
    from engine.core.config import render_template
    from workspaces import drop, files_in, make_workspace, start_daemon, stop_daemon, text_lines, wait_for

    ws = make_workspace(tmp_path / "ws", {**DAEMON_SETTINGS, "adapter": {"method": "full"}})
    adapter = ws.models / "00001-a"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{}")
    pinned = bases.pin(bases.record(ws, ws.models / "base-fake"))
    (adapter / protocol.MODEL_MARKER).write_text(json.dumps({"job_id": "00001-a", "adapter": {
        "method": "lora", "r": 8, "alpha": 32, "target_modules": "all-linear", "modules_to_save": [],
        "base": pinned}}))
    models.set_current(ws, "local", "models/00001-a", "00001-a")
    proc = start_daemon(ws)
    try:
        drop(ws, "b.jsonl", text_lines(20))
        status = lambda: json.loads(ws.status_path.read_text())["daemon"] if ws.status_path.exists() else {}
        held = wait_for(lambda: status().get("state") == "blocked" and status(), what="blocked on the change")
        assert "adapter.method = 'full' in traind.toml, but the current model 00001-a is a lora adapter" \
            in held["reason"] and "traind rebase" in held["reason"]
        assert files_in(ws, "done") == []
        ws.config_path.write_text(render_template(config.from_dict({**DAEMON_SETTINGS})))
        wait_for(lambda: files_in(ws, "done") == ["00001-b.jsonl"], what="trained once [adapter] is back")
    finally:
        assert stop_daemon(proc) == 0


# --- rebase -----------------------------------------------------------------------------------------

def adapter_workspace(root: Path, adapter_dir: Path, base: Path, settings: dict):
    """A workspace whose current model is a copy of a trained adapter, pinned to `base` for real."""
    import shutil

    from engine.store import bases, models
    from workspaces import make_workspace

    ws = make_workspace(root, settings, model_dir=base)
    version = ws.models / "00001-a"
    shutil.copytree(adapter_dir, version)
    marker = json.loads((version / protocol.MODEL_MARKER).read_text())
    marker["adapter"]["base"] = bases.pin(bases.record(ws, base))
    (version / protocol.MODEL_MARKER).write_text(json.dumps(marker))
    models.set_current(ws, "local", "models/00001-a", "00001-a", job_id="00001-a")
    return ws


def test_rebase_merges_the_adapter_into_a_new_base_and_a_new_method_may_start(tmp_path, lora_reference,
                                                                             tiny_model_dir):
    from engine.core import config
    from engine.store import bases, models
    from workspaces import run_cli, start_daemon, stop_daemon, wait_for

    spec, _ = lora_reference
    ws = adapter_workspace(tmp_path / "ws", Path(spec.model_out), tiny_model_dir, {"adapter": {"method": "full"}})
    plan, problem = bases.plan(ws, ws.load_config().adapter)
    assert plan is None and "changing [adapter] mid-stream is refused" in problem

    daemon = start_daemon(ws)
    try:
        wait_for(lambda: ws.status_path.exists(), what="the daemon up")
        refused = run_cli("rebase", "-w", str(ws.root))
        assert refused.returncode == 1 and "stop it first" in refused.stderr
    finally:
        assert stop_daemon(daemon) == 0

    done = run_cli("rebase", "-w", str(ws.root), fake=False)
    assert done.returncode == 0, done.stderr
    version = models.current(ws)["version"]
    assert version.startswith("rebase-") and "merged its adapter into the base" in done.stdout
    rebased = ws.models / version
    assert (rebased / "model.safetensors").exists() and not (rebased / "adapter_config.json").exists()
    assert bases.plan(ws, config.AdapterConfig(method="full")) == (None, None)
    plan, problem = bases.plan(ws, config.AdapterConfig(method="lora", r=4))
    assert problem is None and plan["adapter_in"] is None and plan["base"]["path"] == str(rebased)
    assert (ws.models / "00001-a").is_dir(), "the old chain stays restorable"

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([[5, 6, 7, 8, 9]])
    merged = AutoModelForCausalLM.from_pretrained(rebased).eval()
    chained = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), Path(spec.model_out)).eval()
    with torch.no_grad():
        assert (merged(ids).logits - chained(ids).logits).abs().max() < 1e-4


def test_rebase_of_a_full_fine_tune_links_its_files(tmp_path, tiny_model_dir):
    import shutil

    from engine.core import config
    from engine.store import bases, models
    from workspaces import make_workspace, run_cli

    ws = make_workspace(tmp_path / "ws", {"adapter": {"method": "lora"}}, model_dir=tiny_model_dir)
    full = ws.models / "00001-a"
    shutil.copytree(tiny_model_dir, full)
    (full / protocol.MODEL_MARKER).write_text(json.dumps({"job_id": "00001-a", "step": 3}))
    models.set_current(ws, "local", "models/00001-a", "00001-a")
    assert bases.plan(ws, config.AdapterConfig(method="lora"))[1] is not None
    done = run_cli("rebase", "-w", str(ws.root))
    assert done.returncode == 0, done.stderr
    rebased = ws.models / models.current(ws)["version"]
    assert (rebased / "model.safetensors").stat().st_ino == (full / "model.safetensors").stat().st_ino
    plan, problem = bases.plan(ws, config.AdapterConfig(method="lora"))
    assert problem is None and plan["base"]["path"] == str(rebased)


def test_lora_data_parallel_in_two_processes(tmp_path, tiny_model_dir):
    from workspaces import drop, files_in, make_workspace, run_cli, text_lines

    settings = {**DAEMON_SETTINGS, "training": {**DAEMON_SETTINGS["training"], "processes": 2},
                "snapshots": {"daily_at": "off"}}
    ws = make_workspace(tmp_path / "ws", settings, model_dir=tiny_model_dir)
    drop(ws, "a.jsonl", text_lines(400, "a"))
    result = run_cli("daemon", "--once", "-w", str(ws.root), fake=False)
    assert result.returncode == 0, result.stderr[-3000:]
    assert files_in(ws, "done") == ["00001-a.jsonl"]
    version = ws.models / "00001-a"
    marker = json.loads((version / protocol.MODEL_MARKER).read_text())
    assert marker["adapter"]["method"] == "lora" and (version / "adapter_model.safetensors").exists()
    metrics = [json.loads(line) for line in (ws.run_dir("00001-a") / "metrics.jsonl").read_text().splitlines()]
    start = next(e for e in metrics if e["event"] == "job_start")
    assert start["method"] == "lora" and start["trainable_params"] < start["total_params"] / 4
    losses_seen = [e["loss"] for e in metrics if e["event"] == "step"]
    assert losses_seen and losses_seen[-1] < losses_seen[0]
