"""The daemon's worker processes: one kept warm while the queue is idle, and the fork server that starts them.

A worker that has already imported torch and transformers waits for the next
file, so a file renamed into the inbox trains in seconds (jobs.warm_worker);
each worker is forked from a server that imported them once
(engine/ops/forkserver.py, jobs.fork_server), or started as a new python
when there is none. A server that dies is said once and tried again a minute
later; a warm worker that dies while starting is said and tried again a minute
later, never in a tight loop. On several machines each attempt is a new
rendezvous: its worker is always a new one.

It owns the worker in hand and the server; the daemon asks it for a worker
(`take`) and hands it back when the attempt ends (`release`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from engine.core.config import Config
from engine.ops import forkserver
from engine.ops.forkserver import ForkServer
from engine.ops.worker_process import WorkerProcess, describe_exit, worker_env
from engine.store.eventlog import Reporter
from engine.store.workspace import Workspace

RETRY_SECONDS = 60.0  # after a fork server or a warm worker died, the next try waits this long


class Workers:
    def __init__(self, ws: Workspace, report: Reporter, on_ready: Callable[[], None], wake: Callable[[], None],
                 leaving: Callable[[], bool]):
        self.ws = ws
        self.report = report
        self.leaving = leaving  # stopping or stopped: a warm worker's death then is no failure
        self.on_ready = on_ready  # a warm worker is ready: status.json says so
        self.wake = wake  # the queue should look again (the server died under a starting worker)
        self.worker: WorkerProcess | None = None  # running a job, or waiting warm
        self.warm_task: asyncio.Task | None = None
        self.forks: ForkServer | None = None  # forks each worker with torch already imported
        self.fork_retry_at = 0.0
        self.warm_retry_at = 0.0

    def alive(self) -> WorkerProcess | None:
        """The worker in hand, if its process lives."""
        return self.worker if self.worker is not None and self.worker.alive else None

    def start_fork_server(self, config: Config) -> None:
        self.forks = forkserver.for_daemon(self.ws.root, self.ws.fork_socket, self.ws.fork_server_log,
                                           config.jobs.fork_server, worker_env())

    async def keep_warm(self, config: Config, held: bool, stopping: bool) -> None:
        """While idle, keep one worker that has already imported torch waiting for the next file."""
        if self.worker is not None and not self.worker.alive:
            self.worker = None
        if self.forks is not None and (problem := self.forks.problem):
            self.report.alert("worker_start_failed", f"fork server: {problem}; workers start as new processes (see "
                              f"{self.ws.fork_server_log}); next try in {RETRY_SECONDS:g}s", "warning")
            self.forks.close()
            self.forks, self.fork_retry_at = None, time.monotonic() + RETRY_SECONDS
        elif self.forks is None and config.jobs.fork_server and time.monotonic() >= self.fork_retry_at:
            self.start_fork_server(config)
        if (self.worker is None and config.jobs.warm_worker and not stopping and not held
                and time.monotonic() >= self.warm_retry_at and config.distributed.nodes == 1):
            worker = self.worker = await WorkerProcess.spawn(self.ws, self.ws.idle_worker_log,
                                                             processes=config.training.processes, forks=self.forks)
            self.warm_task = asyncio.create_task(self.watch_warm(worker))
        elif held and self.worker is not None and self.worker.job_id is None:
            await self.worker.dismiss()  # stopped means the GPU is released: no worker holds it
            self.worker = None

    async def watch_warm(self, worker: WorkerProcess) -> None:
        if await worker.until_ready():
            self.on_ready()
            return
        code = await worker.proc.wait()
        if self.forks is not None and self.forks.problem:
            self.wake()  # its server died (keep_warm says so): the next worker starts without it
        elif worker.job_id is None and not self.leaving():
            self.warm_retry_at = time.monotonic() + RETRY_SECONDS  # no tight loop of crashing starts
            self.report.alert("worker_start_failed", f"a worker died while starting ({describe_exit(code)}); "
                              f"see {self.ws.idle_worker_log}; next warm start in {RETRY_SECONDS:g}s")

    async def take(self, log_path: Path, launch: list[str] | None, processes: int) -> WorkerProcess:
        """The warm worker if it is alive, else a new one writing straight into the job's log; on several
        machines always a new one (`launch`: its agent's arguments), as each attempt is a new rendezvous."""
        worker = self.worker
        if worker is not None and self.warm_task is not None:
            await self.warm_task  # its ready event is read by then; the job's events follow
            self.warm_task = None
        if worker is not None and worker.alive and (launch or worker.processes != processes):
            await worker.dismiss()  # traind.toml changed the number of processes (or machines) while it waited
        if worker is None or not worker.alive or worker.job_id is not None or launch:
            worker = await WorkerProcess.spawn(self.ws, log_path, append=True, processes=processes, launch=launch,
                                               forks=self.forks)
        self.worker = worker
        return worker

    def release(self) -> None:
        """The attempt's worker has exited: the next one is a new or a warm one."""
        self.worker = None

    async def close(self) -> None:
        if self.warm_task is not None:
            self.warm_task.cancel()
        if self.worker is not None:
            await self.worker.dismiss()
            self.worker = None
        if self.forks is not None:
            self.forks.close()
