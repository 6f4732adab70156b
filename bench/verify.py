"""Benchmark: verifying a snapshot (`engine.store.verification.verify`) against `sha256sum` of the same files.

The model is `bench/snapshot.py`'s: `--size` (1 GiB by default) of random float32 safetensors
shards plus config, tokenizer and marker, snapshotted once. Page cache warm for every side, best of
`--repeat`:

- `sha256sum` over the snapshot's files (coreutils, one core);
- `verification.verify`: re-hash every file (BLAKE3 on every core), parse the JSON files and the
  safetensors headers, count non-finite values in every float tensor, write verify.json;
- its parts on their own: hashing only, and the safetensors checks (headers + finite) only;
- for reference, SHA-256 through Python's hashlib (OpenSSL; uses SHA-NI where the CPU has it),
  the fallback `verify` uses without blake3.

Prints MB/s for each, the ratio verify / sha256sum, and the finite check's share (`--json` for one
JSON document).

    .venv/bin/python bench/verify.py [--size 1GiB] [--shards 4] [--repeat 3] [--json] [--keep DIR]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from snapshot import ROOT, make_workspace, model_arguments, warm  # bench/snapshot.py (sys.path[0] is bench/)

sys.path.insert(0, str(ROOT))

from engine.store import verification  # noqa: E402
from engine.store import snapshots


def best_of(repeat: int, fn) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    from engine.core.config import parse_size

    args = model_arguments(__doc__).parse_args(argv)

    size = parse_size(args.size)
    tmp = None if args.keep else tempfile.mkdtemp(prefix="traind-bench-verify-")
    try:
        ws = make_workspace(Path(args.keep or tmp), size, args.shards)
        for s in snapshots.list_snapshots(ws):
            snapshots.remove(ws, s.name, current_source=None, newest_verified_name=None)
        snap = snapshots.create(ws, "manual", name="bench")
        rels = sorted(snap.manifest["files"])
        paths = [snap.path / rel for rel in rels]
        total = sum(p.stat().st_size for p in paths)
        algorithm = snap.manifest["hash_algorithm"]
        warm(paths)

        sha_s = best_of(args.repeat, lambda: subprocess.run(["sha256sum", *map(str, paths)], check=True,
                                                            stdout=subprocess.DEVNULL))
        results = []
        verify_s = best_of(args.repeat, lambda: results.append(verification.verify(ws, "bench")))
        if not all(r["ok"] for r in results):
            print(f"warning: verification failed: {verification.describe_problems(results[-1])}", file=sys.stderr)
        hash_s = best_of(args.repeat, lambda: [snapshots.hash_file(p, algorithm) for p in paths])
        tensors = [p for p in paths if p.name.endswith(".safetensors")]
        st_s = best_of(args.repeat, lambda: [verification.check_safetensors(p) for p in tensors])
        py_sha_s = best_of(args.repeat, lambda: [snapshots.hash_file(p, "sha256") for p in paths])

        mb = total / 1e6
        result = {
            "bytes": total, "files": len(paths), "cpu": os.cpu_count(), "hash_algorithm": algorithm,
            "sha256sum_seconds": round(sha_s, 4), "sha256sum_mb_per_s": round(mb / sha_s, 1),
            "verify_seconds": round(verify_s, 4), "verify_mb_per_s": round(mb / verify_s, 1),
            "ratio_verify_to_sha256sum": round(sha_s / verify_s, 2),
            "hash_only_seconds": round(hash_s, 4), "hash_only_mb_per_s": round(mb / hash_s, 1),
            "safetensors_checks_seconds": round(st_s, 4),
            "safetensors_checks_mb_per_s": round(sum(p.stat().st_size for p in tensors) / 1e6 / st_s, 1),
            "finite_check_share_of_verify": round(st_s / verify_s, 3),
            "python_sha256_seconds": round(py_sha_s, 4), "python_sha256_mb_per_s": round(mb / py_sha_s, 1),
            "ok": all(r["ok"] for r in results),
        }
        if args.json:
            print(json.dumps(result, indent=2))
        else:
            print(f"snapshot:        {total / 2**20:,.0f} MiB in {len(paths)} files, {os.cpu_count()} CPUs, "
                  f"hashed with {algorithm}")
            print(f"sha256sum:       {result['sha256sum_mb_per_s']:>9,.1f} MB/s  ({sha_s:.3f} s)")
            print(f"verify:          {result['verify_mb_per_s']:>9,.1f} MB/s  ({verify_s:.3f} s; "
                  f"{'ok' if result['ok'] else 'FAILED'})")
            print(f"  hashing only:  {result['hash_only_mb_per_s']:>9,.1f} MB/s  ({hash_s:.3f} s)")
            print(f"  headers+finite:{result['safetensors_checks_mb_per_s']:>9,.1f} MB/s  ({st_s:.3f} s, "
                  f"{result['finite_check_share_of_verify']:.0%} of verify)")
            print(f"python sha256:   {result['python_sha256_mb_per_s']:>9,.1f} MB/s  ({py_sha_s:.3f} s; "
                  "OpenSSL, the fallback without blake3)")
            print(f"ratio:           verify is {result['ratio_verify_to_sha256sum']:.2f}x as fast as sha256sum")
        return 0
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
