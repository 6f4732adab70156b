"""A burst of small files dropped at once: files claimed and validated per second, and the daemon's memory.

Side by side in one run: this checkout, and a baseline commit (default: the
last one before intake ran ahead of training) checked out under .bench/. Each
case: a fresh workspace, the scripted fake worker (one step a job, so training
costs little), N small valid files renamed into the inbox at once, then a
daemon; the rate is N over the time from its start to the last `accepted`
event, and its peak RSS is sampled every 50 ms. The baseline takes far fewer
files (it is slow: each file waits for the one before it to train).

    .venv/bin/python bench/intake_burst.py [--files 5000] [--baseline-files 300] [--baseline REV] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from common import ROOT

from engine.core import testing  # noqa: E402

BASELINE = "103d349"  # intake claimed and validated each file only when the trainer was free
SETTINGS = "[jobs]\nwarm_worker = false\n[inbox]\nsettle_seconds = 0.5\n[disk]\nreserve = 0\n"


def workspace(parent: Path, tree: Path, files: int) -> Path:
    ws = parent / "ws"
    subprocess.run([sys.executable, "-c", "import sys; from engine.store.workspace import Workspace; "
                    "Workspace.at(sys.argv[1]).create_folders()", str(ws)], cwd=tree, check=True)
    model = ws / "models" / "base-fake"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    (ws / "models" / "current.json").write_text(json.dumps({"kind": "local", "path": str(model), "version": "base-fake"}))
    (ws / "traind.toml").write_text(SETTINGS)
    staging = parent / "staging"
    staging.mkdir()
    past = time.time() - 60
    for i in range(files):
        path = staging / f"f{i:05d}.jsonl"
        path.write_text(f'{{"text": "file {i}: {i}+{i}={2 * i}"}}\n{{"text": "and {i} more"}}\n')
        os.utime(path, (past, past))
    for path in sorted(staging.iterdir()):
        os.rename(path, ws / "inbox" / path.name)  # all at once, as a user's mv of a folder's files would
    return ws


def accepted_times(ws: Path) -> list[float]:
    times = []
    try:
        with open(ws / "state" / "events.jsonl", "rb") as f:
            for line in f:
                if b'"accepted"' in line:
                    times.append(json.loads(line)["time"])
    except FileNotFoundError:
        pass
    return times


def one(tree: Path, files: int, tmp: Path) -> dict:
    ws = workspace(tmp, tree, files)
    fake = {"fake": {"steps": 1}}
    env = testing.with_switches({**os.environ, "PYTHONPATH": os.pathsep.join([str(tree), str(tree / "tests")]),
                                 # the baseline's spelling of the same two switches (before engine/core/testing.py)
                                 "TRAIND_WORKER_MODULE": "fake_worker", "TRAIND_TEST_HOOKS": json.dumps(fake)},
                                worker_module="fake_worker", worker=fake)
    start = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "daemon", "-w", str(ws)], cwd=tree, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ps, peak = psutil.Process(proc.pid), 0
    try:
        deadline = time.monotonic() + 1200
        while time.monotonic() < deadline:
            peak = max(peak, ps.memory_info().rss)
            if len(accepted_times(ws)) >= files:
                break
            time.sleep(0.05)
        times = accepted_times(ws)
    finally:
        proc.terminate()
        proc.wait(60)
    if len(times) < files:
        raise RuntimeError(f"{tree}: only {len(times)} of {files} files accepted")
    return {"files": files, "seconds": round(times[-1] - start, 2), "files_per_s": round(files / (times[-1] - start), 1),
            "peak_rss_mib": round(peak / 2**20, 1)}


def baseline_tree(rev: str) -> Path:
    tree = ROOT / ".bench" / f"tree-{rev}"
    if not tree.exists():
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), rev], cwd=ROOT, check=True,
                       capture_output=True)
    return tree


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=5000)
    parser.add_argument("--baseline-files", type=int, default=300)
    parser.add_argument("--baseline", default=BASELINE)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
        new = one(ROOT, args.files, Path(a))
        old = one(baseline_tree(args.baseline), args.baseline_files, Path(b))
    result = {"traind": new, "baseline": {**old, "rev": args.baseline},
              "ratio": round(new["files_per_s"] / old["files_per_s"], 1)}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(f"traind:   {new['files']} files claimed and validated in {new['seconds']} s = {new['files_per_s']} files/s "
              f"(target >= 200), daemon peak RSS {new['peak_rss_mib']} MiB (target < 100)")
        print(f"baseline: {old['files']} files in {old['seconds']} s = {old['files_per_s']} files/s ({args.baseline}), "
              f"peak RSS {old['peak_rss_mib']} MiB")
        print(f"ratio:    {result['ratio']}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
