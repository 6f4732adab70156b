"""Benchmark: a full fine-tune against LoRA on a ~100M-parameter model on this CPU, side by side in one run.

Builds a random-init Llama in a temp directory (by default hidden 768, 12 layers, intermediate 2560, 12 heads,
the tiny model's tokenizer and vocabulary, untied embeddings: 100.7M parameters, the exact count printed) and a
text file that packs into exactly steps x batch blocks of 128 tokens. Then one job each, `full` and `lora` (r 16,
alpha 32, every linear layer), through the real worker driven as the daemon drives it (spec on stdin, events on
a pipe), on the same file and hyper-parameters, with a checkpoint half way. Per method:

- tokens/s, steady state: from the worker's step events, from the end of step --warmup to the end of the last
  step, leaving out the step whose interval holds the half-way checkpoint's save;
- peak RSS of the worker process (its VmHWM, read every 0.1 s until it exits);
- the half-way checkpoint: its size on disk (engine.store.checkpoints.size_on_disk) and how long its save took;
- the version (the saved model directory, published as the daemon publishes it): its size;
- a snapshot (engine.store.snapshots.create) of a workspace whose current model is that version: how long it takes,
  the bytes it holds and the disk it adds; LoRA's holds the adapter and pins the base (manifest "base");

and the ratio lora / full of each. Prints a table (`--json` for one JSON document). About 4 minutes here.

The worker runs one torch thread by default: on a shared 2-core machine two threads stall each other whenever
another process takes a core (a job ran 1.7x faster on one thread than on two here, under a load of 2.3), and
both methods run under the same setting, so the ratios hold. `--threads 0` gives the worker every core.

    .venv/bin/python bench/adapters.py [--steps 20] [--batch 4] [--hidden 768] [--layers 12] [--threads 1] [--json]
    .venv/bin/python bench/adapters.py --hidden 128 --layers 2 --steps 6      # a smoke run, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from adapter_jobs import Shape, build_model, job_spec, of, steady_tokens_per_s, write_blocks_file
from worker_driver import Worker

from engine.store import checkpoints, models, snapshots
from engine.core.resources import dir_size
from engine.store.workspace import Workspace

METHODS = ("full", "lora")
SEQ = 128


def run_method(tmp: Path, base: Path, data: Path, method: str, args: argparse.Namespace) -> dict:
    ws = Workspace.at(tmp / f"ws-{method}")
    ws.create_folders()
    models.set_current(ws, "local", str(base), base.name)
    job_id = f"00001-{method}"
    middle = args.steps // 2
    training = {"max_seq_length": SEQ, "batch_size": args.batch, "seed": 7, "log_every_steps": 1,
                "packing_cross_document": True}  # full blocks: exactly the steps write_blocks_file made
    spec = job_spec(ws, base, data, job_id, method, training, {"every_steps": middle, "every_minutes": 10**6},
                    r=args.r)
    t0 = time.monotonic()
    with Worker(spec, threads=args.threads or None) as worker:
        events = list(worker.events(timeout=900))
    wall = time.monotonic() - t0
    if worker.returncode != 0:
        log = Path(spec.log_path).read_text()[-3000:]
        raise RuntimeError(f"{method}: the worker exited {worker.returncode}:\n{log}")
    start, steps = of(events, "job_start")[0], of(events, "step")
    if len(steps) != args.steps:
        raise RuntimeError(f"{method}: {len(steps)} steps, expected {args.steps}")
    step_at = {e["step"]: e for e in steps}
    saved = {e["step"]: e for e in of(events, "checkpoint")}[middle]

    version = models.publish(ws, job_id, file=data.name, loss=steps[-1]["loss"])
    before = dir_size(ws.root)
    t1 = time.perf_counter()
    snap = snapshots.create(ws, "manual", name=f"bench-{method}")
    snapshot_s = time.perf_counter() - t1
    return {
        "trainable_params": start["trainable_params"], "total_params": start["total_params"],
        "tokens_per_s": round(steady_tokens_per_s(events, args.warmup), 1),
        "peak_rss_bytes": worker.peak_rss,
        "checkpoint_bytes": checkpoints.size_on_disk(checkpoints.checkpoint_path(spec.run_dir, middle)),
        "checkpoint_save_s": round(saved["time"] - step_at[middle]["time"], 3),
        "version_bytes": dir_size(version),
        "snapshot_s": round(snapshot_s, 4),
        "snapshot_bytes": snap.size,
        "snapshot_disk_added_bytes": dir_size(ws.root) - before,
        "snapshot_pins_base": snap.manifest.get("base"),
        "first_loss": steps[0]["loss"], "last_loss": steps[-1]["loss"],
        "job_wall_s": round(wall, 1),
    }


FIGURES = (  # key, label, how a value is written
    ("tokens_per_s", "tokens/s (steady state)", lambda v: f"{v:,.1f}"),
    ("peak_rss_bytes", "peak RSS of the worker", lambda v: f"{v / 2**20:,.0f} MiB"),
    ("checkpoint_bytes", "checkpoint size", lambda v: f"{v / 2**20:,.1f} MiB"),
    ("checkpoint_save_s", "checkpoint save", lambda v: f"{v:.2f} s"),
    ("version_bytes", "version size", lambda v: f"{v / 2**20:,.1f} MiB"),
    ("snapshot_s", "snapshot time", lambda v: f"{v * 1000:,.1f} ms"),
    ("snapshot_bytes", "snapshot holds", lambda v: f"{v / 2**20:,.1f} MiB"),
    ("snapshot_disk_added_bytes", "snapshot adds on disk", lambda v: f"{v / 2**10:,.1f} KiB"),
)


def print_table(result: dict) -> None:
    model, job, full, lora = result["model"], result["job"], result["full"], result["lora"]
    threads = {0: "torch's default threads", 1: "1 torch thread"}.get(job["threads"], f"{job['threads']} torch threads")
    print(f"model:  {model['shape']}: {model['params']:,} parameters ({model['bytes'] / 2**20:,.0f} MiB)")
    print(f"lora:   r {job['r']}, alpha {2 * job['r']}, all linear layers: {lora['trainable_params']:,} trainable "
          f"({100 * lora['trainable_params'] / model['params']:.2f}% of the base)")
    print(f"job:    {job['steps']} optimizer steps of {job['batch']} x {SEQ} tokens, checkpoint at step "
          f"{job['checkpoint_step']}, steady state from step {job['warmup']}; {os.cpu_count()} CPUs, "
          f"{threads} in the worker\n")
    print(f"{'':<26}{'full':>14}{'lora':>14}{'lora/full':>12}")
    for key, label, fmt in FIGURES:
        ratio = result["ratio"][key]
        print(f"{label:<26}{fmt(full[key]):>14}{fmt(lora[key]):>14}{ratio:>12.3g}")
    print(f"{'loss, first -> last':<26}{full['first_loss']:>7.2f} -> {full['last_loss']:<4.2f}"
          f"{lora['first_loss']:>7.2f} -> {lora['last_loss']:.2f}")
    pinned = lora["snapshot_pins_base"]
    print(f"\nthe LoRA snapshot pins its base: {pinned['path']} "
          f"({pinned['hash_algorithm']} {pinned['content_hash'][:16]}...)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=20, help="optimizer steps a job (default 20)")
    ap.add_argument("--batch", type=int, default=4, help="micro-batch, blocks of 128 tokens (default 4)")
    ap.add_argument("--warmup", type=int, default=3, help="first steps left out of tokens/s (default 3)")
    ap.add_argument("--hidden", type=int, default=768, help="hidden size (default 768); heads = hidden / 64")
    ap.add_argument("--layers", type=int, default=12, help="layers (default 12)")
    ap.add_argument("--intermediate", type=int, help="MLP size (default hidden x 10 / 3: 2560)")
    ap.add_argument("--r", type=int, default=16, help="LoRA rank (default 16)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads of the worker (default 1; 0: every core, torch's own default)")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    ap.add_argument("--keep", metavar="DIR", help="build everything in DIR (a new folder) and keep it")
    args = ap.parse_args(argv)
    if args.steps < 4 or args.warmup >= args.steps // 2:
        ap.error("--steps must be at least 4 and --warmup below steps / 2")
    shape = Shape(arch="llama", hidden=args.hidden, layers=args.layers,
                  intermediate=args.intermediate or args.hidden * 10 // 3, heads=max(1, args.hidden // 64),
                  kv_heads=max(1, args.hidden // 64))

    tmp = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="traind-bench-adapters-"))
    tmp.mkdir(parents=True, exist_ok=not args.keep)
    try:
        base = tmp / "base-llama"
        facts = build_model(base, shape)
        data = write_blocks_file(tmp / "data.jsonl", base, args.steps * args.batch, SEQ)
        runs = {method: run_method(tmp, base, data, method, args) for method in METHODS}
        result = {
            "model": {"shape": shape.describe(), **facts, "bytes": dir_size(base)},
            "job": {"steps": args.steps, "batch": args.batch, "seq": SEQ, "warmup": args.warmup,
                    "checkpoint_step": args.steps // 2, "r": args.r, "cpus": os.cpu_count(),
                    "threads": args.threads},
            **runs,
            "ratio": {key: (runs["lora"][key] / runs["full"][key] if runs["full"][key] else None)
                      for key, _, _ in FIGURES},
        }
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print_table(result)
        return 0
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
