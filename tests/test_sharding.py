"""FSDP2 sharding in the real worker: two ranks over gloo on this CPU, the real tiny model.

What each rank holds is read from the ranks themselves; the published model is
compared with what the same job gives with DDP; sharded checkpoints resume
exactly, on the same or another number of ranks. make test runs one case of
each; the other variants (a save cut short, a NaN before any checkpoint, a
resume as replicas, two machines) are `-m long`.
"""

from __future__ import annotations

import dataclasses
import os
import re
import signal
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader

from engine.core import protocol, testing
from engine.store import checkpoints
from engine.worker import sharding
from worker_runs import TRAINING, eval_suite, losses, make_spec, of, run_worker, without_shared_fork_server

pytestmark = pytest.mark.e2e

FSDP = {"method": "fsdp", "reshard_after_forward": True, "cpu_offload": False, "wrap_modules": []}
# fp32, one micro-batch of 4 a rank, gradients clipped (the norm of the whole, across shards), a checkpoint every
# 4 steps
SHARDED_TRAINING = {**TRAINING, "batch_size": 4, "precision": "fp32", "max_grad_norm": 0.5}
CHECKPOINT = {"every_steps": 4, "keep": 3}


def spec_for(tmp: Path, model: Path, data: Path, name: str, sharded: bool = True, **hooks) -> protocol.JobSpec:
    """The job, its starting model and its candidate measured on the eval suite (the file itself as an earlier
    source: nothing held out, so the rows trained are the same with or without it)."""
    spec = make_spec(tmp, model, "text", data, name, checkpoint=CHECKPOINT, **hooks)
    return dataclasses.replace(spec, training=SHARDED_TRAINING, sharding=FSDP if sharded else None,
                               eval=eval_suite(data, 94))


def weights(spec: protocol.JobSpec) -> dict[str, torch.Tensor]:
    return load_file(Path(spec.model_out) / "model.safetensors")


def run(spec: protocol.JobSpec, processes: int = 2, **kw) -> list[dict]:
    rc, events = run_worker(spec, processes=processes, timeout=240, **kw)
    assert rc == protocol.EXIT_DONE, Path(spec.log_path).read_text()[-4000:]
    return events


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from engine.data.demo_data import write_demo_file

    # 88 packed rows: 11 full steps of two ranks x 4 (no step short of rows, so one rank x 8 sees the same batches)
    return write_demo_file(tmp_path_factory.mktemp("data") / "text.jsonl", 94, "text", seed=5)


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory, tiny_model_dir, data):
    spec = spec_for(tmp_path_factory.mktemp("fsdp"), tiny_model_dir, data, "fsdp")
    return spec, run(spec)


def test_each_rank_holds_half_and_the_model_equals_ddps(fsdp_run, tmp_path, tiny_model_dir, data):
    spec, events = fsdp_run
    start = of(events, "job_start")[0]
    assert start["sharding"]["method"] == "fsdp" and start["sharding"]["ranks"] == 2
    # what each rank says it holds, from its own shards
    held = {int(r): (int(n.replace(",", "")), int(t.replace(",", "")))
            for r, n, t in re.findall(r"rank (\d) holds ([\d,]+) of ([\d,]+) parameters", Path(spec.log_path).read_text())}
    assert sorted(held) == [0, 1]
    total = held[0][1]
    for own, whole in held.values():
        assert whole == total and 0.45 * total <= own <= 0.55 * total
    # only rank 0 read the weights (the host holds one copy): rank 1 had the model's shape, and its shards from rank 0
    assert "rank 1 read no weights: its shards came from rank 0" in Path(spec.log_path).read_text()

    norms = [e["grad_norm"] for e in of(events, "step")]
    assert max(norms) > SHARDED_TRAINING["max_grad_norm"], "clipping across shards never acted"
    ddp = spec_for(tmp_path, tiny_model_dir, data, "ddp", sharded=False)
    ddp_events = run(ddp)
    evaluated = [(e["phase"], round(e["loss"], 5)) for e in of(events, "eval")]
    assert [phase for phase, _ in evaluated] == ["before", "after"]
    assert evaluated == [(e["phase"], round(e["loss"], 5)) for e in of(ddp_events, "eval")]
    sharded, replicated = weights(spec), weights(ddp)
    start_weights = load_file(tiny_model_dir / "model.safetensors")
    assert sharded.keys() == replicated.keys()
    for name, tensor in sharded.items():
        assert torch.allclose(tensor, replicated[name], atol=1e-5), name
    assert any(not torch.equal(sharded[n], start_weights[n]) for n in start_weights), "training changed nothing"
    # a plain Hugging Face folder
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(spec.model_out)


def test_checkpoints_are_sharded_one_file_a_rank(fsdp_run):
    spec, _ = fsdp_run
    step, newest = checkpoints.newest_complete(spec.run_dir)
    assert sharding.is_sharded_checkpoint(newest)
    marker = checkpoints.read_marker(newest)
    shards = sorted(rel for rel in marker["files"] if rel.endswith(".distcp"))
    assert len(shards) == 2, marker["files"]
    assert {"rng_state_0.pth", "rng_state_1.pth", "scheduler.pt", "trainer_state.json"} <= set(marker["files"])
    assert not any(rel.startswith(("model.", "optimizer.")) for rel in marker["files"]), "nothing gathered"
    assert set(marker["hashes"]) >= {*shards, f"{sharding.SHARDED_DIR}/{sharding.METADATA}"}
    assert checkpoints.untrusted_pickles(newest) == []  # each rank's hashes of its own shard, as rank 0 reads them
    # what the disk gate counts for the next save: every rank's shard
    assert checkpoints.size_on_disk(newest) > sum(p.stat().st_size for p in newest.rglob("*.distcp"))


def kill_group_after(step: int):
    def kill(proc, event):
        if event["event"] == "step" and event["step"] == step:
            os.killpg(proc.pid, signal.SIGKILL)
    return kill


def test_kill_9_mid_file_resumes_to_the_uninterrupted_weights(fsdp_run, tmp_path, tiny_model_dir, data):
    reference, reference_events = fsdp_run
    spec = spec_for(tmp_path, tiny_model_dir, data, "killed", step_sleep_seconds=0.05)
    rc, first = run_worker(spec, kill_group_after(10), processes=2, timeout=240)
    assert rc == -signal.SIGKILL
    second = run(spec)
    assert of(second, "job_start")[0]["resumed_from_step"] == 8
    whole, resumed = losses(reference_events), losses(second)
    assert sorted(resumed) == list(range(9, max(whole) + 1))
    assert resumed == {s: whole[s] for s in resumed}
    assert (Path(spec.model_out) / "model.safetensors").read_bytes() == \
        (Path(reference.model_out) / "model.safetensors").read_bytes()


@pytest.mark.long
def test_a_sharded_save_cut_short_is_never_resumed_from(fsdp_run, tmp_path, tiny_model_dir, data, monkeypatch):
    """kill -9 of one rank right after its shard of checkpoint-8 is written: no marker, so the next attempt
    removes the half checkpoint and resumes from checkpoint-4, to the same weights."""
    reference, _ = fsdp_run
    without_shared_fork_server(monkeypatch)  # the crash point is read when the worker's modules load
    flag = tmp_path / "crash-shard"
    monkeypatch.setenv(testing.ENV, testing.with_switches(os.environ, crash_at=f"shard:{flag}")[testing.ENV])
    spec = spec_for(tmp_path, tiny_model_dir, data, "cut")

    def arm(proc, event):
        if event["event"] == "checkpoint" and event["step"] == 4:
            flag.touch()

    rc, first = run_worker(spec, arm, processes=2, timeout=300)
    assert rc != protocol.EXIT_DONE and not flag.exists()
    assert [e["step"] for e in of(first, "checkpoint")] == [4]
    half = checkpoints.checkpoint_path(spec.run_dir, 8)
    assert any(half.rglob("*.distcp")) and not checkpoints.is_complete(8, half)

    monkeypatch.setenv(testing.ENV, testing.with_switches(os.environ, crash_at=None).get(testing.ENV, "{}"))
    second = run(spec)
    assert of(second, "job_start")[0]["resumed_from_step"] == 4
    assert "removed incomplete checkpoint checkpoint-8" in Path(spec.log_path).read_text()
    assert (Path(spec.model_out) / "model.safetensors").read_bytes() == \
        (Path(reference.model_out) / "model.safetensors").read_bytes()


@pytest.mark.parametrize("bad,base", [(10, 8), pytest.param(3, 0, marks=pytest.mark.long)],
                         ids=["after-checkpoint-8", "before-any-checkpoint"])
def test_a_nan_on_one_rank_rolls_every_rank_back_together(tmp_path, tiny_model_dir, data, bad, base):
    """Back to the newest complete sharded checkpoint before the bad step, or, before any, to the starting model."""
    spec = spec_for(tmp_path, tiny_model_dir, data, "nan", inject_nonfinite={"step": bad, "value": "nan", "rank": 1})
    rc, first = run_worker(spec, processes=2, timeout=240)
    assert rc == protocol.EXIT_ROLLBACK, Path(spec.log_path).read_text()[-3000:]
    [anomaly] = of(first, "anomaly")
    # rank 0's own loss was finite: the NaN reached it through the reduced gradients
    assert anomaly["step"] == bad and anomaly["loss"] is not None and anomaly["kind"] == "nan"
    assert max(e["step"] for e in of(first, "step")) == bad - 1

    second = run(dataclasses.replace(spec, rollback={"bad_step": bad, "kind": "nan"}))
    start = of(second, "job_start")[0]
    assert start["resumed_from_step"] == bad and start["rolled_back_from"] == base
    assert start["skipped"] == [base + 1, bad]
    assert [e["step"] for e in of(second, "step")] == list(range(bad + 1, start["total_steps"] + 1))
    log = Path(spec.log_path).read_text()
    resumed = re.findall(rf"(?<!already done, )resuming from checkpoint-{bad}\b", log)  # (ranks' lines interleave)
    assert len(resumed) == 2, "each rank resumes from the derived checkpoint"
    for name, tensor in weights(spec).items():
        assert torch.isfinite(tensor).all(), name


@pytest.mark.parametrize("ranks,then", [pytest.param(1, None, marks=pytest.mark.long),
                                        (1, {**FSDP, "cpu_offload": True}),
                                        pytest.param(2, None, marks=pytest.mark.long)],
                         ids=["one-replica", "one-fsdp-cpu-offload", "two-ddp"])
def test_a_two_rank_checkpoint_resumes_on_one_rank_or_as_replicas(fsdp_run, tmp_path, tiny_model_dir, data, ranks,
                                                                   then):
    """Two ranks of micro-batch 4 killed after checkpoint-8; then one rank of micro-batch 8 (the same examples a
    step), as a replica or sharded with its state on the host, or two DDP replicas, resume from the shards and end
    where the uninterrupted two-rank run ends."""
    reference, reference_events = fsdp_run
    spec = spec_for(tmp_path, tiny_model_dir, data, "shrunk", step_sleep_seconds=0.05)
    rc, _ = run_worker(spec, kill_group_after(10), processes=2, timeout=240)
    assert rc == -signal.SIGKILL
    one = dataclasses.replace(spec, training={**SHARDED_TRAINING, "batch_size": 8 // ranks}, sharding=then,
                              test_hooks={})
    second = run(one, processes=ranks)
    start = of(second, "job_start")[0]
    assert start["resumed_from_step"] == 8
    assert (start["sharding"] or {}).get("ranks") == (1 if then else None)
    whole = losses(reference_events)
    for step, loss in losses(second).items():
        assert loss == pytest.approx(whole[step], abs=1e-4), step
    got, expected = weights(one), weights(reference)
    for name, tensor in expected.items():
        assert torch.allclose(got[name], tensor, atol=1e-5), name


def test_lora_with_fsdp_shards_the_base_and_publishes_the_adapter(tmp_path, tiny_model_dir, data):
    from test_adapters import LORA

    def lora(name: str, sharded: bool) -> protocol.JobSpec:
        spec = spec_for(tmp_path, tiny_model_dir, data, name, sharded)
        base = {"path": str(tiny_model_dir), "content_hash": "0" * 64, "hash_algorithm": "blake3"}
        # two micro-batches of 2 a step: each reduce-scattered as it comes
        training = {**SHARDED_TRAINING, "learning_rate": 1e-2, "batch_size": 2, "gradient_accumulation_steps": 2}
        return dataclasses.replace(spec, adapter={**LORA, "dropout": 0.0, "base": base, "adapter_in": None},
                                   training=training)

    sharded, replicated = lora("lora-fsdp", True), lora("lora-ddp", False)
    events = run(sharded)
    run(replicated)
    start = of(events, "job_start")[0]
    assert start["method"] == "lora" and start["sharding"]["ranks"] == 2
    assert start["sharding"]["params_per_rank"] < 0.55 * start["sharding"]["params_total"]
    newest = checkpoints.newest_complete(sharded.run_dir)[1]
    saved = FileSystemReader(newest / sharding.SHARDED_DIR).read_metadata().state_dict_metadata
    weights_saved = [k for k in saved if k.startswith("model.")]
    assert weights_saved and all("lora_" in k for k in weights_saved), "the frozen base is not in a checkpoint"
    adapter = "adapter_model.safetensors"
    got = load_file(Path(sharded.model_out) / adapter)
    expected = load_file(Path(replicated.model_out) / adapter)
    assert got.keys() == expected.keys() and got
    for name, tensor in expected.items():
        assert torch.allclose(got[name], tensor, atol=1e-5), name


@pytest.mark.parametrize("layout", ["two-processes", pytest.param("two-nodes", marks=pytest.mark.long)])
def test_pause_checkpoint_now_stop_and_start_with_sharded_state(tmp_path, tiny_model_dir, layout):
    """The daemon, the real worker on two ranks (two processes on this machine, or one on each of two "machines"),
    sharding = "fsdp": pause holds every rank, a checkpoint asked for while paused is written as shards, stop
    checkpoints on the way out, start resumes from it, and the published model is a plain one."""
    from test_end_to_end_control import SETTINGS, all_finite, demo_lines, of_kind, status
    from test_nodes import machines, start_node, stop_node
    from workspaces import drop, files_in, make_workspace, run_cli, start_daemon, stop_daemon, wait_for

    two_nodes = layout == "two-nodes"
    settings = machines(2) if two_nodes else {**SETTINGS, "training": {**SETTINGS["training"], "processes": 2}}
    settings["distributed"] = {**settings.get("distributed", {}), "sharding": "fsdp"}
    ws = make_workspace(tmp_path / "ws", settings, model_dir=tiny_model_dir)
    drop(ws, "data.jsonl", demo_lines(1200, seed=8))
    job = "00001-data"
    follower = start_node(ws, "node-b") if two_nodes else None
    proc = start_daemon(ws, fake=False, hooks={"step_sleep_seconds": 0.03})
    try:
        wait_for(lambda: (status(ws)["job"] or {}).get("step", 0) >= 3, timeout=180, what="training")
        assert of_kind(ws, job, "job_start")[0]["sharding"]["ranks"] == 2
        assert run_cli("pause", "-w", str(ws.root)).returncode == 0
        held = status(ws)["job"]["step"]
        assert run_cli("checkpoint", "-w", str(ws.root), timeout=120).returncode == 0
        wait_for(lambda: held in [c["step"] for c in of_kind(ws, job, "checkpoint")], timeout=60,
                 what="the checkpoint asked for while paused")
        path = checkpoints.checkpoint_path(ws.run_dir(job), held)
        assert checkpoints.is_complete(held, path) and sharding.is_sharded_checkpoint(path)
        assert status(ws)["job"]["step"] == held
        assert run_cli("resume", "-w", str(ws.root)).returncode == 0
        wait_for(lambda: (status(ws)["job"] or {}).get("step", 0) >= held + 3, timeout=120, what="training again")
        assert run_cli("stop", "-w", str(ws.root), timeout=120).returncode == 0
        stop_step = of_kind(ws, job, "job_end")[-1]["step"]
        assert stop_step in [c["step"] for c in of_kind(ws, job, "checkpoint")]
        assert run_cli("start", "-w", str(ws.root)).returncode == 0
        wait_for(lambda: files_in(ws, "done") == [f"{job}.jsonl"], timeout=300, what="the job to finish")
        assert of_kind(ws, job, "job_start")[-1]["resumed_from_step"] == stop_step
    finally:
        assert stop_daemon(proc) == 0
        if follower:
            assert stop_node(follower) == 0
    assert all_finite(ws.models / job / "model.safetensors")
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(ws.models / job)
