"""`traind node -w WS [--name NAME]`: this machine's part in the jobs a head daemon runs across several.

One per machine and name (an flock on state/nodes/NAME.lock). It polls the
head's attempt record (engine/cluster/nodes.py) on the shared workspace, and when an
attempt names this node it starts the local elastic agent
(engine/worker/launch.py) joining the head's rendezvous with the attempt's
run id, in a process group of its own, its output appended to
state/nodes/NAME.log. Like the daemon's workers, the agent is forked by a fork
server of this node's (engine/ops/forkserver.py, `jobs.fork_server`; its socket in
a folder of this machine's, never on the shared workspace), or started as a new
python while there is none. When the agent exits its whole group is killed and the
exit is written as the run's outcome in state/nodes/NAME.json, which also
carries a heartbeat every HEARTBEAT_SECONDS. An attempt the head ended, or
replaced, ends the agent (SIGTERM, then SIGKILL after a grace). The follower
never decides anything about the job: the head does, from the outcome.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from engine.cluster import nodes
from engine.core import config
from engine.ops import forkserver
from engine.store import statefiles
from engine.core.atomic import WriteFailed, write_json_atomic
from engine.store.lock import DaemonLock
from engine.ops.worker_process import agent_env, describe_exit, signal_group, worker_env
from engine.store.workspace import Workspace


class Follower:
    def __init__(self, ws: Workspace, name: str):
        self.ws, self.name = ws, name
        self.here = str(ws.root.resolve())
        self.record_path = nodes.node_path(ws, name)
        self.log_path = nodes.folder(ws) / f"{name}.log"
        self.beat = 0
        self.last_beat = 0.0
        self.agent: subprocess.Popen | forkserver.ForkedWorker | None = None
        self.forks: forkserver.ForkServer | None = None
        self.run_id: str | None = None  # the run the agent is in (or the last one it was in)
        self.outcome: dict[str, Any] | None = None
        self.stopping = False

    def run(self) -> int:
        nodes.folder(self.ws).mkdir(parents=True, exist_ok=True)
        lock = DaemonLock(nodes.folder(self.ws) / f"{self.name}.lock", self.ws.root, what=f"traind node {self.name!r}")
        lock.acquire()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: setattr(self, "stopping", True))
        say(f"node {self.name} on {self.here}: waiting for the head's jobs")
        local = Path(tempfile.mkdtemp(prefix="traind-node-"))  # a unix socket is this machine's, and short
        try:
            self.forks = forkserver.for_daemon(self.ws.root, local / "fork.sock",
                                               nodes.folder(self.ws) / f"{self.name}.forkserver.log",
                                               self.fork_server_wanted(), worker_env())
            running = self.attempt()
            if running is not None and self.name in running["nodes"][1:]:  # it began without us (we restarted)
                self.run_id = running["run_id"]
                self.outcome = {"run_id": self.run_id, "exit_code": 1, "exit": "the node restarted during the run"}
            while not self.stopping:
                self.step()
                time.sleep(nodes.POLL_SECONDS)
        finally:
            self.end_agent("this node is stopping")
            if self.forks is not None:
                self.forks.close()
            shutil.rmtree(local, ignore_errors=True)
            self.write_record("stopped", force=True)
            lock.release()
        say(f"node {self.name} stopped")
        return 0

    def fork_server_wanted(self) -> bool:
        """`jobs.fork_server` of the shared traind.toml; on when it cannot be read (the head reports that)."""
        try:
            return config.load_section(self.ws.config_path, "jobs").fork_server
        except config.ConfigError:
            return True

    def attempt(self) -> dict[str, Any] | None:
        """The head's attempt record while it runs, else None."""
        doc = statefiles.read_or_none(nodes.attempt_path(self.ws), nodes.ATTEMPT)
        return doc if doc is not None and doc["state"] == "running" else None

    def step(self) -> None:
        running = self.attempt()
        if self.agent is not None:
            if self.agent.poll() is not None:
                self.agent_ended()
            elif running is None or running["run_id"] != self.run_id:
                self.end_agent("the head ended the attempt")
        elif (running is not None and running["run_id"] != self.run_id and self.name in running["nodes"][1:]
                and running["workspace"] == self.here):
            self.start_agent(running)
        self.write_record("running" if self.agent is not None else "idle")

    def start_agent(self, attempt: dict[str, Any]) -> None:
        self.run_id, self.outcome = attempt["run_id"], None
        argv = [sys.executable, "-m", "engine.worker.launch", "--processes", str(attempt["processes"]),
                *nodes.agent_args(attempt, attempt["nodes"].index(self.name))]
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} run {self.run_id} ===\n".encode())
            log.flush()
            env = agent_env(attempt["processes"])
            self.agent = self.forked_agent(argv, env, log.fileno())
            if self.agent is None:
                self.agent = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                              start_new_session=True, env=env, cwd=self.ws.root)
        say(f"joined run {self.run_id} (agent PID {self.agent.pid})")
        self.write_record("running", force=True)

    def forked_agent(self, argv: list[str], env: dict[str, str], log_fd: int) -> forkserver.ForkedWorker | None:
        """The agent forked by this node's fork server, or None (none serves, or it refused: said, and a new
        python it is)."""
        if self.forks is not None and (problem := self.forks.problem):
            say(f"fork server: {problem}; agents start as new pythons from now on")
            self.forks.close()
            self.forks = None
        if self.forks is None or not self.forks.serving:
            return None
        stdin = os.open(os.devnull, os.O_RDONLY)
        try:
            return forkserver.fork(self.forks.path, argv[1:], env, self.ws.root, stdin, log_fd)
        except forkserver.ForkRefused as e:
            say(f"fork server: {e}; this agent starts as a new python")
            if not e.expected:
                self.forks.refused = str(e)  # a fault of the server's: dropped at the next agent's start
            return None
        finally:
            os.close(stdin)

    def agent_ended(self) -> None:
        assert self.agent is not None
        code = self.agent.returncode
        signal_group(self.agent.pid, signal.SIGKILL)  # a rank the agent left behind
        self.outcome = {"run_id": self.run_id, "exit_code": code, "exit": describe_exit(code), "ended_at": time.time()}
        self.agent = None
        say(f"run {self.run_id} ended on this node ({describe_exit(code)})")
        self.write_record("idle", force=True)

    def end_agent(self, why: str) -> None:
        if self.agent is None:
            return
        say(f"ending run {self.run_id}: {why}")
        signal_group(self.agent.pid, signal.SIGTERM)
        try:
            self.agent.wait(nodes.NODE_GRACE)
        except subprocess.TimeoutExpired:
            signal_group(self.agent.pid, signal.SIGKILL)
            self.agent.wait()
        self.agent_ended()

    def write_record(self, state: str, force: bool = False) -> None:
        """The heartbeat and the outcome; a write the disk refuses is said and tried again on the next beat."""
        if not force and time.monotonic() - self.last_beat < nodes.HEARTBEAT_SECONDS:
            return
        self.beat += 1
        self.last_beat = time.monotonic()
        doc = {"name": self.name, "host": socket.gethostname(), "pid": os.getpid(), "beat": self.beat,
               "beat_at": time.time(), "state": state, "workspace": self.here,
               "agent_pid": self.agent.pid if self.agent else None, "run_id": self.run_id, "outcome": self.outcome}
        try:
            write_json_atomic(self.record_path, doc)
        except (WriteFailed, OSError) as e:
            say(f"cannot write {self.record_path}: {e}")


def say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def run(ws: Workspace, name: str | None) -> int:
    name = name or socket.gethostname()
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", name) or name == "attempt":
        print(f"traind node: --name {name!r}: expected letters, digits, '.', '_' or '-' (at most 64), not 'attempt'",
              file=sys.stderr)
        return 2
    return Follower(ws, name).run()
