"""A new worker's start: from asking for it to its `ready` event (torch and transformers imported), forked by the
fork server (engine/worker/forkserver.py) against a new python, side by side in one run.

Each start is a worker as the daemon starts one (`python -m engine.worker --events-fd N`, one torch thread); it
is sent EOF once ready and leaves. Wall time and the CPU the start cost (the worker's user + system time by
then, from /proc) are reported as medians, with the ratios.

    .venv/bin/python bench/worker_start.py [--repeats 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT

from engine.core import protocol
from engine.ops import forkserver
from engine.ops.worker_process import worker_env

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def one(server: Path | None, env: dict[str, str]) -> tuple[float, float]:
    r, w = os.pipe()
    stdin_r, stdin_w = os.pipe()
    devnull = os.open(os.devnull, os.O_WRONLY)
    argv = ["-m", "engine.worker", "--events-fd", str(w)]
    started = time.monotonic()
    if server is not None:
        proc = forkserver.fork(server, argv, env, ROOT, stdin_r, devnull, (w,))
    else:
        proc = subprocess.Popen([sys.executable, *argv], pass_fds=(w,), stdin=stdin_r, stdout=devnull,
                                stderr=devnull, env=env, cwd=ROOT, start_new_session=True)
    for fd in (w, stdin_r, devnull):
        os.close(fd)
    with os.fdopen(r, "rb") as events:
        ready = protocol.parse_event(events.readline())
    seconds = time.monotonic() - started
    assert ready["event"] == "ready", ready
    cpu = cpu_seconds(proc.pid)
    os.close(stdin_w)  # EOF before a job: it leaves
    proc.wait(30)
    return seconds, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    env = dict(worker_env(), OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory(prefix="traind-fs-") as tmp:
        started = time.monotonic()
        server = forkserver.ForkServer.start(Path(tmp) / "fork.sock", Path(tmp) / "forkserver.log", env, ROOT)
        while not server.serving:
            assert server.problem is None, (Path(tmp) / "forkserver.log").read_text()
            time.sleep(0.01)
        server_start = time.monotonic() - started
        try:
            results = {}
            for name, path in (("new_python", None), ("forked", server.path)):
                runs = [one(path, env) for _ in range(args.repeats)]
                results[name] = {"median_s": round(statistics.median(r[0] for r in runs), 3),
                                 "median_cpu_s": round(statistics.median(r[1] for r in runs), 3),
                                 "runs_s": [round(r[0], 3) for r in runs]}
        finally:
            server.close()
    results["server_start_s"] = round(server_start, 2)
    results["speedup"] = round(results["new_python"]["median_s"] / results["forked"]["median_s"], 1)
    results["cpu_ratio"] = round(results["new_python"]["median_cpu_s"] / max(results["forked"]["median_cpu_s"], 0.01), 1)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        print(f"a worker's start, request -> ready (median of {args.repeats})")
        for name in ("new_python", "forked"):
            r = results[name]
            print(f"  {name:10}  {r['median_s']:.3f} s wall  {r['median_cpu_s']:.2f} s CPU")
        print(f"  speed-up {results['speedup']}x; CPU {results['cpu_ratio']}x less; "
              f"the fork server itself took {results['server_start_s']} s to start (once per daemon)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
