"""The standing kill -9 suite: `make chaos` (ROUNDS=200 by default), 10 rounds in `make test`.

One workspace lives through every round. Each round starts a daemon (the
scripted fake worker trains; snapshots after every file), sometimes drops a
new file, and then kills: the daemon, the worker group or both with SIGKILL at
a random moment, or the process that reaches a named point (engine/core/crashpoints.py:
mid-claim, mid-checkpoint before its marker, between a model's rename and
current.json, mid-snapshot, mid-rollback). After each round, with no daemon
running: every input file is in exactly one queue folder (or the inbox),
status.json parses, no process of the last round is left once the next
daemon has started, and the current model is whole. At the end a daemon runs
the queue empty: every file is trained exactly once.

    python tests/chaos.py --rounds 200 [--seed N] [--report FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

TESTS = Path(__file__).resolve().parent
sys.path[:0] = [str(TESTS.parent), str(TESTS)]

from engine.store import statefiles  # noqa: E402
from engine.core import crashpoints, testing
from engine.store import snapshots
from workspaces import ROOT, daemon_env, drop, make_workspace, text_lines, wait_for  # noqa: E402

# max_attempts: a kill before an attempt's first checkpoint counts as a failed attempt (jobs.py); the suite's
# kills are not the worker failing, so any run of them must leave the file to be trained, not given up.
SETTINGS = {"jobs": {"warm_worker": False, "stop_grace_seconds": 5.0, "max_attempts": 1000},
            "inbox": {"settle_seconds": 0.2},
            "snapshots": {"every_files": 1}, "disk": {"reserve": 0}}
HOOKS = {"fake": {"steps": 40, "step_seconds": 0.02, "checkpoint_every": 5}}
KILLS = ("daemon", "worker", "both")


class Chaos:
    def __init__(self, root: Path, seed: int):
        self.rng = random.Random(seed)
        self.ws = make_workspace(root / "ws", SETTINGS)
        self.dropped: list[str] = []
        self.kills: Counter[str] = Counter()
        self.last_worker: int | None = None
        self.failures: list[str] = []

    def start(self, crash_at: str | None = None) -> subprocess.Popen:
        env = daemon_env(True, HOOKS)
        if crash_at:
            flag = self.ws.root.parent / f"crash-{crash_at}"
            flag.touch()
            env = testing.with_switches(env, crash_at=f"{crash_at}:{flag}")
        log = open(self.ws.root.parent / "daemon.log", "ab")
        return subprocess.Popen([sys.executable, "-m", "engine.cli", "daemon", "-w", str(self.ws.root)], env=env,
                                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)

    def worker_group(self) -> int | None:
        try:
            return json.loads(self.ws.worker_record.read_text())["pgid"]
        except (OSError, ValueError, KeyError):
            return None

    def drop_file(self) -> None:
        name = f"f{len(self.dropped):04d}.jsonl"
        drop(self.ws, name, text_lines(5, prefix=name))
        self.dropped.append(name)

    def round(self, n: int) -> None:
        if not self.dropped or self.rng.random() < 0.4:
            self.drop_file()
        point = self.rng.choice(crashpoints.POINTS) if self.rng.random() < 0.35 else None
        proc = self.start(point)
        self.check_no_orphan(proc)
        if point == "rollback":
            self.ask_rollback()
        if point is not None:
            flag = self.ws.root.parent / f"crash-{point}"
            try:  # the flag goes when a process (the daemon, or the worker for "checkpoint") died at the point
                wait_for(lambda: not flag.exists(), timeout=15, what=f"the {point} point")
                self.kills[f"point:{point}"] += 1
                if proc.poll() is None:  # the worker died there; the daemon is killed too, a moment later
                    time.sleep(self.rng.uniform(0.0, 0.5))
                    proc.kill()
            except AssertionError:  # not reached in time (e.g. no file to claim): an ordinary kill
                flag.unlink(missing_ok=True)
                point = None
        if point is None:
            time.sleep(self.rng.uniform(0.1, 1.5))
            kind = self.rng.choice(KILLS)
            self.kills[kind] += 1
            group = self.worker_group()
            if kind in ("worker", "both") and group is not None:
                try:
                    os.killpg(group, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                if kind == "worker":  # the daemon retries; a moment later it goes too, so the round can be checked
                    time.sleep(self.rng.uniform(0.1, 1.0))
            proc.kill()
        proc.wait()
        self.last_worker = self.worker_group()
        self.check(n)

    def ask_rollback(self) -> None:
        snaps = [s for s in snapshots.list_snapshots(self.ws) if s.kind == "scheduled"]
        if snaps:
            subprocess.Popen([sys.executable, "-m", "engine.cli", "rollback", snaps[-1].name, "-w", str(self.ws.root)],
                             env=daemon_env(True), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)

    def check_no_orphan(self, proc: subprocess.Popen) -> None:
        """Once the new daemon has recovered, the last round's worker group is gone."""
        if self.last_worker is None:
            return
        def recovered() -> bool:
            try:
                return json.loads(self.ws.status_path.read_text())["daemon"]["pid"] == proc.pid
            except (OSError, ValueError, KeyError, TypeError):
                return False
        try:
            wait_for(lambda: recovered() or proc.poll() is not None, timeout=30, what="the daemon's start")
        except AssertionError:
            return
        try:
            os.killpg(self.last_worker, 0)
            if proc.poll() is None:
                self.failures.append(f"worker group {self.last_worker} outlived its daemon and the next one's start")
        except ProcessLookupError:
            pass

    def locations(self) -> dict[str, list[str]]:
        found: dict[str, list[str]] = {name: [] for name in self.dropped}
        for name in os.listdir(self.ws.inbox):
            if name in found:
                found[name].append("inbox")
        for state in ("pending", "active", "done", "failed", "rejected"):
            for entry in os.listdir(self.ws.queue(state)):
                if not entry.endswith(".jsonl"):
                    continue
                record = self.ws.run_dir(entry[: -len(".jsonl")]) / "job.json"
                try:
                    original = json.loads(record.read_text())["original_name"]
                except (OSError, ValueError, KeyError):
                    original = None
                if original not in found:  # a rebuilt record: the content says which file it is
                    first = (self.ws.queue(state) / entry).read_text().split('"text": "', 1)[-1].split(" ", 1)[0]
                    original = first if first in found else entry
                found.setdefault(original, []).append(state)
        return found

    def check(self, n: int) -> None:
        for name, where in self.locations().items():
            if len(where) != 1:
                self.failures.append(f"round {n}: {name} is in {where or 'no folder'}")
        try:
            json.loads(self.ws.status_path.read_text())
        except FileNotFoundError:
            pass  # a daemon killed before its first status write (it is replaced, never removed)
        except (OSError, ValueError) as e:
            self.failures.append(f"round {n}: status.json does not parse: {e}")
        try:
            pointer = statefiles.read(self.ws.current_model_pointer, statefiles.CURRENT_MODEL)
            path = Path(pointer["path"]) if Path(pointer["path"]).is_absolute() else self.ws.root / pointer["path"]
            json.loads((path / "config.json").read_text())
        except (OSError, ValueError, TypeError) as e:
            self.failures.append(f"round {n}: the current model does not load: {e}")

    def finish(self) -> None:
        proc = subprocess.Popen([sys.executable, "-m", "engine.cli", "daemon", "--once", "-w", str(self.ws.root)],
                                env=daemon_env(True, HOOKS), stdout=open(self.ws.root.parent / "daemon.log", "ab"),
                                stderr=subprocess.STDOUT, cwd=ROOT)
        if proc.wait(600) != 0:
            self.failures.append(f"the last daemon exited {proc.returncode}")
        for name, where in self.locations().items():
            if where != ["done"]:
                self.failures.append(f"at the end {name} is in {where}, not done")
        done = 0
        for entry in os.listdir(self.ws.queue("done")):
            if entry.endswith(".jsonl"):
                record = json.loads((self.ws.run_dir(entry[:-6]) / "job.json").read_text())
                finished = [a for a in record["attempts"] if a.get("outcome") == "done"]
                done += 1
                if len(finished) > 1:
                    self.failures.append(f"{entry} was trained to the end {len(finished)} times")
        if done != len(self.dropped):
            self.failures.append(f"{done} files done of {len(self.dropped)} dropped")


def run(rounds: int, seed: int, root: Path) -> dict:
    chaos = Chaos(root, seed)
    t0 = time.monotonic()
    for n in range(1, rounds + 1):
        chaos.round(n)
    chaos.finish()
    return {"rounds": rounds, "seed": seed, "files": len(chaos.dropped), "kills": dict(sorted(chaos.kills.items())),
            "failures": chaos.failures, "seconds": round(time.monotonic() - t0, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=200)
    parser.add_argument("--seed", type=int, default=int(time.time()))
    parser.add_argument("--report", type=Path, help="write the figures here as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="traind-chaos-") as tmp:
        report = run(args.rounds, args.seed, Path(tmp))
    print(json.dumps(report, indent=2))
    if args.report:
        args.report.write_text(json.dumps(report, indent=2) + "\n")
    return 1 if report["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
