"""QLoRA end to end in the real worker, on a CUDA GPU: the base loaded in 4-bit NF4 (bitsandbytes), a LoRA
adapter trained on it, and only the adapter checkpointed and saved.

Skipped without CUDA and bitsandbytes (the `gpu` extra); bench/gpu_check.sh runs it on a device machine.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import statistics
from pathlib import Path

import pytest

from engine.core import protocol
from engine.store import checkpoints
from worker_runs import TRAINING, make_spec, of, run_worker


def qlora_unavailable() -> str | None:
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed"
    import torch

    return None if torch.cuda.is_available() else "no CUDA GPU"


UNAVAILABLE = qlora_unavailable()
pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(UNAVAILABLE is not None, reason=f"QLoRA needs CUDA and bitsandbytes: {UNAVAILABLE}")]

QLORA = {"method": "qlora", "r": 8, "alpha": 16, "dropout": 0.05, "target_modules": "all-linear",
         "modules_to_save": []}


def test_a_qlora_job_trains_a_4bit_base_and_saves_only_the_adapter(tmp_path, tiny_model_dir, text_data):
    spec = make_spec(tmp_path, tiny_model_dir, "text", text_data, "qlora")
    pinned = {"path": str(tiny_model_dir), "content_hash": "0" * 64, "hash_algorithm": "blake3"}
    spec = dataclasses.replace(spec, training={**TRAINING, "learning_rate": 1e-2},
                               adapter={**QLORA, "base": pinned, "adapter_in": None})
    rc, events = run_worker(spec, timeout=240)
    assert rc == protocol.EXIT_DONE, Path(spec.log_path).read_text()[-3000:]

    start = of(events, "job_start")[0]
    assert start["method"] == "qlora" and start["device"].startswith("cuda")
    assert 0 < start["trainable_params"] < start["total_params"]
    losses = [e["loss"] for e in of(events, "step")]
    assert statistics.mean(losses[-3:]) < losses[0] - 0.3, f"the adapter should visibly learn: {losses}"

    # Every checkpoint holds the adapter and its optimizer state, never the (4-bit or any) base weights.
    complete = checkpoints.complete_checkpoints(spec.run_dir)
    assert complete and complete[-1][0] == start["total_steps"]
    for _, ckpt in complete:
        names = {p.name for p in ckpt.iterdir()}
        assert "adapter_model.safetensors" in names, names
        assert not names & {"model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"}, names
        assert (ckpt / "optimizer.pt").stat().st_size < 3 * (ckpt / "adapter_model.safetensors").stat().st_size

    # The version is the adapter alone, pinned to the base by path, and loads onto it with peft.
    out = Path(spec.model_out)
    marker = json.loads((out / protocol.MODEL_MARKER).read_text())
    assert marker["adapter"]["method"] == "qlora" and marker["adapter"]["base"]["path"] == str(tiny_model_dir)
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(marker["files"])
    assert not any(name.startswith("model") and name.endswith(".safetensors") for name in marker["files"])

    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    assert torch.isfinite(model(torch.tensor([[5, 6, 7, 8]])).logits).all()
