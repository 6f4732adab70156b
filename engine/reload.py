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

from engine import models, statefiles
from engine.config import Config

if TYPE_CHECKING:
    from engine.daemon import Daemon


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
