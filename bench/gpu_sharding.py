"""Benchmark for a GPU: a model that does not fit as a replica, trained with fsdp + cpu_offload on one GPU.

A random-init model of TinyLlama-1.1B's shape (Llama, hidden 2048, 22 layers, intermediate 5632, 32 heads, 4 kv
heads; the tiny model's tokenizer), a full fine-tune in bf16 with AdamW through the real worker. The GPU is made
smaller than the replica needs (the worker's `gpu_memory_limit_bytes` test hook, torch's per-process memory
fraction: allocations past it raise CUDA's own out-of-memory error), halfway between engine/ops/memory.py's
estimate for a replica and for one rank with `sharding = "fsdp"`, `cpu_offload = true`:

- replica: expected to fail with CUDA out of memory (the worker's exit code for it);
- fsdp + cpu_offload: expected to train; its measured peak (job_end's `peak_memory`,
  torch.cuda.max_memory_allocated) beside its estimate (job_start's `memory_estimate`);
- qlora + fsdp + cpu_offload (CUDA and bitsandbytes only; no limit): the 4-bit base sharded with its storage
  dtype the compute dtype; reported, whatever its outcome, as what one GPU says of the FSDP + QLoRA recipe
  (across ranks it needs two GPUs).

    python bench/gpu_sharding.py [--steps 6] [--seq 1024] [--out FILE]
    python bench/gpu_sharding.py --smoke      # tiny shapes, no limit: the script itself, on a CPU too
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from adapter_jobs import Shape, build_model, job_spec, of, steady_tokens_per_s, write_blocks_file
from worker_driver import Worker

from engine.core import protocol
from engine.core.resources import format_bytes
from engine.ops import memory
from engine.store.workspace import Workspace

TINYLLAMA = Shape(arch="llama", hidden=2048, layers=22, intermediate=5632, heads=32, kv_heads=4, vocab=32000,
                  dtype="bfloat16")
SMOKE = Shape(arch="llama", hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2)
OFFLOAD = {"method": "fsdp", "reshard_after_forward": True, "cpu_offload": True, "wrap_modules": []}


def run_case(ws: Workspace, base: Path, data: Path, name: str, training: dict, sharding: dict | None,
             limit: int | None, method: str = "full") -> dict[str, Any]:
    spec = job_spec(ws, base, data, name, method, training, {"every_steps": 10**9, "every_minutes": 10**6})
    hooks = {"gpu_memory_limit_bytes": limit} if limit else {}
    spec = protocol.JobSpec(**{**spec.__dict__, "sharding": sharding, "test_hooks": hooks})
    t0 = time.monotonic()
    with Worker(spec) as worker:
        events = list(worker.events(timeout=600))
    start = (of(events, "job_start") or [{}])[0]
    end = (of(events, "job_end") or [{}])[0]
    estimate = (start.get("memory_estimate") or {}).get("total")
    peak = end.get("peak_memory")
    return {"exit_code": worker.returncode, "outcome": end.get("outcome") or (of(events, "error") or [{}])[0].get("kind"),
            "sharding": start.get("sharding"), "peak_memory_bytes": peak, "memory_estimate_bytes": estimate,
            "estimate_over_peak": round(estimate / peak, 3) if estimate and peak else None,
            "host_estimate_bytes": (start.get("memory_estimate") or {}).get("host"),
            "tokens_per_s": steady_tokens_per_s(events, 1), "wall_s": round(time.monotonic() - t0, 1),
            "log_tail": Path(spec.log_path).read_text()[-800:] if worker.returncode else None}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    shape = SMOKE if args.smoke else TINYLLAMA
    steps, seq = (2, 64) if args.smoke else (args.steps, args.seq)
    training = {"max_seq_length": seq, "batch_size": 1, "learning_rate": 1e-5, "warmup_steps": 1, "precision": "auto",
                "gradient_checkpointing": True, "packing_cross_document": True, "seed": 7, "log_every_steps": 1}
    with tempfile.TemporaryDirectory(prefix="traind-gpu-sharding-") as tmp:
        ws = Workspace.at(Path(tmp) / "ws")
        ws.create_folders()
        base = Path(tmp) / "base"
        facts = build_model(base, shape)
        data = write_blocks_file(Path(tmp) / "data.jsonl", base, steps, seq)
        precision = "bf16" if facts["device"] == "cuda" else "fp32"
        replica = memory.estimate_job(str(base), training, None, precision)
        offloaded = memory.estimate_job(str(base), training, None, precision, sharding=OFFLOAD, ranks=1)
        limit = None if args.smoke else (replica.total + offloaded.total) // 2
        print(f"{facts['params']:,} parameters ({shape.describe()}), full fine-tune, {precision}, AdamW; "
              f"estimated: replica {format_bytes(replica.total)}, fsdp + cpu_offload {format_bytes(offloaded.total)} "
              f"GPU + {format_bytes(offloaded.host)} host; the GPU limited to "
              f"{format_bytes(limit) if limit else 'nothing (smoke)'}", flush=True)
        result: dict[str, Any] = {"params": facts["params"], "limit_bytes": limit, "cases": {}}
        for name, sharding in (("replica", None), ("fsdp-cpu-offload", OFFLOAD)):
            row = run_case(ws, base, data, name, training, sharding, limit)
            result["cases"][name] = row
            shown = {k: v for k, v in row.items() if k != "log_tail"}
            print(f"{name}: {json.dumps(shown)}", flush=True)
            if row["log_tail"] and not (name == "replica" and limit):
                print(row["log_tail"])
            if args.out:
                args.out.write_text(json.dumps(result, indent=1))
        if facts["device"] == "cuda" and importlib.util.find_spec("bitsandbytes"):
            row = run_case(ws, base, data, "qlora-fsdp-cpu-offload", training, OFFLOAD, None, method="qlora")
            result["cases"]["qlora-fsdp-cpu-offload"] = row
            print(f"qlora-fsdp-cpu-offload: {json.dumps(row)}", flush=True)
            if args.out:
                args.out.write_text(json.dumps(result, indent=1))
    offload = result["cases"]["fsdp-cpu-offload"]
    replica_failed = result["cases"]["replica"]["exit_code"] != 0
    print(f"replica {'did not fit (as expected)' if replica_failed else 'trained'}; fsdp + cpu_offload "
          f"{'trained' if offload['exit_code'] == 0 else 'FAILED'}, peak {format_bytes(offload['peak_memory_bytes'] or 0)}"
          f" against {format_bytes(offload['memory_estimate_bytes'] or 0)} estimated")
    return 0 if offload["exit_code"] == 0 and (replica_failed or args.smoke) else 1


if __name__ == "__main__":
    sys.exit(main())
