"""Several machines, seen from the head: the attempt record the other nodes follow, and their liveness.

With `[distributed] nodes = N` the head daemon runs each attempt's elastic
agent itself and writes `state/nodes/attempt.json` (the run id, the
rendezvous endpoint, the machines in rank order: the head first) on the
shared workspace. Each other machine runs `traind node` (engine/cluster/follower.py),
which polls that record, starts its own agent for the run, and writes
`state/nodes/NAME.json`: a heartbeat, and its agent's outcome for the run.

The head never starts an attempt without every node alive (the preflight
blocks: "waiting for K more node(s)"), and treats a node's failure as the
attempt's: a node whose agent ended while the head's ranks still run, or whose
heartbeat stopped, ends the attempt (its ranks would wait for the dead peer in
a collective) and names the node in the error. The daemon then decides
between resume and failure exactly as for one machine. Polling, not inotify:
inotify does not see another machine's writes to NFS.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any, Protocol

from engine.core import protocol
from engine.store import statefiles
from engine.core.atomic import WriteFailed, write_json_atomic
from engine.core.config import DistributedConfig
from engine.store.statefiles import NUMBER, OPTIONAL_DICT, OPTIONAL_STR, Shape
from engine.ops.worker_process import WorkerProcess, describe_exit, signal_group
from engine.store.workspace import Workspace

HEARTBEAT_SECONDS = 2.0  # how often a follower rewrites its record
STALE_SECONDS = 30.0  # a node whose heartbeat has not moved for this long is gone (NFS caches names up to 30 s)
POLL_SECONDS = 0.5
NODE_GRACE = 10.0  # after a node's agent ended, the head's ranks have this long to end on their own
OUTCOME_CODES = (protocol.EXIT_DONE, protocol.EXIT_INTERRUPTED, protocol.EXIT_ROLLBACK)  # not a node's own failure


class Running(Protocol):
    """What the head needs of an attempt it runs across machines (engine/supervisor/attempt.py's Attempt)."""

    worker: WorkerProcess

    async def run(self) -> int: ...

    def node_failed(self, why: str) -> None:
        """Another machine's failure ended the attempt: its cause, in place of what the head's ranks saw."""

ATTEMPT = Shape("node attempt record", {"run_id": str, "state": str, "nodes": list, "processes": int,
                                        "rdzv_endpoint": str, "join_timeout": NUMBER, "workspace": str},
                {"job_id": str, "attempt": int, "started_at": NUMBER}, items={"nodes": str})
NODE = Shape("node record", {"name": str, "host": str, "pid": int, "beat": int, "state": str, "workspace": str},
             {"agent_pid": (int, type(None)), "run_id": OPTIONAL_STR, "outcome": OPTIONAL_DICT, "beat_at": NUMBER})


def folder(ws: Workspace) -> Path:
    return ws.state / "nodes"


def attempt_path(ws: Workspace) -> Path:
    return folder(ws) / "attempt.json"


def node_path(ws: Workspace, name: str) -> Path:
    return folder(ws) / f"{name}.json"


def head_name() -> str:
    return socket.gethostname()


def followers(ws: Workspace) -> list[dict[str, Any]]:
    """Every follower's record (sorted by name): those that ever ran `traind node` on this workspace."""
    found = []
    try:
        paths = sorted(folder(ws).glob("*.json"))
    except OSError:
        return []
    for path in paths:
        if path.name != "attempt.json" and (doc := statefiles.read_or_none(path, NODE)) is not None:
            found.append(doc)
    return found


def agent_args(attempt: dict[str, Any], node_rank: int) -> list[str]:
    """engine.worker.launch's arguments for one machine of an attempt (after --processes and --channel)."""
    return ["--nodes", str(len(attempt["nodes"])), "--rdzv-endpoint", attempt["rdzv_endpoint"],
            "--run-id", attempt["run_id"], "--join-timeout", str(int(attempt["join_timeout"])),
            "--node-rank", str(node_rank)]


class Head:
    """The head daemon's side: which followers are alive, the attempt record, a node's failure."""

    def __init__(self, ws: Workspace):
        self.ws = ws
        self.seen: dict[str, tuple[int, float]] = {}  # name -> (beat, monotonic time it was seen to move)
        self.run_id: str | None = None  # the attempt running across machines
        self.names: list[str] = []  # its other machines, in rank order

    def live(self) -> list[dict[str, Any]]:
        """Followers whose heartbeat moved within STALE_SECONDS by this machine's clock (on first sight:
        whose own timestamp is that recent; a clock far off is caught by the next beats)."""
        now, alive = time.monotonic(), []
        for doc in followers(self.ws):
            beat, moved = self.seen.get(doc["name"], (None, None))
            if beat != doc["beat"]:
                fresh = beat is not None or time.time() - doc.get("beat_at", 0) < STALE_SECONDS
                moved = now if fresh else float("-inf")
                self.seen[doc["name"]] = (doc["beat"], moved)
            if now - moved < STALE_SECONDS:
                alive.append(doc)
        return alive

    def problem(self, config: DistributedConfig) -> str | None:
        """Why an attempt cannot start on every machine yet (a preflight), or None."""
        if config.nodes == 1:
            return None
        alive = self.live()
        here = str(self.ws.root.resolve())
        elsewhere = [f"{d['name']} has it at {d['workspace']}" for d in alive if d["workspace"] != here]
        if elsewhere:
            return (f"nodes: the workspace must be at the same path on every machine ({here} here; "
                    + "; ".join(elsewhere) + ")")
        ready = [d["name"] for d in alive if d["state"] == "idle"]
        if len(ready) < config.nodes - 1:
            missing = config.nodes - 1 - len(ready)
            return (f"nodes: waiting for {missing} more node(s) (run 'traind node -w {here}' on each other machine; "
                    f"ready: {', '.join(ready) or 'none'})")
        return None

    def begin(self, config: DistributedConfig, processes: int, job_id: str, n: int) -> list[str] | None:
        """Write the attempt record for the ready followers; engine.worker.launch's arguments for the head.
        None on one machine."""
        if config.nodes == 1:
            return None
        self.names = [d["name"] for d in self.live() if d["state"] == "idle"][: config.nodes - 1]
        self.run_id = f"{job_id}-{n}"
        record = {"run_id": self.run_id, "job_id": job_id, "attempt": n, "state": "running", "started_at": time.time(),
                  "nodes": [head_name(), *self.names], "processes": processes, "rdzv_endpoint": config.rdzv_endpoint,
                  "join_timeout": config.join_timeout, "workspace": str(self.ws.root.resolve())}
        write_json_atomic(attempt_path(self.ws), record)
        return agent_args(record, 0)

    async def during(self, attempt: Running) -> None:
        """Run the attempt; on several machines, end it when another node fails, then end the record."""
        if self.run_id is None:
            await attempt.run()
            return
        watch = asyncio.create_task(self.watch(attempt))
        try:
            code = await attempt.run()
            await self.settle()
            failed = self.failed_node()
            if failed is not None and failed[2] and code not in (0, *OUTCOME_CODES):
                # The node's failure is the cause; the head's ranks only saw their peer go (a gloo error).
                name, why, _ = failed
                attempt.node_failed(f"node {name} failed ({why}); see {self.ws.relative(self.log(name))}")
        finally:
            watch.cancel()
            self.end_record()

    async def settle(self) -> None:
        """Give the other nodes' agents NODE_GRACE to report this run's end (their ranks save and leave on the
        same step as the head's) before the record says it ended: a follower ends an agent still running then."""
        deadline = time.monotonic() + NODE_GRACE
        while time.monotonic() < deadline:
            ended = {d["name"] for d in self.live() if (d.get("outcome") or {}).get("run_id") == self.run_id}
            if ended.issuperset(self.names):
                return
            await asyncio.sleep(POLL_SECONDS)

    async def watch(self, attempt: Running) -> None:
        while attempt.worker.alive:
            await asyncio.sleep(POLL_SECONDS)
            failed = self.failed_node()
            if failed is None:
                continue
            try:
                await asyncio.wait_for(attempt.worker.wait(), NODE_GRACE)
            except asyncio.TimeoutError:
                signal_group(attempt.worker.pid, signal.SIGKILL)  # its ranks wait on a peer that is gone
            return

    def failed_node(self) -> tuple[str, str, bool] | None:
        """(name, why, whether it is the node's own failure) for the first node out of this run, or None."""
        alive = {d["name"]: d for d in self.live()}
        for name in self.names:
            doc = alive.get(name)
            if doc is None:
                return name, f"no heartbeat for {STALE_SECONDS:g}s", True
            outcome = doc.get("outcome") or {}
            if outcome.get("run_id") == self.run_id:
                code = outcome.get("exit_code", 1)
                return name, describe_exit(code), code not in OUTCOME_CODES
        return None

    def log(self, name: str) -> Path:
        return folder(self.ws) / f"{name}.log"

    def end_record(self) -> None:
        doc = statefiles.read_or_none(attempt_path(self.ws), ATTEMPT)
        if doc is not None and doc["state"] == "running":
            try:
                write_json_atomic(attempt_path(self.ws), {**doc, "state": "ended", "ended_at": time.time()})
            except (WriteFailed, OSError):
                pass  # the followers also end their agents when the head's rendezvous goes
        self.run_id = None

    def status(self, config: DistributedConfig) -> list[dict[str, Any]] | None:
        """The machines and their ranks, for status.json; None on one machine."""
        if config.nodes == 1:
            return None
        doc = statefiles.read_or_none(attempt_path(self.ws), ATTEMPT)
        running = doc if doc is not None and doc["state"] == "running" else None
        order = running["nodes"] if running else []
        per = running["processes"] if running else None
        rows = [{"name": head_name(), "host": head_name(), "role": "head", "state": "running" if running else "idle",
                 "pid": os.getpid()}]
        rows += [{"name": d["name"], "host": d["host"], "role": "node", "state": d["state"], "pid": d["pid"]}
                 for d in self.live()]
        for row in rows:
            if row["name"] in order and per:
                first = order.index(row["name"]) * per
                row["ranks"] = [first, first + per - 1]
        return rows


def describe(row: dict[str, Any]) -> str:
    """'node-b (node on gpu-2): running, ranks 8-15, PID 4711': one machine of the status, for people."""
    ranks = f", ranks {row['ranks'][0]}-{row['ranks'][1]}" if row.get("ranks") else ""
    return f"{row['name']} ({row['role']} on {row['host']}): {row['state']}{ranks}, PID {row['pid']}"
