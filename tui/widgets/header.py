"""The top lines: workspace, daemon state, current file and the job's progress.

Draws from the status document alone (docs/status.md); it never reads files.
When no daemon runs it says so, keeps the last progress it had, and offers `S`.
"""

from __future__ import annotations

from typing import Any

from rich.text import Text
from textual.widgets import Static

from engine.core.resources import format_bytes
from engine.api.status import format_duration
from tui.keys import for_keys

STATE_STYLE = {"training": "bold green", "paused": "bold yellow", "blocked": "bold red", "stopped": "bold magenta",
               "idle": "bold cyan", "validating": "bold cyan", "starting": "cyan", "rolling_back": "bold yellow",
               "shutting_down": "yellow", "offline": "bold red"}


def _num(value: Any, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


class Header(Static):
    """Two lines: who and what state; how far the job is."""

    def __init__(self, workspace: str, read_only: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.workspace = workspace
        self.read_only = read_only
        self.launching = False  # the UI is starting a daemon: "not running" is not what the user should read
        self.status: dict[str, Any] = {}
        self.running: bool | None = None  # None: not known yet
        self.shown: Text | None = None

    def on_mount(self) -> None:
        self.refresh_text()

    def show_status(self, status: dict[str, Any], now: float) -> None:
        self.status = status
        if "running" in (status.get("daemon") or {}):
            self.running = bool(status["daemon"]["running"])
        self.refresh_text(now)

    def show_liveness(self, running: bool, now: float | None = None) -> None:
        self.running = running
        self.refresh_text(now)

    def refresh_text(self, now: float | None = None) -> None:
        daemon = self.status.get("daemon") or {}
        state = daemon.get("state") or "starting"
        if self.running is False:
            state = "offline"
        self.set_class(state == "offline", "-offline")
        line = Text.assemble(("traind ", "bold"), (self.workspace, "dim"), "  ")
        if self.read_only:
            line.append("read-only  ", "bold yellow")
        if state == "offline" and self.launching:
            line.append("● starting a daemon", STATE_STYLE["starting"])
        elif state == "offline":
            last = daemon.get("last_state") or (daemon.get("state") if daemon.get("state") != "offline" else None)
            line.append("● daemon not running", STATE_STYLE["offline"])
            if last:
                line.append(f" (was {last})", "red")
            if not self.read_only:
                line.append("  S starts it", "bold")
        else:
            line.append(f"● {state}", STATE_STYLE.get(state, "bold"))
            if daemon.get("reason"):
                line.append(f": {for_keys(daemon['reason'])}", "red" if state == "blocked" else "")
            if daemon.get("started_at") and now is not None:
                line.append(f"  up {format_duration(now - daemon['started_at'])}", "dim")
        job = self.status.get("job")
        second = Text()
        if job:
            line.append("  ")
            line.append(str(job.get("original_name") or job.get("id")), "bold")
            step, total = job.get("step") or 0, job.get("total_steps")
            if job.get("phase") == "tokenizing":  # the token cache being built: no step yet
                second.append(f"tokenizing: {job.get('tokenizing') or 0:.0f}%  ", "bold")
            second.append(f"step {step}/{total or '?'}", "bold")
            if job.get("percent") is not None:
                second.append(f" {job['percent']:.0f}%")
            second.append(f"  loss {_num(job.get('loss'), '.4f')}")
            second.append(f"  {_num(job.get('tokens_per_s'), ',.0f')} tok/s")
            second.append(f"  ETA {format_duration(job.get('eta_s'))}")
            second.append(f"  elapsed {format_duration(job.get('elapsed_s'))}")
            if (job.get("attempt") or 1) > 1:
                second.append(f"  attempt {job['attempt']}", "yellow")
            if job.get("failures"):  # failed attempts in a row without progress, of the limit
                second.append(f"  failures {job['failures']}/{job.get('max_attempts')}", "yellow")
            if (job.get("replay") or {}).get("examples"):  # earlier files' examples mixed into this one
                second.append(f"  +{job['replay']['examples']} replayed", "cyan")
            if job.get("method") in ("lora", "qlora"):  # what this job trains: an adapter on a frozen base
                second.append(f"  {job['method']}", "cyan")
            gpu = ((self.status.get("resources") or {}).get("gpu") or {}).get("mode") == "gpu"
            if gpu and job.get("memory_estimate"):  # beside the GPU panel's measured use, so it can be checked
                second.append(f"  est {format_bytes(job['memory_estimate'])}", "dim")
        else:
            q = self.status.get("queue") or {}
            second.append(f"no job in hand; {q.get('inbox', 0)} waiting in the inbox", "dim")
        text = Text("\n").join([line, second])
        text.no_wrap, text.overflow = True, "ellipsis"  # two lines, always: the layout counts on it
        if text != self.shown:  # called every second and on every status: repaint only a change
            self.shown = text
            self.update(text, layout=False)  # two lines in a fixed height: nothing to reflow
