"""What a saved traind.toml changes in a running daemon, said in the event log.

Most settings apply from the next attempt, `disk.reserve` and `[hooks]` at once. Some keys
only matter when a workspace is made: `model.source` names the model
`traind init` started from, and editing it later changes no model. Such an edit
is kept (it is the user's file) but answered with a warning saying what it does
and what to do instead, never silently ignored: when it is saved, and at each
daemon start while it differs from what `traind init` recorded
(`state/workspace.json`).

`changed` reads a saved file and returns the new settings (or None: unchanged,
or refused with a warning); the daemon applies them (Daemon.reload_config).
It never reads or writes a model, and never imports torch.
"""

from __future__ import annotations

from typing import Any

from engine.core.config import Config, ConfigError
from engine.store import models, statefiles
from engine.store.eventlog import Reporter
from engine.store.workspace import Workspace


def source_edit_note(ws: Workspace, source: str) -> str:
    """The truth about a model.source that differs from the one the workspace was made from."""
    try:
        now = models.current(ws)
        current = f"models/{now['version']}" if now.get("version") else now["path"]
    except (FileNotFoundError, ValueError, OSError):
        current = "the current model"
    return (f"model.source = {source!r} changes no model: it names the model a workspace starts from, read by "
            f"'traind init' (and only to rebuild a lost models/current.json); training goes on from {current}. "
            f"To train {source!r} instead, make a new workspace: traind init DIR --model {source}")


def check_at_start(ws: Workspace, config: Config, report: Reporter) -> None:
    """An edit of model.source made while no daemon ran is answered at start, as a live one is."""
    record = statefiles.read_or_none(ws.init_record, statefiles.INIT)
    if record and record["model_source"] != config.model.source:
        report.alert("config_no_effect", source_edit_note(ws, config.model.source), "warning", key="model.source")


def changed(ws: Workspace, config: Config, report: Reporter) -> Config | None:
    """traind.toml saved: the new settings, or None when they are the same or the file does not load (it is
    refused with a warning, the old settings kept)."""
    if not ws.config_path.exists():
        return None  # moved aside or deleted mid-save: the file that replaces it brings its own event
    try:
        new = ws.load_config()
    except ConfigError as e:
        report.alert("config_invalid", f"{e}; keeping the previous settings", "warning")
        return None
    return None if new == config else new


def announce(ws: Workspace, old: Config, new: Config, report: Reporter) -> dict[str, Any]:
    """The config_reloaded event for a changed config, and a warning for each key that does not act live."""
    changed = new.changes_from(old)
    listed = ", ".join(f"{key} = {value!r}" for key, value in changed.items())
    report.emit("config_reloaded", f"{ws.config_path.name} reloaded ({listed}): new settings apply from "
                "the next attempt" + ("; disk reserve applied now" if "disk.reserve" in changed else "")
                + ("; hooks applied now" if any(key.startswith("hooks.") for key in changed) else ""),
                changed=changed)
    if "model.source" in changed:
        report.alert("config_no_effect", source_edit_note(ws, new.model.source), "warning", key="model.source")
    return changed


def note_hooks(report: Reporter, notes: list[str]) -> None:
    for note in notes:
        report.alert("config_no_effect", note, "warning", key="hooks")
