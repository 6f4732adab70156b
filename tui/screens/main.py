"""The dashboard: header, loss chart (or the quality view in its place), GPU, disk, queue, snapshots
and events, and the keys that send commands to the daemon.

Data comes in as messages (tui/messages.py) from the workspace reader, a thread
worker, and from a slow listing poll (queue folders, snapshot manifests, the
forgetting matrix when a version or the gate's settings changed) in a second
thread worker; handlers only hand data to panels, inside one batch update.
Commands go out through tui/client.py in async workers, so no key ever blocks
the screen. Nothing here stops training on exit.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any, Protocol

from textual import work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Grid
from textual.message import Message
from textual.screen import Screen

from engine.quality import held
from engine.store import lock
from engine.api.control import NotRunning
from engine.core.reading import stem
from engine.core.resources import pid_alive
from engine.store.workspace import Workspace
from tui import client
from tui.keys import CHANGES, KEYS, READ_ONLY, for_keys, key_of
from tui.messages import DaemonLiveness, EventsAdded, MetricsAdded, StatusChanged
from tui.quality import QualityReader
from tui.widgets.confirm import ConfirmScreen
from tui.widgets.disk_panel import DiskPanel
from tui.widgets.event_log import EventLog
from tui.widgets.gpu_panel import GpuPanel
from tui.widgets.header import Header
from tui.widgets.key_bar import KeyBar
from tui.widgets.loss_chart import LossChart
from tui.widgets.quality_panel import QualityPanel
from tui.widgets.queue_panel import QueuePanel, read_queue
from tui.widgets.snapshot_panel import SnapshotPanel, read_snapshots

LISTING_INTERVAL = 3.0  # seconds between reads of the queue folders, snapshot manifests and (when changed) the matrix
WIDE_FROM = 120  # columns: the wide layout of tui/app.tcss
HEADER_ROWS, NARROW_BOTTOM_ROWS, DISK_ROWS = 2, 7, 5  # as tui/app.tcss sizes them
RIGHT_COLUMN, RIGHT_SHARE = 46, 0.3  # wide: the resources and event log column, wider on a wide terminal
PALETTE = Binding("ctrl+p", "app.command_palette", "palette", id="palette")  # the app's own key, in the bar too


class ListingsRead(Message):
    """The queue folders, the snapshot list and the quality document (tui/quality.py), as read by the
    listing poll."""

    def __init__(self, queue: list[dict[str, Any]], snapshots: list[dict[str, Any]], current_from: str | None,
                 quality: dict[str, Any]) -> None:
        super().__init__()
        self.queue, self.snapshots, self.current_from, self.quality = queue, snapshots, current_from, quality

    def can_replace(self, message: Message) -> bool:
        return isinstance(message, ListingsRead)


class Source(Protocol):
    """Where the screen's data comes from: the workspace (WorkspaceSource) or a test's frozen copy."""

    def watch(self, post: Callable[[Message], Any], stop: threading.Event) -> None: ...
    def listings(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None, dict[str, Any]]: ...
    def dropped_by_promote(self, job_id: str) -> list[tuple[str, str]]: ...


class WorkspaceSource:
    def __init__(self, ws: Workspace) -> None:
        self.ws = ws
        self.quality = QualityReader(ws)

    def watch(self, post: Callable[[Message], Any], stop: threading.Event) -> None:
        from tui.reader import WorkspaceWatcher

        WorkspaceWatcher(self.ws, post).run(stop)

    def listings(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None, dict[str, Any]]:
        return (read_queue(self.ws), *read_snapshots(self.ws), self.quality.read())

    def dropped_by_promote(self, job_id: str) -> list[tuple[str, str]]:
        """(job id, file) of each accepted job whose training promoting the held job would drop; HeldError if
        it cannot be promoted at all. Reads job records: call it from a thread worker."""
        return held.dropped(self.ws, held.check(self.ws, job_id, force=True))


# EMA weights the chart steps through with [ and ]: 0 draws the raw loss again.
SMOOTHING_STEPS = (0.0, 0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995)


class MainScreen(Screen[None]):
    BINDINGS = KEYS
    AUTO_FOCUS = "#events"
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (WIDE_FROM, "-wide")]
    BOTTOM = ("queue", "snapshots", "events")  # narrow: one of these shows, the focused one

    def __init__(self, ws: Workspace, source: Source, clock: Callable[[], float], read_only: bool = False) -> None:
        super().__init__()
        self.ws, self.source, self.clock, self.read_only = ws, source, clock, read_only
        self.status: dict[str, Any] = {}
        self.running: bool | None = None
        self.launching = False  # this UI is starting a daemon: "none runs" is not news then
        self.launched_pid: int | None = None  # the daemon this UI started, announced once
        self.snapshot_rows: list[dict[str, Any]] = []
        self.stop_event = threading.Event()

    def compose(self) -> ComposeResult:
        yield Header(str(self.ws.root), read_only=self.read_only, id="header")
        with Grid(id="body"):  # placement by breakpoint: tui/app.tcss
            yield LossChart(id="chart")
            yield QualityPanel(id="quality", classes="panel")  # shown in the chart's place by `e`
            yield GpuPanel(id="gpu", classes="panel")
            yield DiskPanel(id="disk", classes="panel")
            yield EventLog(clock=self.clock, id="events", classes="panel -shown")
            yield QueuePanel(id="queue", classes="panel")
            yield SnapshotPanel(id="snapshots", classes="panel")
        yield KeyBar([*KEYS[:-1], PALETTE, KEYS[-1]], id="footer")  # quit last, after the palette

    def on_mount(self) -> None:
        self.header = self.query_one(Header)
        self._show_launching(self.launching)
        self.chart = self.query_one(LossChart)
        self.gpu = self.query_one(GpuPanel)
        self.disk = self.query_one(DiskPanel)
        self.queue = self.query_one(QueuePanel)
        self.snapshots = self.query_one(SnapshotPanel)
        self.quality = self.query_one(QualityPanel)
        self.events = self.query_one(EventLog)
        self.body = self.query_one("#body", Grid)
        self.footer = self.query_one(KeyBar)
        self.gpu.border_title, self.disk.border_title = "GPU", "Disk"
        self.watch_workspace()
        self.poll_listings()
        self.set_interval(1.0, lambda: self.header.refresh_text(self.clock()))

    def on_unmount(self) -> None:
        self.stop_event.set()

    # -- data in -----------------------------------------------------------------------------

    @work(thread=True, exclusive=True, exit_on_error=False, group="watch")
    def watch_workspace(self) -> None:
        self.source.watch(self.post_message, self.stop_event)

    @work(thread=True, exclusive=True, exit_on_error=False, group="listings")
    def poll_listings(self) -> None:
        while not self.stop_event.is_set():
            try:
                self.post_message(ListingsRead(*self.source.listings()))
            except Exception as e:  # a folder half-moved under us: try again next round
                self.app.log.warning(f"listing failed: {e!r}")
            self.stop_event.wait(LISTING_INTERVAL)

    def on_status_changed(self, message: StatusChanged) -> None:
        status = message.status
        self.status = status
        resources = status.get("resources") or {}
        with self.app.batch_update():
            self.header.show_status(status, self.clock())
            self.gpu.show(resources, status.get("nodes"), (status.get("job") or {}).get("sharding"))
            self.disk.show(resources.get("disk") or {})
            job_id = (status.get("job") or {}).get("id")
            if job_id and getattr(self.chart, "current_job", None) != job_id:
                self.chart.current_job = job_id
        if "running" in (status.get("daemon") or {}):
            self._set_running(bool(status["daemon"]["running"]), status["daemon"].get("pid"))

    def on_metrics_added(self, message: MetricsAdded) -> None:
        self.chart.add_events(message.job_id, message.events)
        message.applied.set()

    def on_events_added(self, message: EventsAdded) -> None:
        self.events.add_events(message.events)

    def on_daemon_liveness(self, message: DaemonLiveness) -> None:
        self._set_running(message.running, message.pid)

    def on_listings_read(self, message: ListingsRead) -> None:
        self.snapshot_rows = message.snapshots
        with self.app.batch_update():
            self.queue.show(message.queue)
            self.snapshots.show(message.snapshots, message.current_from, self.clock(),
                                message.quality["max_forgetting"])
            self.quality.show(message.quality)

    def _set_running(self, running: bool, pid: int | None) -> None:
        if not running and self.launched_pid is not None and lock.holder(self.ws.lock_path) == self.launched_pid:
            running, pid = True, self.launched_pid  # a report read before the daemon started here took the lock
        if running or (self.launched_pid is not None and not pid_alive(self.launched_pid)):
            self._show_launching(self.launching)  # the daemon runs (or the one started here died)
        was, self.running = self.running, running
        self.set_class(not running, "-offline")
        self.header.show_liveness(running, self.clock())
        if was is running:
            return
        if not running and self.launching:  # not news: the UI is starting one, and says when it runs
            self.events.note("no daemon was running on this workspace: starting one")
        elif running and (self.launching or (pid is not None and pid == self.launched_pid)):
            return  # the launch announces it, once
        elif not running:
            text = ("the daemon stopped; the last data stays on screen. Press S to start it again" if was
                    else "no daemon is running on this workspace. Press S to start one")
            if self.read_only:  # S would be refused: say how to start one instead
                text = text.split(". Press S")[0] + f" ({READ_ONLY}: 'traind daemon' starts one)"
            self.events.note(text, "error")
            self.notify(text, title="daemon not running", severity="error", timeout=10)
        elif was is False:
            self.events.note(f"a daemon is running again (PID {pid})")
            self.notify(f"daemon running (PID {pid})", title="daemon")

    # -- narrow layout: the focused bottom panel is the one shown ------------------------------

    def on_resize(self, event) -> None:
        width = event.size.width
        # Wide, the right column takes a share of a terminal wider than 150 columns: the event log
        # wraps less, and the chart gains nothing from more than about 100 columns of steps.
        if width >= WIDE_FROM:
            self.body.styles.grid_columns = f"40 1fr {max(RIGHT_COLUMN, round(width * RIGHT_SHARE))}"
        else:
            self.body.styles.clear_rule("grid_columns")  # tui/app.tcss's narrow columns
        # Narrow, the GPU panel shares the chart's height with the disk panel: it leaves the disk its
        # five rows (many GPUs then end in a "more" line), wide it has the column's height to itself.
        footer_rows = len(self.footer.lines_at(max(1, width - 2)))
        top = event.size.height - HEADER_ROWS - footer_rows - NARROW_BOTTOM_ROWS
        self.gpu.styles.max_height = max(3, top - DISK_ROWS) if width < WIDE_FROM else None

    def on_descendant_focus(self, event) -> None:
        for node in event.widget.ancestors_with_self:
            if node.id in self.BOTTOM:
                for name in self.BOTTOM:
                    self.query_one(f"#{name}").set_class(name == node.id, "-shown")
                return

    def action_next_panel(self, step: int) -> None:
        """Focus the next of queue, snapshots, events; hidden ones too (at 80 columns they show once focused)."""
        targets = [self.queue.table, self.snapshots, self.events]
        here = next((i for i, t in enumerate(targets) if t.has_focus), -1 if step > 0 else 0)
        target = targets[(here + step) % len(targets)]
        for name in self.BOTTOM:
            panel = self.query_one(f"#{name}")
            panel.set_class(panel in target.ancestors_with_self, "-shown")
        self.call_after_refresh(target.focus)  # once shown: a hidden widget cannot take focus

    # -- commands out ------------------------------------------------------------------------

    @work(exclusive=False, group="commands", exit_on_error=False)
    async def send(self, cmd: str, **fields: Any) -> dict[str, Any] | None:
        """Send one command; its reply (or refusal, with the daemon's reason) becomes a notification."""
        try:
            answer = await client.request(self.ws.control_socket, cmd, **fields)
        except NotRunning as e:
            self.notify(f"{e}. Press S to start one.", title=f"{cmd}: no daemon", severity="error")
            return None
        except TimeoutError:
            self.notify("the daemon did not answer in time", title=f"{cmd}: no answer", severity="error")
            return None
        if answer.get("ok"):  # titled by what was done: a pause toggle may have resumed
            self.notify(for_keys(answer.get("message") or "done"), title=answer.get("did") or cmd)
        else:
            self.notify(for_keys(answer.get("message") or "refused"), title=f"{cmd} refused", severity="error")
        return answer

    def _state(self) -> str:
        return ((self.status.get("daemon") or {}).get("state")) or "unknown"

    def _job_name(self) -> str | None:
        job = self.status.get("job") or {}
        return job.get("original_name") or job.get("id")

    def action_help(self) -> None:
        from tui.screens.help import HelpScreen

        self.app.push_screen(HelpScreen(list(self.BINDINGS)))

    def refused(self, action: str, selected: dict[str, Any] | None = None) -> bool:
        """Say at once, before any dialog, why the key's command cannot apply now; True if it cannot."""
        reason = self.why_not(action, selected)
        if reason is not None:
            self.notify(reason, title=f"{key_of(action)}: not done", severity="warning")
        return reason is not None

    def why_not(self, action: str, selected: dict[str, Any] | None = None) -> str | None:
        """Why `action` cannot apply, from what the screen knows; None if it may (the daemon has the last word).
        `selected`: the snapshot (verify, restore) or held file (promote, requeue) the key acts on."""
        if self.read_only and action in CHANGES:
            return READ_ONLY
        if action == "start" and self.running is False:
            return None  # S starts a daemon
        if action in CHANGES and self.running is False:
            return "no daemon is running on this workspace: press S to start one"
        if action == "stop" and self._state() == "stopped":
            return "already stopped: S starts the queue again"
        if action == "skip" and not self.status.get("job"):
            return "no file is training: nothing to skip"
        if action in ("verify", "restore") and selected is None:
            return "no snapshot selected: tab to the snapshot panel and pick one"
        if action == "restore" and selected is not None and selected["verification"]["state"] == "corrupt":
            return f"{selected['name']} failed verification: the daemon restores only a snapshot that verifies"
        if action in ("promote", "requeue") and selected is None:
            return "no held file selected: tab to the queue panel and pick a held (yellow) file"
        return None

    def action_pause(self) -> None:
        """The daemon toggles: a second press before the screen drew "paused" resumes, as it should."""
        if not self.refused("pause"):
            self.send("pause", toggle=True)

    def action_stop(self) -> None:
        if self.refused("stop"):
            return
        body = ("The worker saves a checkpoint at the next step boundary and ends, releasing the GPU. "
                "The queue is held (the daemon keeps running) until you press S.")
        self.app.push_screen(ConfirmScreen("Stop training?", body, "Stop"),
                             lambda yes: self.send("stop") if yes else None)

    def action_start(self) -> None:
        if self.refused("start"):
            return
        if self.running is False and (self.status.get("daemon") or {}).get("state") != "stopped":
            self.start_daemon()
        else:
            self.send("start")

    def start_daemon(self) -> None:
        """Start a detached daemon unless one runs; the launch says which happened, once."""
        self.launching = True
        self._show_launching(True)
        self._launch()

    def _show_launching(self, launching: bool = True) -> None:
        """The header says a daemon is being started, not that none runs, from the launch until the daemon
        holds the workspace lock (or its process is gone). The app may ask before the screen is mounted."""
        if hasattr(self, "header") and self.header.launching != launching:
            self.header.launching = launching
            self.header.refresh_text(self.clock())

    @work(thread=True, exclusive=True, exit_on_error=False, group="launch")
    def _launch(self) -> None:
        from engine.store.lock import holder
        from tui.launcher import ensure_daemon

        pid = holder(self.ws.lock_path)
        pid = None if pid is not None else ensure_daemon(self.ws)
        self.app.call_from_thread(self._launched, pid, pid is not None or holder(self.ws.lock_path) is not None)

    def _launched(self, pid: int | None, running: bool) -> None:
        from tui.launcher import log_path

        self.launching = False
        if pid is None:  # one was running already, or none started: the header says so from now on
            self._show_launching(False)
        if pid is not None:  # started here (one already running is no news)
            self.launched_pid = pid
            self.notify(f"daemon running (PID {pid}); its log is {log_path(self.ws)}", title="daemon")

        elif not running:
            self.notify(f"the daemon did not start; see {log_path(self.ws)}", title="daemon", severity="error",
                        timeout=10)
        if self.running is False and not running:  # the liveness said "none" while launching: say it now
            self.events.note("no daemon is running on this workspace. Press S to start one", "error")

    def action_checkpoint(self) -> None:
        if not self.refused("checkpoint"):
            self.send("checkpoint")

    def action_snapshot(self) -> None:
        if not self.refused("snapshot"):
            self.send("snapshot")

    def _selected_snapshot(self) -> dict[str, Any] | None:
        name = self.snapshots.selected_name
        return next((s for s in self.snapshot_rows if s["name"] == name), None)

    def action_verify(self) -> None:
        snap = self._selected_snapshot()
        if not self.refused("verify", snap):
            self.send("verify", name=snap["name"])

    def action_restore(self) -> None:
        snap = self._selected_snapshot()
        if self.refused("restore", snap):
            return
        active = self._job_name()
        lines = [f"Snapshot {snap['name']} becomes the current model.",
                 "• The current model is snapshotted first (pre-rollback-…), so this can be undone.",
                 f"• The active file {active} goes back to the head of the queue and trains again from step 0."
                 if active else "• No file is training now.",
                 "• Training is held while the rollback runs."]
        self.app.push_screen(ConfirmScreen(f"Restore {snap['name']}?", "\n".join(lines), "Restore"),
                             lambda yes: self.send("rollback", name=snap["name"]) if yes else None)

    def action_skip(self) -> None:
        if self.refused("skip"):
            return
        name = self._job_name() or "the active file"
        body = f"The job on {name} ends now; the file moves to queue/failed/ and the next file starts."
        self.app.push_screen(ConfirmScreen(f"Skip {name}?", body, "Skip"),
                             lambda yes: self.send("skip") if yes else None)

    def _selected_held(self) -> dict[str, Any] | None:
        entry = self.queue.selected
        return entry if entry is not None and entry["state"] == "held" else None

    def action_promote(self) -> None:
        entry = self._selected_held()
        if not self.refused("promote", entry):
            self._ask_promote(entry)

    @work(thread=True, exclusive=True, exit_on_error=False, group="promote")
    def _ask_promote(self, entry: dict[str, Any]) -> None:
        """What the promote would drop, read in this thread (job records), then the dialog that says so."""
        job_id = stem(entry["name"])
        try:
            dropped = self.source.dropped_by_promote(job_id)
        except held.HeldError as e:
            self.app.call_from_thread(self.notify, str(e), title=f"{key_of('promote')}: not done",
                                      severity="warning")
            return
        self.app.call_from_thread(self._confirm_promote, entry, dropped)

    def _confirm_promote(self, entry: dict[str, Any], dropped: list[tuple[str, str]]) -> None:
        job_id, reason = stem(entry["name"]), entry["reason"]
        if dropped:  # the current model holds training the held one lacks: say whose, and the way that keeps it
            lines = [f"Files were accepted after models/{job_id} started: the current model holds their training "
                     "and it does not. Promoting it drops the training of:",
                     *(f"  • {name} ({dropped_id})" for dropped_id, name in dropped),
                     "Their files stay in queue/done/.",
                     f"• {key_of('requeue')} (requeue) instead trains {entry['name']} again on today's model: "
                     "nothing is dropped.",
                     f"• Promote anyway (traind promote --force) makes models/{job_id} current without that "
                     "training."]
            title, confirm, force = f"Promote {job_id} and drop newer training?", "Promote anyway (--force)", True
        else:
            active = self._job_name()
            lines = [f"models/{job_id} becomes the current model, though the quality gate held it"
                     + (f": {reason}." if reason else "."),
                     "• Its file moves to queue/done/; the next file trains from this model.",
                     f"• The active file {active} stops with a checkpoint and starts again from step 0 on it."
                     if active else "• No file is training now."]
            title, confirm, force = f"Promote {job_id}?", "Promote", False
        fields = {"job": job_id, **({"force": True} if force else {})}
        self.app.push_screen(ConfirmScreen(title, "\n".join(lines), confirm),
                             lambda yes: self.send("promote", **fields) if yes else None)

    def action_requeue(self) -> None:
        entry = self._selected_held()
        if self.refused("requeue", entry):
            return
        job_id = stem(entry["name"])
        lines = [f"{entry['name']} goes back to the inbox and trains again, as a new job, on today's model; "
                 "the quality gate judges it again.",
                 f"• models/{job_id}, the model the gate held, is no longer kept for it.",
                 "• The current model stays as it is."]
        self.app.push_screen(ConfirmScreen(f"Requeue {job_id}?", "\n".join(lines), "Requeue"),
                             lambda yes: self.send("requeue", job=job_id) if yes else None)

    def action_quality(self) -> None:
        """The quality view in the chart's place (narrow: over the resources too), or the chart again."""
        showing = not self.has_class("-quality")
        self.set_class(showing, "-quality")
        if showing:
            self.call_after_refresh(self.quality.versions.focus)  # arrows scroll the matrix
        elif self.quality in (self.focused.ancestors_with_self if self.focused else []):
            self.events.focus()

    def action_chart_scope(self) -> None:
        self.chart.toggle_scope()

    def action_chart_view(self) -> None:
        self.chart.toggle_view()

    def action_smoothing(self, direction: int) -> None:
        now = min(range(len(SMOOTHING_STEPS)), key=lambda i: abs(SMOOTHING_STEPS[i] - self.chart.smoothing))
        self.chart.smoothing = SMOOTHING_STEPS[max(0, min(len(SMOOTHING_STEPS) - 1, now + direction))]
