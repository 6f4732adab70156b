"""Benchmark for a GPU: full fine-tune, LoRA, LoRA with gradient checkpointing and QLoRA through the real worker.

A random-init model of Qwen2.5-0.5B's shape (or, with --size 1.5b, Qwen2.5-1.5B's: hidden 1536, 28 layers;
vocabulary 151,936, tied embeddings, saved in bf16, with the tiny model's tokenizer), built on the GPU in a
temp directory, and a text file that packs into exactly steps x batch blocks. Each case is one job through
the real worker (spec on stdin, events on a pipe), bf16 where the GPU has it, no checkpoint:

- full: every parameter (fp32 master weights, AdamW);
- lora: r 16, alpha 32, every linear layer, the base frozen in bf16;
- lora+gc: the same with training.gradient_checkpointing (skipped, saying so, where this checkout's [training]
  has no such key);
- qlora: the base in 4-bit NF4 (bitsandbytes); skipped, saying so, without CUDA and bitsandbytes.

Per case: tokens/s (steady state, from the step events after --warmup steps); the peak GPU memory the worker
reports in job_end (`peak_memory`, torch.cuda.max_memory_allocated) and the largest NVML reading while it ran
(the worker's own processes where NVML can see its pid, else the device's used memory above what it was before
the job); the memory estimate from job_start (`memory_estimate`) beside the measured peak; and MFU, model FLOPs
over the H200's dense bf16 peak (989 TFLOP/s), with per token, for a sequence of s tokens, L layers, hidden d,
N the weights that take part in a matmul (every parameter but an untied input embedding, a lookup) and N_a the
adapter's:

    full:        6 N + 12 L d s            forward 2N, backward 4N (activation gradients 2N, weight gradients 2N)
    lora, qlora: 4 N + 6 N_a + 12 L d s    the frozen weights still pass activation gradients back (2N) but get no
                                           weight gradient; the adapter gets all three (6 N_a)

12 L d s is attention's scores and weighted sum, forward and backward (PaLM's count). The recomputed forward of
gradient checkpointing is not model FLOPs: it lowers MFU, as it should; QLoRA's dequantisation is not counted.

The JSON document (`--out FILE`) is rewritten after each case, so a run cut short keeps what it measured.

    python bench/gpu_adapters.py [--size 0.5b|1.5b] [--steps 30] [--batch 8] [--seq 1024] [--out FILE] [--json]
    python bench/gpu_adapters.py --smoke        # tiny shapes, 2 steps: the script itself, on a CPU too
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from adapter_jobs import Shape, build_model, job_spec, of, steady_tokens_per_s, write_blocks_file
from worker_driver import Worker

from engine.core.config import TrainingConfig
from engine.core.resources import format_bytes
from engine.store.workspace import Workspace

PEAK_FLOPS = 989e12  # H200 (and H100 SXM) dense bf16 tensor-core peak, FLOP/s
QWEN_VOCAB = 151_936
SIZES = {  # Qwen2.5-0.5B and Qwen2.5-1.5B (their config.json), random init
    "0.5b": Shape(arch="qwen2", hidden=896, layers=24, intermediate=4864, heads=14, kv_heads=2, vocab=QWEN_VOCAB,
                  tie=True, dtype="bfloat16"),
    "1.5b": Shape(arch="qwen2", hidden=1536, layers=28, intermediate=8960, heads=12, kv_heads=2, vocab=QWEN_VOCAB,
                  tie=True, dtype="bfloat16"),
}
SMOKE = Shape(arch="qwen2", hidden=64, layers=2, intermediate=128, heads=4, kv_heads=2, tie=True, dtype="bfloat16")
CASES = {"full": ("full", {}), "lora": ("lora", {}), "lora+gc": ("lora", {"gradient_checkpointing": True}),
         "qlora": ("qlora", {})}


def flops_per_token(method: str, matmul_params: int, adapter_params: int, shape: Shape, seq: int) -> float:
    attention = 12 * shape.layers * shape.hidden * seq
    if method == "full":
        return 6 * matmul_params + attention
    return 4 * matmul_params + 6 * adapter_params + attention


def skip_reason(case: str, method: str, training: dict[str, Any], cuda: bool) -> str | None:
    known = {f.name for f in dataclasses.fields(TrainingConfig)}
    missing = sorted(set(training) - known)
    if missing:
        return f"training.{missing[0]} is not a key of this checkout's [training] (engine/core/config.py TrainingConfig)"
    if method == "qlora" and not (cuda and importlib.util.find_spec("bitsandbytes")):
        return "qlora needs CUDA and bitsandbytes: " + ("bitsandbytes is not installed" if cuda else "no CUDA here")
    return None


class GpuPeak(threading.Thread):
    """The largest NVML reading while a worker runs: the memory its processes hold, and the device's used memory."""

    def __init__(self, pid: int, interval: float = 0.2):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.worker = self.used = 0
        self.baseline: int | None = None
        self.done = threading.Event()

    def run(self) -> None:
        from engine.core.gpu import GpuMonitor

        with GpuMonitor(min_interval=0) as monitor:
            while monitor.mode == "gpu":
                devices = [d for d in monitor.sample([self.pid], force=True)["devices"] if not d["error"]]
                if devices:
                    used = sum(d["memory_used"] for d in devices)
                    self.baseline = used if self.baseline is None else self.baseline
                    self.used = max(self.used, used)
                    self.worker = max(self.worker, sum(d["worker_memory"] or 0 for d in devices))
                if self.done.wait(self.interval):
                    return

    def result(self) -> tuple[int | None, str | None]:
        if self.worker:
            return self.worker, "the worker's processes"
        if self.baseline is not None:
            return self.used - self.baseline, "device used memory above the baseline"
        return None, None


def run_case(ws: Workspace, base: Path, data: Path, n: int, case: str, facts: dict, shape: Shape,
             args: argparse.Namespace) -> dict[str, Any]:
    method, extra = CASES[case]
    training = {"max_seq_length": args.seq, "batch_size": args.batch, "learning_rate": 2e-4, "warmup_steps": 2,
                "packing_cross_document": True,  # full blocks: exactly the steps write_blocks_file made
                "seed": 7, "log_every_steps": 1, **extra}
    if (reason := skip_reason(case, method, training, facts["device"] == "cuda")) is not None:
        return {"skipped": reason}
    spec = job_spec(ws, base, data, f"{n:05d}-{case.replace('+', '-')}", method, training,
                    {"every_steps": 10**9, "every_minutes": 10**6}, r=args.r)
    t0 = time.monotonic()
    worker = Worker(spec)
    gpu = GpuPeak(worker.proc.pid)
    gpu.start()
    try:
        with worker:
            events = list(worker.events(timeout=args.event_timeout))
    except TimeoutError:
        return {"error": f"no event from the worker for {args.event_timeout} s (killed); see {spec.log_path}"}
    finally:
        gpu.done.set()
        gpu.join()
        shutil.rmtree(spec.model_out, ignore_errors=True)  # a 1.5B full model is 6 GB: not needed once measured
    if worker.returncode != 0:
        tail = Path(spec.log_path).read_text()[-1500:]
        return {"error": f"the worker exited {worker.returncode}", "log_tail": tail}
    start, end, steps = of(events, "job_start")[0], of(events, "job_end")[0], of(events, "step")
    tokens_per_s = steady_tokens_per_s(events, min(args.warmup, args.steps - 1))
    matmul_params = facts["params"] - (0 if facts["tied"] else facts["embedding_params"])
    adapter_params = start["trainable_params"] if method != "full" else 0
    flops = flops_per_token(method, matmul_params, adapter_params, shape, args.seq)
    cuda = start.get("device", "").startswith("cuda")
    estimate = start.get("memory_estimate")  # engine/ops/memory.py's, where this checkout's worker reports it
    estimate_total = estimate.get("total") if isinstance(estimate, dict) else None
    peak = end.get("peak_memory")
    nvml_peak, nvml_source = gpu.result()
    return {
        "method": method, "precision": start.get("precision"), "device": start.get("device"),
        "trainable_params": start["trainable_params"], "tokens_per_s": round(tokens_per_s, 1) if tokens_per_s else None,
        "flops_per_token": flops, "mfu": round(tokens_per_s * flops / PEAK_FLOPS, 4) if cuda and tokens_per_s else None,
        "peak_memory_bytes": peak, "memory_estimate_bytes": estimate_total,
        "estimate_over_peak": round(estimate_total / peak, 3) if estimate_total and peak else None,
        "nvml_peak_bytes": nvml_peak, "nvml_source": nvml_source,
        "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"], "job_wall_s": round(time.monotonic() - t0, 1),
    }


def size(value: int | None) -> str:
    return "-" if value is None else format_bytes(value)


def print_case(case: str, row: dict[str, Any]) -> None:
    if "skipped" in row or "error" in row:
        print(f"{case:<9} {'skipped' if 'skipped' in row else 'FAILED'}: {row.get('skipped') or row['error']}",
              flush=True)
        return
    mfu = "-" if row["mfu"] is None else f"{100 * row['mfu']:.1f}%"
    ratio = "-" if row["estimate_over_peak"] is None else f"{row['estimate_over_peak']:.2f}"
    print(f"{case:<9} {row['trainable_params']:>13,} {row['tokens_per_s'] or 0:>11,.0f} "
          f"{size(row['peak_memory_bytes']):>11} {size(row['memory_estimate_bytes']):>11} {ratio:>8} "
          f"{size(row['nvml_peak_bytes']):>11} {mfu:>7}"
          f"   loss {row['first_loss']:.2f} -> {row['last_loss']:.2f}", flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="0.5b", help="the model's shape (default 0.5b)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, 2 steps: to try the script, on a CPU too")
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)} (default all)")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps a job (default 30)")
    ap.add_argument("--batch", type=int, default=8, help="micro-batch (default 8)")
    ap.add_argument("--seq", type=int, default=1024, help="tokens a block (default 1024)")
    ap.add_argument("--warmup", type=int, default=3, help="first steps left out of tokens/s (default 3)")
    ap.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    ap.add_argument("--event-timeout", type=float, default=240, help="seconds without an event before a case is "
                    "given up and its worker killed (default 240)")
    ap.add_argument("--out", type=Path, help="write the JSON document here, rewritten after each case")
    ap.add_argument("--json", action="store_true", help="print the JSON document at the end")
    args = ap.parse_args(argv)
    if args.smoke:
        args.steps, args.batch, args.seq, args.warmup = 2, 2, 64, 1
    cases = args.cases.split(",")
    if unknown := sorted(set(cases) - set(CASES)):
        ap.error(f"--cases: unknown {', '.join(unknown)}; the cases are {', '.join(CASES)}")
    shape = SMOKE if args.smoke else SIZES[args.size]

    tmp = Path(tempfile.mkdtemp(prefix="traind-bench-gpu-adapters-"))
    try:
        t0 = time.monotonic()
        base = tmp / "base"
        facts = build_model(base, shape)
        data = write_blocks_file(tmp / "data.jsonl", base, args.steps * args.batch, args.seq)
        ws = Workspace.at(tmp / "ws")
        ws.create_folders()
        doc: dict[str, Any] = {
            "model": {"size": "smoke" if args.smoke else args.size, "shape": shape.describe(), **facts},
            "job": {"steps": args.steps, "batch": args.batch, "seq": args.seq, "warmup": args.warmup, "r": args.r},
            "peak_flops": PEAK_FLOPS, "setup_s": round(time.monotonic() - t0, 1), "cases": {},
        }
        print(f"model: {doc['model']['size']}, {shape.describe()}: {facts['params']:,} parameters, built on "
              f"{facts['device']} in {doc['setup_s']} s")
        print(f"job:   {args.steps} steps of {args.batch} x {args.seq} tokens, tokens/s from step {args.warmup}; "
              f"MFU against {PEAK_FLOPS / 1e12:.0f} TFLOP/s (H200 dense bf16)\n")
        print(f"{'case':<9} {'trainable':>13} {'tokens/s':>11} {'peak mem':>11} {'estimate':>11} {'est/peak':>8} "
              f"{'NVML peak':>11} {'MFU':>7}", flush=True)
        for n, case in enumerate(cases, start=1):
            doc["cases"][case] = row = run_case(ws, base, data, n, case, facts, shape, args)
            print_case(case, row)
            if args.out:
                args.out.write_text(json.dumps(doc, indent=2) + "\n")
        if args.json:
            print(json.dumps(doc, indent=2))
        return 1 if any("error" in row for row in doc["cases"].values()) else 0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
