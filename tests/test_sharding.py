"""FSDP2 sharding in the real worker: two ranks over gloo on this CPU, the real tiny model.

What each rank holds is read from the ranks themselves; the published model is
compared with what the same job gives with DDP; sharded checkpoints resume
exactly, on the same or another number of ranks.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from engine.core import protocol
from engine.store import checkpoints
from engine.worker import sharding
from worker_runs import TRAINING, make_spec, of, run_worker

pytestmark = pytest.mark.e2e

FSDP = {"method": "fsdp", "reshard_after_forward": True, "cpu_offload": False, "wrap_modules": []}
# fp32, one micro-batch of 4 a rank, gradients clipped (the norm of the whole, across shards), a checkpoint every
# 4 steps
SHARDED_TRAINING = {**TRAINING, "batch_size": 4, "precision": "fp32", "max_grad_norm": 0.5}
CHECKPOINT = {"every_steps": 4, "keep": 3}


def spec_for(tmp: Path, model: Path, data: Path, name: str, sharded: bool = True, **hooks) -> protocol.JobSpec:
    spec = make_spec(tmp, model, "text", data, name, checkpoint=CHECKPOINT, **hooks)
    return dataclasses.replace(spec, training=SHARDED_TRAINING, sharding=FSDP if sharded else None)


def weights(spec: protocol.JobSpec) -> dict[str, torch.Tensor]:
    return load_file(Path(spec.model_out) / "model.safetensors")


def run(spec: protocol.JobSpec, processes: int = 2, **kw) -> list[dict]:
    rc, events = run_worker(spec, processes=processes, timeout=240, **kw)
    assert rc == protocol.EXIT_DONE, Path(spec.log_path).read_text()[-4000:]
    return events


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from engine.data.demo_data import write_demo_file

    return write_demo_file(tmp_path_factory.mktemp("data") / "text.jsonl", 96, "text", seed=5)


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

    norms = [e["grad_norm"] for e in of(events, "step")]
    assert max(norms) > SHARDED_TRAINING["max_grad_norm"], "clipping across shards never acted"
    ddp = spec_for(tmp_path, tiny_model_dir, data, "ddp", sharded=False)
    run(ddp)
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
