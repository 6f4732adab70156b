"""A fake traind daemon for the TUI's tests, and frozen workspace data for its snapshots.

`FakeDaemon` holds the workspace lock (a real flock, so `engine.store.lock.holder` and the
reader see it) and serves state/control.sock with engine/api/control.py's own server on
an asyncio loop in a thread. It records every command and answers as the daemon
would, or refuses with a reason it is given. `die()` drops the socket and the lock,
as a killed daemon does. The frozen data (status, events, metrics, listings) has
fixed times so screenshots do not change from run to run.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from engine.api.control import ControlServer, reply
from engine.store.lock import DaemonLock
from engine.store.workspace import Workspace

NOW = 1_767_268_800.0  # 2026-01-01 12:00:00 UTC: the frozen "now" of every screenshot
GiB = 2**30


class FakeDaemon:
    def __init__(self, ws: Workspace, state: str = "training") -> None:
        self.ws = ws
        self.state = state
        self.commands: list[dict[str, Any]] = []
        self.refuse: dict[str, str] = {}  # cmd -> the reason it is refused with
        self.replies: dict[str, str] = {}  # cmd -> the message it is answered with (else "CMD: done (fake)")
        self.loop = asyncio.new_event_loop()
        self.lock = DaemonLock(ws.lock_path, ws.root)
        self.server = ControlServer(ws.control_socket, self.handle)
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.received = threading.Event()

    def start(self) -> "FakeDaemon":
        self.ws.state.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self.server.start(), self.loop).result(5)
        return self

    async def handle(self, cmd: str, request: dict[str, Any], peer_pid: int | None) -> dict[str, Any]:
        self.commands.append(request)
        self.received.set()
        if cmd in self.refuse:
            return reply(False, cmd, self.refuse[cmd])
        did = {}
        if cmd in ("pause", "resume"):  # pause with toggle resumes a paused daemon, as engine/supervisor/commands.py
            resume = cmd == "resume" or (request.get("toggle") and self.state == "paused")
            self.state = "training" if resume else "paused"
            did = {"did": "resume" if resume else "pause"}
        elif cmd == "stop":
            self.state = "stopped"
        return reply(True, cmd, self.replies.get(cmd, f"{cmd}: done (fake)"), **did)

    def names(self) -> list[str]:
        return [c["cmd"] for c in self.commands]

    def die(self) -> None:
        """As kill -9: the socket stops answering and the lock is free."""
        if self.thread.is_alive():
            asyncio.run_coroutine_threadsafe(self.server.close(), self.loop).result(5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(5)
        self.lock.release()

    stop = die


# ---------------------------------------------------------------------------------------------
# Frozen data


def _gpu(index: int, used: float) -> dict[str, Any]:
    return {"index": index, "name": "NVIDIA H100 80GB HBM3", "uuid": f"GPU-{index:08d}", "memory_total": 80 * GiB,
            "memory_used": int(used * GiB), "memory_free": int((80 - used) * GiB), "utilization_percent": 97 - index * 5,
            "temperature_c": 64 + index, "power_w": 612.0 - index * 40, "power_limit_w": 700.0,
            "worker_memory": int((used - 0.5) * GiB), "error": None}


def frozen_status(ws: Workspace, gpus: int = 0, state: str = "training") -> dict[str, Any]:
    if gpus:
        gpu = {"mode": "gpu", "reason": None,
               "devices": [_gpu(i, 61.3 + 9 * i if gpus <= 2 else 30 + 6 * i) for i in range(gpus)]}
    else:
        gpu = {"mode": "cpu", "reason": "no NVIDIA driver (libnvidia-ml.so.1 not found)", "devices": []}
    return {
        "schema": 1, "updated_at": NOW - 1, "version": "0.1.0", "workspace": str(ws.root),
        "daemon": {"running": True, "pid": 4242, "state": state, "reason": None, "since": NOW - 600,
                   "started_at": NOW - 3725, "worker_pid": 4250, "warm_worker": False},
        "job": {"id": "00007-support-chats", "original_name": "support-chats.jsonl", "format": "messages",
                "examples": 12000, "phase": state, "rollbacks": 0, "attempt": 1, "max_attempts": 3,
                "step": 1234, "total_steps": 3000, "percent": 41.13, "epoch": 0.41, "loss": 1.8731,
                "learning_rate": 1.9e-5, "grad_norm": 0.82, "tokens_per_s": 15234.0, "eta_s": 2512.0,
                "elapsed_s": 1750.0, "resumed_from_step": 0, "last_checkpoint_step": 1200},
        "queue": {"inbox": 2, "active": 1, "done": 5, "failed": 1, "rejected": 1},
        "model": {"kind": "local", "path": "models/00006-faq", "version": "00006-faq"},
        "last_error": None,
        "resources": {"gpu": gpu, "memory": {"total": 64 * GiB, "available": 41 * GiB},
                      "worker_rss": int(6.2 * GiB),
                      "disk": {"path": str(ws.root), "total": 1800 * GiB, "free": 412 * GiB, "reserve": 50 * GiB,
                               "last_checkpoint_bytes": int(14.2 * GiB)}},
        "snapshots": {"count": 3, "newest": "manual-20260101-1100", "newest_verified": "daily-20260101",
                      "corrupt": ["daily-20251231"], "pending": ["manual-20260101-1100"],
                      "current_from": "daily-20251230", "verifying": None},
    }


def frozen_events() -> list[dict[str, Any]]:
    rows = [(-3725, "info", "daemon_started", "daemon started (PID 4242), CPU mode"),
            (-3600, "info", "job_done", "00006-faq.jsonl done: 900 steps, final loss 1.912"),
            (-1760, "info", "accepted", "support-chats.jsonl accepted: 12,000 examples (messages)"),
            (-1750, "info", "job_started", "00007-support-chats started (attempt 1/3)"),
            (-1200, "warning", "rejected", "bad.jsonl rejected: line 3: expected a JSON object"),
            (-600, "error", "snapshot_corrupt", "snapshot daily-20251231 is CORRUPT: model.safetensors: hash mismatch"),
            (-300, "info", "snapshot", "snapshot manual-20260101-1100 taken")]
    return [{"time": NOW + dt, "level": level, "kind": kind, "message": msg} for dt, level, kind, msg in rows]


def frozen_metrics(steps: int = 1234) -> list[dict[str, Any]]:
    import math

    job = "00007-support-chats"
    out = [{"event": "job_start", "time": NOW - 1750, "job_id": job, "total_steps": 3000,
            "resumed_from_step": 0, "examples": 12000}]
    out += frozen_eval_round(job, "before", 0, 3.52)
    for s in range(1, steps + 1, 3):
        loss = 1.8 + 1.6 * math.exp(-s / 250) + 0.08 * math.sin(s / 7)
        out.append({"event": "step", "time": NOW - 1750 + s * 1.4, "step": s, "total_steps": 3000, "epoch": s / 3000,
                    "loss": round(loss, 4), "learning_rate": 2e-5, "grad_norm": 0.8, "tokens_per_s": 15000.0,
                    "tokens_seen": s * 16384})
        if s % 300 == 1 and s > 1:  # eval.every_steps = 300, logged after that step
            out += frozen_eval_round(job, "during", s, round(2.0 + 1.5 * math.exp(-s / 250), 4))
    return out


def frozen_eval_round(job: str, phase: str, step: int, own_loss: float) -> list[dict[str, Any]]:
    """One evaluation round's `eval` events: the job's own held-out lines and two earlier sources."""
    figures = {job: own_loss, "00006-faq": 1.95, "eval/general": 3.01}
    if phase == "before":
        figures = {job: own_loss}  # the current model's own figures cover the rest
    return [{"event": "eval", "time": NOW - 1750 + step * 1.4, "source": name, "phase": phase, "step": step,
             "loss": loss, "tokens": 4096, "lines": 200} for name, loss in figures.items()]


def frozen_snapshots() -> tuple[list[dict[str, Any]], str]:
    def summary(job: str) -> dict[str, Any] | None:  # as engine/store/snapshots.py records it
        from engine.quality import gate

        marker = dict(FROZEN_MARKERS).get(job)
        return gate.summary(marker["eval"]) if marker else None

    def snap(name: str, kind: str, age: float, state: str, step: int, loss: float, job: str) -> dict[str, Any]:
        return {"name": name, "kind": kind, "path": f"snapshots/{name}", "created_at": NOW - age, "age_seconds": age,
                "size": int(14.9 * GiB), "unique_bytes": 0, "files": 7, "hash_algorithm": "blake3",
                "source": {"model_version": job, "job_id": job, "file": f"{job}.jsonl", "step": step, "loss": loss,
                           "restored_from": None, "eval": summary(job)},
                "verification": {"state": state, "checked_at": NOW - age + 40, "seconds": 38.2, "problems": []}}
    return ([snap("daily-20251230", "scheduled", 2 * 86400 + 3600, "ok", 900, 2.013, "00005-docs"),
             snap("daily-20251231", "scheduled", 86400 + 3600, "corrupt", 1500, 1.955, "00006-faq"),
             snap("daily-20260101", "scheduled", 3 * 3600, "ok", 900, 1.912, "00006-faq"),
             snap("manual-20260101-1100", "manual", 300, "pending", 900, 1.912, "00006-faq")], "daily-20251230")


def _marker(job: str, own_before: float, own_after: float, **others: tuple[float, float]) -> tuple[str, dict]:
    sources = {name.replace("__", "/"): {"before": {"loss": b}, "after": {"loss": a}} for name, (b, a) in others.items()}
    sources[job] = {"before": {"loss": own_before}, "after": {"loss": own_after}}
    return job, {"job_id": job, "eval": {"step": 900, "own": job, "sources": sources}}


# Four evaluated versions: 00002-recipes forgot 00001-intro (+38%) and was held; 00006-faq is current.
FROZEN_MARKERS = [
    _marker("00001-intro", 3.10, 1.72, eval__general=(2.90, 2.95)),
    _marker("00002-recipes", 3.30, 1.60, eval__general=(2.95, 3.02), **{"00001-intro": (1.72, 2.37)}),
    _marker("00005-docs", 2.80, 1.95, eval__general=(2.95, 2.97), **{"00001-intro": (1.72, 1.75)}),
    _marker("00006-faq", 2.60, 1.91, eval__general=(2.97, 3.01),
            **{"00001-intro": (1.75, 1.77), "00005-docs": (1.95, 2.03)}),
]


def frozen_quality() -> dict[str, Any]:
    """What tui/quality.py's reader makes of FROZEN_MARKERS, with the default thresholds."""
    from engine.quality import forgetting

    return {"matrix": forgetting.build(FROZEN_MARKERS, "00006-faq", {"00002-recipes"}), "current": "00006-faq",
            "gate": "hold", "max_forgetting": 0.05, "min_improvement": 0.0, "config_problem": None}


def frozen_queue() -> list[dict[str, Any]]:
    return [{"state": "active", "name": "00007-support-chats.jsonl", "reason": None},
            {"state": "pending", "name": "more-chats.jsonl", "reason": None},
            {"state": "pending", "name": "wiki-2026.jsonl", "reason": None},
            {"state": "held", "name": "00002-recipes.jsonl",
             "reason": "forgetting: eval loss on 00001-intro 1.72 -> 2.37, +37.8% > 5%"},
            {"state": "failed", "name": "00004-huge.jsonl", "reason": "failed after 3 attempts: worker exited 1 (CUDA error)"},
            {"state": "rejected", "name": "00003-bad.jsonl", "reason": "line 3: expected a JSON object, got a list"},
            {"state": "done", "name": "00006-faq.jsonl", "reason": None},
            {"state": "done", "name": "00005-docs.jsonl", "reason": None}]


class FrozenSource:
    """The screen's data source in tests: one frozen status, events and metrics, then nothing."""

    def __init__(self, ws: Workspace, gpus: int = 0, state: str = "training", running: bool = True,
                 job: bool = True, reason: str | None = None, nodes: list[dict] | None = None,
                 dropped: list[tuple[str, str]] | None = None) -> None:
        self.ws, self.gpus, self.state, self.running = ws, gpus, state, running
        self.job, self.reason = job, reason  # job False: no file in hand; reason: the daemon state's reason
        self.nodes = nodes  # the machines of a job on several ([distributed] nodes)
        self.dropped = dropped or []  # (job id, file) whose training promoting the held file would drop

    def watch(self, post, stop: threading.Event) -> None:
        from tui.messages import DaemonLiveness, EventsAdded, MetricsAdded, StatusChanged

        status = frozen_status(self.ws, self.gpus, self.state)
        status["daemon"]["running"] = self.running
        status["daemon"]["reason"] = self.reason
        status["nodes"] = self.nodes
        if not self.job:
            status["job"] = None
        post(StatusChanged(status))
        post(MetricsAdded("00007-support-chats", frozen_metrics()))
        post(EventsAdded(frozen_events()))
        post(DaemonLiveness(self.running, 4242 if self.running else None))
        stop.wait()

    def listings(self):
        snaps, origin = frozen_snapshots()
        return frozen_queue(), snaps, origin, frozen_quality()

    def dropped_by_promote(self, job_id: str) -> list[tuple[str, str]]:
        from engine.quality.held import HeldError

        if job_id not in {e["name"].removesuffix(".jsonl") for e in frozen_queue() if e["state"] == "held"}:
            raise HeldError(f"{job_id}: not held")
        return self.dropped


def write_frozen_files(ws: Workspace, gpus: int = 0) -> None:
    """status.json, events.jsonl and one job's metrics, for tests that use the real reader."""
    ws.state.mkdir(parents=True, exist_ok=True)
    ws.status_path.write_text(json.dumps(frozen_status(ws, gpus)))
    ws.events_path.write_text("".join(json.dumps(e) + "\n" for e in frozen_events()))
    run = ws.run_dir("00007-support-chats")
    run.mkdir(parents=True, exist_ok=True)
    ws.queue("active").mkdir(parents=True, exist_ok=True)  # the job's file, where a training job's file is
    (ws.queue("active") / "00007-support-chats.jsonl").write_text('{"text": "hello"}\n')
    (run / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in frozen_metrics(60)))
