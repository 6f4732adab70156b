"""The status document: what the daemon writes to state/status.json, and `traind status`.

The daemon replaces status.json atomically on every state change and every
second while training. `traind status` asks a running daemon on its socket
(the live document, right even while a full disk keeps status.json from being
replaced). With no daemon, the answer is computed from the files: the lock says
none runs, the queue counts come from the folders, the current model from
models/current.json, snapshots from snapshots/, the disk reserve from
traind.toml, memory and disk are measured now; status.json gives only what
nothing else keeps (the last state, the active job's last progress). So it is
right after an offline rollback, and when the last daemon died mid-sentence.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from engine.api import control
from engine.cluster import nodes
from engine.core import reading, resources
from engine.store import bases, jobs, lock, models, snapshots, statefiles
from engine.core.atomic import dumps
from engine.core.config import ConfigError
from engine.store.eventlog import recent
from engine.core.resources import format_bytes
from engine.store.workspace import QUEUE_STATES, Workspace

SCHEMA = 1
DAEMON_STATES = ("starting", "idle", "validating", "training", "paused", "stopped", "blocked",
                 "rolling_back", "shutting_down", "offline")


def queue_counts(ws: Workspace) -> dict[str, int]:
    counts = {state: len(jobs.listing(ws, state)) for state in QUEUE_STATES}
    try:
        counts["inbox"] = sum(1 for n in os.listdir(ws.inbox) if reading.suffix(n) and not n.startswith("."))
    except FileNotFoundError:
        counts["inbox"] = 0
    return counts


ASK_TIMEOUT = 5.0  # a daemon that does not answer this fast (busy, or hung): status.json is read instead


def _from_daemon(ws: Workspace) -> dict[str, Any] | None:
    try:
        answer = control.request(ws.control_socket, "status", timeout=ASK_TIMEOUT)
    except (control.NotRunning, control.NoReply, OSError, ValueError):
        return None
    doc = answer.get("status")
    return doc if answer.get("ok") and isinstance(doc, dict) else None


def _from_file(ws: Workspace) -> dict[str, Any]:
    try:
        with open(ws.status_path, "rb") as f:
            doc = json.loads(f.read())
        if isinstance(doc, dict):
            return doc
    except (FileNotFoundError, ValueError):
        pass
    return {"schema": SCHEMA, "daemon": {"state": "offline"}, "job": None, "model": None, "last_error": None}


def read(ws: Workspace, ask: bool = True) -> dict[str, Any]:
    """The running daemon's own answer (`ask`), else status.json as last written, corrected by what can be
    known now (is a daemon running, the queue)."""
    pid = lock.holder(ws.lock_path)
    doc = (_from_daemon(ws) if ask and pid is not None else None) or _from_file(ws)
    daemon = doc.setdefault("daemon", {})
    daemon["running"] = pid is not None
    if pid is None:
        _offline(ws, doc)
    doc["queue"] = queue_counts(ws)
    doc["workspace"] = str(ws.root)
    return doc


def _configured_reserve(ws: Workspace, doc: dict[str, Any]) -> int | None:
    """The disk reserve a daemon started now would keep: traind.toml's; the last daemon's only while the file
    cannot be read (a mistake in [disk] is for the daemon to report)."""
    try:
        return ws.load_section("disk").reserve
    except ConfigError:
        return ((doc.get("resources") or {}).get("disk") or {}).get("reserve")


def _offline(ws: Workspace, doc: dict[str, Any]) -> None:
    """No daemon: what status.json says is history; what the files say now replaces it."""
    daemon = doc["daemon"]
    if daemon.get("state") not in (None, "offline"):
        daemon["last_state"] = daemon.get("state")
    daemon.update(state="offline", pid=None, reason=None, worker_pid=None, warm_worker=False)
    try:
        pointer = models.current(ws)
        doc["model"] = {**pointer, "adapter": bases.current_summary(ws, pointer)}
    except (FileNotFoundError, statefiles.Damaged, ValueError):
        doc["model"] = None
    job = doc.get("job")
    if isinstance(job, dict) and any(reading.stem(n) == job.get("id") for n in jobs.listing(ws, "active")):
        # Where it got to, kept; nothing runs it now.
        doc["job"] = {**job, "phase": "interrupted", "tokens_per_s": None, "eta_s": None}
    else:
        doc["job"] = None
    disk = resources.disk_usage(ws.root)
    disk["reserve"] = _configured_reserve(ws, doc)
    doc["resources"] = {"gpu": {}, "memory": resources.machine_memory(), "worker_rss": None, "disk": disk}
    doc["snapshots"] = snapshots.summary(ws)
    doc["metrics_url"] = None  # nothing serves it with no daemon


def format_duration(seconds: float | None) -> str:
    """'42s', '3m07s', '2h05m', '3d04h'; '-' when unknown. The CLI and the UI say durations alike."""
    if seconds is None:
        return "-"
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h >= 24:
        return f"{h // 24}d{h % 24:02d}h"
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s" if m else f"{s}s"


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _resource_lines(res: dict[str, Any]) -> list[str]:
    lines = []
    gpu, memory, disk = res.get("gpu") or {}, res.get("memory") or {}, res.get("disk") or {}
    rss = f"worker RSS {format_bytes(res['worker_rss'])}; " if res.get("worker_rss") else ""
    if memory:
        mem = f"memory {format_bytes(memory['available'])} available of {format_bytes(memory['total'])}"
        if gpu.get("mode") == "gpu" or not gpu:  # no gpu sample: no daemon measured it
            lines.append(f"host       {rss}{mem}")
        else:
            lines.append(f"cpu mode   {rss}{mem}" + (f" ({gpu['reason']})" if gpu.get("reason") else ""))
    for d in gpu.get("devices", []) if gpu.get("mode") == "gpu" else []:
        if d.get("error"):
            lines.append(f"gpu {d['index']:<6} {d.get('name') or '?'}: {d['error']}")
            continue
        used = f"{format_bytes(d['memory_used'])}/{format_bytes(d['memory_total'])}" if d.get("memory_total") else "?"
        parts = [used, f"{d['utilization_percent']}%" if d.get("utilization_percent") is not None else None,
                 f"{d['temperature_c']}°C" if d.get("temperature_c") is not None else None,
                 f"{d['power_w']:.0f} W" if d.get("power_w") is not None else None,
                 f"worker {format_bytes(d['worker_memory'])}" if d.get("worker_memory") else None]
        lines.append(f"gpu {d['index']:<6} {d.get('name')}: " + ", ".join(p for p in parts if p))
    if disk.get("total"):
        ckpt = f"; last checkpoint {format_bytes(disk['last_checkpoint_bytes'])}" if disk.get("last_checkpoint_bytes") else ""
        lines.append(f"disk       {format_bytes(disk['free'])} free of {format_bytes(disk['total'])} "
                     f"(reserve {format_bytes(disk.get('reserve') or 0)}){ckpt}")
    return lines


def render(doc: dict[str, Any], events: list[dict[str, Any]]) -> str:
    d = doc["daemon"]
    lines = [f"workspace  {doc['workspace']}"]
    if d.get("running"):
        reason = f" ({d['reason']})" if d.get("reason") else ""
        lines.append(f"daemon     {d['state']}{reason}, PID {d.get('pid')}, up {format_duration(time.time() - d['started_at']) if d.get('started_at') else '?'}")
    else:
        last = f" (last state: {d['last_state']})" if d.get("last_state") else ""
        lines.append(f"daemon     not running{last}")
    job = doc.get("job")
    if job:
        step = f"step {job.get('step', 0)}/{job.get('total_steps') or '?'}"
        pct = f" ({job['percent']:.0f}%)" if job.get("percent") is not None else ""
        lines.append(f"job        {job['id']} ({job.get('original_name')}), {job.get('phase')}, attempt {job.get('attempt')}"
                     + (f", failures {job['failures']}/{job.get('max_attempts')}" if job.get("failures") else ""))
        if job.get("phase") == "tokenizing":
            lines.append(f"progress   tokenizing: {job.get('tokenizing') or 0:.0f}%")
        else:
            lines.append(f"progress   {step}{pct}, loss {_num(job.get('loss'), '.4f')}, lr {_num(job.get('learning_rate'), '.2e')}, "
                         f"{_num(job.get('tokens_per_s'), ',.0f')} tok/s, ETA {format_duration(job.get('eta_s'))}, elapsed {format_duration(job.get('elapsed_s'))}")
        if job.get("replay"):
            lines.append(f"replay     {replay_text(job['replay'])}")
        if job.get("sharding"):
            lines.append(f"sharding   {sharding_text(job)}")
    lines.extend(_resource_lines(doc.get("resources") or {}))
    lines.extend(f"node       {nodes.describe(row)}" for row in doc.get("nodes") or [])
    q = doc["queue"]
    lines.append(f"queue      {q['inbox']} waiting, {q['pending']} pending, {q['active']} active, {q['done']} done, {q.get('held', 0)} held, {q['failed']} failed, {q['rejected']} rejected")
    model = doc.get("model")
    if model:
        adapter = model.get("adapter")
        on = f" ({adapter['method']} adapter r{adapter['r']} on {adapter['base']['path']})" if adapter else ""
        lines.append(f"model      {model.get('version') or model.get('path')}{on}")
    if doc.get("metrics_url"):
        lines.append(f"metrics    {doc['metrics_url']}")
    if doc.get("last_error"):
        lines.append(f"last error {doc['last_error']['message']}")
    if events:
        lines.append("recent events")
        for e in events:
            stamp = time.strftime("%m-%d %H:%M:%S", time.localtime(e["time"]))
            lines.append(f"  {stamp} {e['level']:<7} {e['message']}")
    return "\n".join(lines)


def main(ws: Workspace, as_json: bool) -> int:
    doc = read(ws)
    if as_json:
        print(dumps(doc, indent=2))
    else:
        print(render(doc, recent(ws, 8)))
    return 0


def sharding_text(job: dict[str, Any]) -> str:
    """'fsdp on 2 ranks, 98,464 of 196,928 parameters a rank; peak 1.2 GiB a rank (estimated 1.4 GiB)': how the
    job in hand divides its model (job_start's `sharding`) and, once it ended, what each rank held at most."""
    sharding = job["sharding"]
    text = f"{sharding.get('method')} on {sharding.get('ranks')} ranks"
    if sharding.get("params_per_rank") is not None and sharding.get("params_total") is not None:
        text += f", {sharding['params_per_rank']:,} of {sharding['params_total']:,} parameters a rank"
    peaks = sorted(p for p in job.get("peak_memory_per_rank") or () if p is not None)  # null: a CPU rank
    if peaks:
        spread = format_bytes(peaks[0]) if format_bytes(peaks[0]) == format_bytes(peaks[-1]) else \
            f"{format_bytes(peaks[0])} to {format_bytes(peaks[-1])}"
        text += f"; peak {spread} a rank"
        if job.get("memory_estimate"):
            text += f" (estimated {format_bytes(job['memory_estimate'])})"
    return text


def replay_text(replay: dict[str, Any]) -> str:
    """'120 earlier examples from 3 files (00001-a 50, ...)': what a job mixes in from the replay pool."""
    sources = replay.get("sources") or {}
    named = ", ".join(f"{name} {count}" for name, count in list(sources.items())[:3]) + (", ..." if len(sources) > 3 else "")
    return f"{replay.get('examples', 0)} earlier examples from {len(sources)} file(s) ({named})"
