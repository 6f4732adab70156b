"""Time from a file renamed into the inbox to the job's first training step.

Side by side in one run: the daemon with a warm worker (torch already imported
while idle, the default), and with `jobs.warm_worker = false` (a worker started
per job) both forked by the fork server (`jobs.fork_server`, the default) and
as a new python (`jobs.fork_server = false`). Each case: start a daemon on a
fresh workspace with the tiny model, wait until it is idle (and, when warm, its
worker ready; when forking, its server serving), rename a file in, and read the
first `step` event's time from metrics.jsonl.

    .venv/bin/python bench/intake_latency.py [--repeats 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, build_tiny_model, new_workspace, wait_for

from engine.data import demo_data
from engine.store.workspace import Workspace


def status(ws: Workspace) -> dict:
    try:
        return json.loads(ws.status_path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def first_step_time(ws: Workspace) -> float | None:
    for run in ws.runs.iterdir():
        metrics = run / "metrics.jsonl"
        if metrics.exists():
            for line in metrics.read_text().splitlines():
                event = json.loads(line)
                if event["event"] == "step":
                    return event["time"]
    return None


CASES = {  # name: (jobs.warm_worker, jobs.fork_server, what it is)
    "warm": (True, True, "warm worker (default)"),
    "forked": (False, True, "worker forked per job"),
    "spawned": (False, False, "new python per job"),
}


def one(base_model: Path, warm: bool, fork: bool, data: Path, tmp: Path) -> float:
    ws = new_workspace(tmp, base_model, {"jobs": {"warm_worker": warm, "fork_server": fork},
                                         "checkpoint": {"every_steps": 10_000}})
    proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "daemon", "-w", str(ws.root)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    try:
        wait_for(lambda: status(ws).get("daemon", {}).get("state") == "idle")
        if warm:
            wait_for(lambda: status(ws)["daemon"].get("warm_worker"))
        if fork:
            wait_for(ws.fork_socket.exists, timeout=120)  # bound once it has imported torch and transformers
        staged = ws.root / "staged.jsonl"
        staged.write_bytes(data.read_bytes())
        past = time.time() - 60
        os.utime(staged, (past, past))  # written a while ago, as a finished file would be
        dropped = time.time()
        os.rename(staged, ws.inbox / "data.jsonl")
        stepped = wait_for(lambda: first_step_time(ws))
        return stepped - dropped
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = build_tiny_model(tmp / "tiny")
        data = tmp / "data.jsonl"
        demo_data.write_demo_file(data, 500, "text", seed=1)
        results = {}
        for _ in range(args.repeats):  # the cases alternate, so a busy moment falls on each alike
            for name, (warm, fork, _what) in CASES.items():
                results.setdefault(name, []).append(one(base, warm, fork, data, tmp))
    warm = statistics.median(results["warm"])
    summary = {name: {"median_s": round(statistics.median(runs), 2), "runs_s": [round(r, 2) for r in runs],
                      "over_warm": round(statistics.median(runs) / warm, 2)} for name, runs in results.items()}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"rename into inbox -> first training step (median of {args.repeats})")
        for name, figures in summary.items():
            print(f"  {CASES[name][2]:24} {figures['median_s']:6.2f} s  {figures['over_warm']:5.2f}x warm  "
                  f"{figures['runs_s']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
