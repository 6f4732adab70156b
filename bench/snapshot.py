"""Benchmark: taking a snapshot (`engine.store.snapshots.create`) against `cp -r` of the same model.

Builds a workspace in a temp directory whose current model is a `--size` model version (1 GiB by
default) of random float32 tensors in `--shards` safetensors shards, with config, tokenizer and
marker, on the same filesystem as snapshots/. Then, side by side, page cache warm:

- `cp -r` of the version folder (no fsync: the cheapest plain copy; its writeback is not counted);
- `create`, first snapshot of the version: hard links + fsync + BLAKE3 of every byte (the manifest
  needs the hashes, and no earlier snapshot holds them);
- `create`, a later snapshot of the same version (the daily case while no job ran, or any version
  already snapshotted): hard links + fsync, hashes taken from the earlier snapshot's manifest for
  the same inodes (same device, inode, size, mtime). This is the snapshot itself, no copy.

Prints both sides, the ratios and the disk space each costs (`--json` for one JSON document).

    .venv/bin/python bench/snapshot.py [--size 1GiB] [--shards 4] [--repeat 3] [--json] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from engine.store import snapshots  # noqa: E402
from engine.core import atomic
from engine.store import models
from engine.core.protocol import MODEL_MARKER  # noqa: E402
from engine.core.resources import dir_size  # noqa: E402
from engine.store.workspace import Workspace  # noqa: E402

VERSION = "00001-bench"


def make_workspace(directory: Path, size: int, shards: int) -> Workspace:
    """A workspace whose current model is VERSION: `size` bytes of random float32 in `shards` files.
    Reused when `directory` already holds one of that size."""
    import numpy as np
    from safetensors.numpy import save_file

    ws = Workspace.at(directory)
    version = ws.models / VERSION
    if (version / MODEL_MARKER).exists() and abs(dir_size(version) - size) < size * 0.01 + 2**20:
        return ws
    ws.create_folders()
    if version.exists():
        shutil.rmtree(version)
    version.mkdir()
    rng = np.random.default_rng(0)
    per_tensor = 32 * 2**20 // 4  # 32 MiB tensors
    left = size // 4
    for shard in range(shards):
        count = left // (shards - shard)
        left -= count
        tensors, i = {}, 0
        while count > 0:
            n = min(per_tensor, count)
            tensors[f"model.layers.{shard}.t{i}.weight"] = rng.standard_normal(n, dtype=np.float32)
            count -= n
            i += 1
        save_file(tensors, str(version / f"model-{shard + 1:05d}-of-{shards:05d}.safetensors"))
        del tensors
    (version / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 4096}))
    (version / "generation_config.json").write_text(json.dumps({"max_new_tokens": 256}))
    (version / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"vocab": {}}}))
    atomic.write_json_atomic(version / MODEL_MARKER, {"job_id": VERSION, "step": 1, "loss": 1.0,
                                                      "time": time.time(), "files": {}})
    subprocess.run(["sync", "-f", str(version)], check=False)
    models.publish(ws, VERSION, file="bench.jsonl", loss=1.0)
    return ws


def warm(paths: list[Path]) -> None:
    for p in paths:
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass


def clear_snapshots(ws: Workspace) -> None:
    for s in snapshots.list_snapshots(ws):
        snapshots.remove(ws, s.name, current_source=None, newest_verified_name=None)


def time_cp(ws: Workspace, repeat: int) -> float:
    best = float("inf")
    for i in range(repeat):
        dst = ws.root / f"cp-{i}"
        t0 = time.perf_counter()
        subprocess.run(["cp", "-r", str(ws.models / VERSION), str(dst)], check=True)
        best = min(best, time.perf_counter() - t0)
        shutil.rmtree(dst)
    return best


def time_create(ws: Workspace, repeat: int, first: bool) -> tuple[float, dict]:
    """Best wall time of create(); `first`: with no earlier snapshot (everything hashed)."""
    best, placement = float("inf"), {}
    clear_snapshots(ws)
    if not first:
        snapshots.create(ws, "manual", name="seed")
    for i in range(repeat):
        if first:
            clear_snapshots(ws)
        t0 = time.perf_counter()
        snap = snapshots.create(ws, "manual", name=f"{'first' if first else 'later'}-{i}")
        elapsed = time.perf_counter() - t0
        if elapsed < best:
            best, placement = elapsed, snap.manifest["placement"]
    return best, placement


def model_arguments(doc: str) -> argparse.ArgumentParser:
    """The options of the benchmarks that build a model workspace (this one and bench/verify.py)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--size", default="1GiB", help="model size (default 1GiB)")
    ap.add_argument("--shards", type=int, default=4, help="safetensors shards (default 4)")
    ap.add_argument("--repeat", type=int, default=3, help="runs of each side; the best is kept (default 3)")
    ap.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    ap.add_argument("--keep", metavar="DIR", help="build the workspace in DIR and keep it (reused if present)")
    return ap


def main(argv: list[str] | None = None) -> int:
    from engine.core.config import parse_size

    args = model_arguments(__doc__).parse_args(argv)

    size = parse_size(args.size)
    tmp = None if args.keep else tempfile.mkdtemp(prefix="traind-bench-snapshot-")
    try:
        t0 = time.perf_counter()
        ws = make_workspace(Path(args.keep or tmp), size, args.shards)
        gen_s = time.perf_counter() - t0
        version = ws.models / VERSION
        files = sorted(version.iterdir())
        total = sum(p.stat().st_size for p in files)
        warm(files)
        cp_s = time_cp(ws, args.repeat)
        first_s, first_placement = time_create(ws, args.repeat, first=True)
        later_s, later_placement = time_create(ws, args.repeat, first=False)
        before = dir_size(ws.root)
        snap = snapshots.create(ws, "manual", name="space")
        snapshot_space = dir_size(ws.root) - before
        clear_snapshots(ws)
        result = {
            "bytes": total, "files": len(files), "generate_seconds": round(gen_s, 2), "cpu": os.cpu_count(),
            "hash_algorithm": snap.manifest["hash_algorithm"],
            "cp_r_seconds": round(cp_s, 4),
            "create_first_seconds": round(first_s, 4),
            "create_later_seconds": round(later_s, 4),
            "hashing_seconds_estimate": round(max(0.0, first_s - later_s), 4),
            "ratio_cp_to_create_later": round(cp_s / later_s, 1),
            "ratio_cp_to_create_first": round(cp_s / first_s, 2),
            "first_placement": first_placement, "later_placement": later_placement,
            "cp_r_space_bytes": total, "snapshot_space_bytes": snapshot_space,
        }
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            mib = total / 2**20
            print(f"model:          {mib:,.0f} MiB in {len(files)} files ({args.shards} safetensors shards), "
                  f"{os.cpu_count()} CPUs, hashes {result['hash_algorithm']}")
            print(f"cp -r:          {cp_s * 1000:9.1f} ms  ({mib / cp_s:,.0f} MiB/s; costs {mib:,.0f} MiB of disk)")
            print(f"snapshot later: {later_s * 1000:9.1f} ms  (links + fsync, hashes of the same inodes reused; "
                  f"costs {snapshot_space / 2**10:,.0f} KiB)")
            print(f"snapshot first: {first_s * 1000:9.1f} ms  (links + fsync + hashing every byte, "
                  f"~{result['hashing_seconds_estimate'] * 1000:.0f} ms of it hashing)")
            print(f"ratio:          a snapshot is {result['ratio_cp_to_create_later']:,.1f}x faster than cp -r; "
                  f"the first of a version, hashing included, {result['ratio_cp_to_create_first']:.2f}x")
        return 0
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
