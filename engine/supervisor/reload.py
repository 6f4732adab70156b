"""What a saved traind.toml changes in a running daemon, said in the event log.

Most settings apply from the next attempt, `disk.reserve` and `[hooks]` at once. Some keys
only matter when a workspace is made: `model.source` names the model
`traind init` started from, and editing it later changes no model. Such an edit
is kept (it is the user's file) but answered with a warning saying what it does
and what to do instead, never silently ignored: when it is saved, and at each
daemon start while it differs from what `traind init` recorded
(`state/workspace.json`).

It never reads or writes a model, and never imports torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from engine.store import models, statefiles
from engine.core.config import Config, ConfigError
from engine.ops.hooks import config_notes

if TYPE_CHECKING:
    from engine.supervisor.daemon import Daemon


def source_edit_note(ws, source: str) -> str:
    """The truth about a model.source that differs from the one the workspace was made from."""
    try:
        now = models.current(ws)
        current = f"models/{now['version']}" if now.get("version") else now["path"]
    except (FileNotFoundError, ValueError, OSError):
        current = "the current model"
    return (f"model.source = {source!r} changes no model: it names the model a workspace starts from, read by "
            f"'traind init' (and only to rebuild a lost models/current.json); training goes on from {current}. "
            f"To train {source!r} instead, make a new workspace: traind init DIR --model {source}")


def check_at_start(d: "Daemon") -> None:
    """An edit of model.source made while no daemon ran is answered at start, as a live one is."""
    record = statefiles.read_or_none(d.ws.init_record, statefiles.INIT)
    if record and record["model_source"] != d.config.model.source:
        d.alert("config_no_effect", source_edit_note(d.ws, d.config.model.source), "warning", key="model.source")


def announce(d: "Daemon", old: Config, new: Config) -> dict[str, Any]:
    """The config_reloaded event for a changed config, and a warning for each key that does not act live."""
    changed = new.changes_from(old)
    listed = ", ".join(f"{key} = {value!r}" for key, value in changed.items())
    d.events.emit("config_reloaded", f"{d.ws.config_path.name} reloaded ({listed}): new settings apply from "
                  "the next attempt" + ("; disk reserve applied now" if "disk.reserve" in changed else "")
                  + ("; hooks applied now" if any(key.startswith("hooks.") for key in changed) else ""),
                  changed=changed)
    if "model.source" in changed:
        d.alert("config_no_effect", source_edit_note(d.ws, new.model.source), "warning", key="model.source")
    return changed


async def reload(d: "Daemon") -> None:
    """traind.toml saved: the new settings taken (a file that does not load is refused, the old ones kept)."""
    if not d.ws.config_path.exists():
        return  # moved aside or deleted mid-save: the file that replaces it brings its own event
    try:
        new = d.ws.load_config()
    except ConfigError as e:
        d.alert("config_invalid", f"{e}; keeping the previous settings", "warning")
        return
    if new == d.config:
        return
    old, d.config = d.config, new
    announce(d, old, new)  # and a warning for an edit that acts on nothing live (model.source)
    if new.metrics != old.metrics:
        d.metrics_server.stop()
        serve_metrics(d)
    if new.hooks != old.hooks:
        d.hooks.configure(new.hooks)
        note_hooks(d, config_notes(new.hooks))
    if new.disk.reserve != old.disk.reserve and d.attempt is not None:
        await d.attempt.send("set_disk_reserve", bytes=new.disk.reserve)


def note_hooks(d: "Daemon", notes: list[str]) -> None:
    for note in notes:
        d.alert("config_no_effect", note, "warning", key="hooks")


def serve_metrics(d: "Daemon") -> None:
    """/metrics where [metrics] listen says; an address that cannot be had is a warning, never fatal."""
    listen = d.config.metrics.listen
    if listen == "off":
        return
    try:
        url = d.metrics_server.start(listen)
    except (OSError, OverflowError, ValueError) as e:  # in use, not this machine's, a port past 65535
        d.alert("metrics_failed", f"metrics: cannot listen on {listen}: {e}; no /metrics until "
                "[metrics] listen is changed", "warning")
        return
    d.events.emit("metrics_serving", f"metrics: Prometheus endpoint at {url}", url=url)
