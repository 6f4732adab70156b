"""Alert hooks: a command and/or a webhook run for chosen events, on a thread of their own.

`[hooks] on` names the event kinds (or "alerts": every warning and error). The
event log hands each event to `Hooks.on_event`, a listener, on the daemon's
thread: it only decides whether the event is wanted and puts it on a bounded
queue, so a slow, hanging or failing hook never delays the daemon or training.
When the queue is full the event is dropped and counted. One background thread
runs the hooks, an event at a time:

- the command: `hooks.command` split with shlex (quotes group, nothing is a
  shell), each argument's placeholders filled, run in a session of its own and
  killed with its whole process group at `hooks.timeout_seconds`;
- the webhook: the event POSTed with urllib, in the body `webhook_format` says,
  waiting at most the same timeout.

Each run is counted (ok or failed, by kind) and written to state/hooks.log
with a header line; nothing is retried. A write the disk refuses drops that
log line. The settings are read per event, so an edit of [hooks] applies to
the next one. On shutdown the queue is worked off for at most one timeout;
then a hook still running is killed and what is left is dropped.

It never raises into the daemon, never waits on a hook on the daemon's thread,
and writes nothing but state/hooks.log.
"""

from __future__ import annotations

import http.client
import json
import os
import queue
import re
import signal
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from engine.core import atomic
from engine.core.config import HOOK_PLACEHOLDERS, HooksConfig, did_you_mean, split_hook_command
from engine.store.eventlog import KINDS

if TYPE_CHECKING:
    from engine.store.workspace import Workspace

QUEUE_SIZE = 100  # events waiting for the hook thread at most; past it they are dropped and counted
OUTPUT_LIMIT = 16 * 1024  # bytes of a run's output (or a server's reply) kept in state/hooks.log
DISCORD_LIMIT = 2000  # characters Discord takes in a message's content
_PLACEHOLDER = re.compile(r"\{(" + "|".join(HOOK_PLACEHOLDERS) + r")\}")
_JOB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

ALERTS = "alerts"  # in hooks.on: every event of level warning or error


def config_notes(config: HooksConfig) -> list[str]:
    """What in [hooks] looks like a mistake but is allowed: an unknown kind, hooks that can never fire."""
    notes = []
    for name in config.on:
        if name != ALERTS and name not in KINDS:
            notes.append(f"hooks.on: {name!r} is no event kind traind records today "
                         f"({did_you_mean(name, [*KINDS, ALERTS])}'alerts' means every warning and error); "
                         "it is kept, and fires if such an event comes")
    has_hook = config.command != "off" or config.webhook != "off"
    if config.on and not has_hook:
        notes.append("hooks.on is set but hooks.command and hooks.webhook are both 'off': nothing is run")
    if has_hook and not config.on:
        notes.append("hooks.command or hooks.webhook is set but hooks.on is empty: no event runs it")
    return notes


def fill(template_args: list[str], fields: dict[str, str]) -> list[str]:
    """Each argument with its placeholders replaced by the event's fields (a missing one by ""): a value
    never splits an argument or reaches a shell."""
    return [_PLACEHOLDER.sub(lambda m: fields.get(m[1], ""), arg) for arg in template_args]


def _text(value: Any) -> str:
    return "" if value is None else str(value)


def webhook_request(config: HooksConfig, event: dict[str, Any], fields: dict[str, str]) -> urllib.request.Request:
    """The POST for one event, its body in the shape `webhook_format` names."""
    fmt = config.webhook_format
    line = f"traind ({fields['workspace_name']}) {event['kind']}: {event.get('message', '')}"
    headers = {"Content-Type": "application/json", "User-Agent": "traind-hooks"}
    if fmt == "ntfy":  # a plain body, with ntfy's own headers for the title and priority (latin-1 only)
        level = event.get("level")
        headers.update({"Content-Type": "text/plain; charset=utf-8", "Title": f"traind: {event['kind']}",
                        "Priority": {"error": "high", "warning": "default"}.get(level, "low"),
                        "Tags": {"error": "rotating_light", "warning": "warning"}.get(level, "information_source")})
        body = str(event.get("message", "")).encode()
    elif fmt == "slack":
        body = atomic.dumps({"text": line}).encode()
    elif fmt == "discord":
        body = atomic.dumps({"content": line[:DISCORD_LIMIT]}).encode()
    else:
        body = atomic.dumps(event).encode()
    return urllib.request.Request(config.webhook, data=body, headers=headers, method="POST")


def _where(url: str) -> str:
    """A webhook as the log names it: its scheme and host, never its path (Slack's and Discord's carry the key)."""
    parts = urllib.parse.urlsplit(url)
    return f"{parts.scheme}://{parts.hostname or ''}" + (f":{parts.port}" if parts.port else "")


class Hooks:
    """The daemon's alert hooks. `on_event` is an event log listener; `configure` takes a reloaded [hooks];
    `close` stops the thread. `fired`, `failed`, `dropped` and `by_kind` count from the daemon's start."""

    def __init__(self, ws: "Workspace", config: HooksConfig,
                 context: Callable[[dict[str, Any]], dict[str, Any]] | None = None):
        self.ws = ws
        self.config = config
        self.context = context  # on the daemon's thread: fields the daemon knows about a wanted event (file, step, loss)
        self.fired = 0  # runs made (a command run, a webhook POST)
        self.failed = 0  # of them: a non-zero exit, a timeout, a command that could not start, an HTTP error
        self.dropped = 0  # events never run: the queue was full, or the daemon was shutting down
        self.by_kind: dict[str, dict[str, int]] = {}  # kind -> {"fired": n, "failed": n}
        self._queue: queue.Queue[tuple[dict[str, Any], dict[str, Any], HooksConfig] | None] = queue.Queue()
        self._lock = threading.Lock()  # the counters, and the running process
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen | None = None
        self._closing = False
        self._abandon = threading.Event()  # shutdown's time is up: kill what runs, drop what waits
        self._dropped_logged = 0

    # -- the daemon's thread -------------------------------------------------------------------

    def configure(self, config: HooksConfig) -> None:
        """A reloaded [hooks]: events from now on use it (one already queued keeps the settings it was queued with)."""
        self.config = config

    def wants(self, event: dict[str, Any]) -> bool:
        c = self.config
        if c.command == "off" and c.webhook == "off":
            return False
        return event.get("kind") in c.on or (ALERTS in c.on and event.get("level") in ("warning", "error"))

    def on_event(self, event: dict[str, Any]) -> None:
        if self._closing or not self.wants(event):
            return
        if self._queue.qsize() >= QUEUE_SIZE:  # only this thread puts, so the bound holds
            with self._lock:
                self.dropped += 1
            return
        extra = self.context(event) if self.context else {}
        self._queue.put((event, extra, self.config))
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="traind-hooks", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Work off the queue for at most one timeout, then kill a hook still running and drop the rest."""
        self._closing = True
        thread = self._thread
        if thread is None:
            return
        self._queue.put(None)
        thread.join(self.config.timeout_seconds)
        if thread.is_alive():
            self._abandon.set()
            self._kill_running()
            thread.join(2.0)  # a killed command ends at once; a webhook mid-request is left to its socket timeout

    def counts(self) -> dict[tuple[str, str], dict[tuple[str, ...], int]]:
        """For /metrics (engine/ops/metrics.py's extra sources): runs by result, and events dropped."""
        with self._lock:
            return {("traind_hook_runs", "Alert hook runs (a command run, a webhook POST) by result, and events "
                     "dropped without a run (the queue full, or at shutdown)."):
                    {("ok",): self.fired - self.failed, ("failed",): self.failed, ("dropped",): self.dropped}}

    # -- the hook thread -------------------------------------------------------------------------

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._abandon.is_set():
                with self._lock:
                    self.dropped += 1
                continue
            event, extra, config = item
            try:
                fields = self.fields(event, extra)
                if config.command != "off":
                    self._ran(event, *self.run_command(config, fields))
                if config.webhook != "off" and not self._abandon.is_set():
                    self._ran(event, *self.post(config, event, fields))
            except Exception as e:  # a bug here must cost one event's hooks, never the thread
                self._ran(event, False, f"internal error: {type(e).__name__}: {e}", b"")
        self._log(b"")  # the count of what shutdown dropped

    def fields(self, event: dict[str, Any], extra: dict[str, Any]) -> dict[str, str]:
        """The placeholders' values for one event: its own fields first, then what the daemon added."""
        job = _text(event.get("job_id") or extra.get("job_id"))
        file = event.get("file") or extra.get("file") or self._original_name(job)
        return {"kind": _text(event.get("kind")), "level": _text(event.get("level")),
                "message": _text(event.get("message")), "job": job, "file": _text(file),
                "step": _text(event["step"] if event.get("step") is not None else extra.get("step")),
                "loss": _text(event["loss"] if event.get("loss") is not None else extra.get("loss")),
                "workspace": str(self.ws.root), "workspace_name": self.ws.root.name}

    def _original_name(self, job: str) -> str:
        """The name a job's file came in as, from its record (read here, off the daemon's thread)."""
        if not _JOB_ID.fullmatch(job):
            return ""
        try:
            with open(self.ws.run_dir(job) / "job.json", "rb") as f:
                return _text(json.load(f).get("original_name"))
        except (OSError, ValueError, AttributeError):
            return ""

    def run_command(self, config: HooksConfig, fields: dict[str, str]) -> tuple[bool, str, bytes]:
        argv = fill(split_hook_command(config.command), fields)
        what = f"command {argv[0]}"
        with tempfile.TemporaryFile() as out:  # a file, not a pipe: a grandchild holding it open cannot hang us
            try:
                proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                        cwd=self.ws.root, start_new_session=True)
            except (OSError, ValueError) as e:
                return False, f"{what}: cannot run: {e}", b""
            with self._lock:
                self._proc = proc
                abandoned = self._abandon.is_set()  # shutdown's kill came between the last run and this one
            if abandoned:
                self._kill_running()
            try:
                code = proc.wait(config.timeout_seconds)
                ok, status = code == 0, f"exit {code}"
            except subprocess.TimeoutExpired:
                self._kill_running()
                proc.wait()
                ok, status = False, f"killed at timeout ({config.timeout_seconds:g}s)"
            finally:
                with self._lock:
                    self._proc = None
            if self._abandon.is_set() and not ok:
                status = "killed at daemon shutdown"
            out.seek(0)
            return ok, f"{what}: {status}", out.read(OUTPUT_LIMIT)

    def _kill_running(self) -> None:
        with self._lock:
            proc = self._proc
            if proc is not None and proc.returncode is None:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)  # its own session: the pid is the group
                except (ProcessLookupError, PermissionError):
                    pass

    def post(self, config: HooksConfig, event: dict[str, Any], fields: dict[str, str]) -> tuple[bool, str, bytes]:
        what = f"webhook {_where(config.webhook)}"
        try:
            with urllib.request.urlopen(webhook_request(config, event, fields), timeout=config.timeout_seconds) as r:
                return True, f"{what}: HTTP {r.status}", r.read(OUTPUT_LIMIT)
        except urllib.error.HTTPError as e:
            try:
                reply = e.read(OUTPUT_LIMIT)
            except (OSError, http.client.HTTPException):
                reply = b""
            return False, f"{what}: HTTP {e.code} {e.reason}", reply
        except urllib.error.URLError as e:
            return False, f"{what}: {e.reason}", b""
        except TimeoutError:
            return False, f"{what}: no answer within {config.timeout_seconds:g}s", b""
        except (OSError, http.client.HTTPException, ValueError) as e:
            return False, f"{what}: {type(e).__name__}: {e}", b""

    def _ran(self, event: dict[str, Any], ok: bool, status: str, output: bytes) -> None:
        kind = str(event.get("kind"))
        with self._lock:
            self.fired += 1
            self.failed += not ok
            counts = self.by_kind.setdefault(kind, {"fired": 0, "failed": 0})
            counts["fired"] += 1
            counts["failed"] += not ok
        text = f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {kind}: {status}\n".encode()
        if output:
            text += output if output.endswith(b"\n") else output + b"\n"
        self._log(text)

    def _log(self, text: bytes) -> None:
        """Append to state/hooks.log, after a line for events dropped since the last one."""
        with self._lock:
            dropped, self._dropped_logged = self.dropped - self._dropped_logged, self.dropped
        if dropped:
            text = (f"=== {time.strftime('%Y-%m-%d %H:%M:%S')} {dropped} event(s) dropped without a run (the "
                    "queue was full, or the daemon was shutting down)\n").encode() + text
        if not text:
            return
        try:
            atomic.append_bytes(self.ws.hooks_log, text, sync=False)
        except OSError:
            pass  # the log is for people; a disk that refuses it must not stop the hooks
