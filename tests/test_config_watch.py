"""traind.toml applies live however it is saved: in place, renamed over, moved aside, deleted and re-created.

A real daemon (fake worker) watches the workspace folder; each save below must show
up as a `config_reloaded` event naming the new value, one save at a time.
"""

from __future__ import annotations

import os
import time

from engine.core import config
from engine.core.config import render_template
from workspaces import drop, events, files_in, make_workspace, start_daemon, stop_daemon, text_lines, wait_for

SETTINGS = {"jobs": {"warm_worker": False, "stop_grace_seconds": 10.0}, "inbox": {"settle_seconds": 0.5}}


def text_with(learning_rate: float) -> str:
    return render_template(config.from_dict({**SETTINGS, "training": {"learning_rate": learning_rate}}))


def reloaded(ws) -> list[dict]:
    return [e for e in events(ws) if e["kind"] == "config_reloaded"]


def applied(ws, learning_rate: float) -> bool:
    found = reloaded(ws)
    return bool(found) and found[-1]["changed"].get("training.learning_rate") == learning_rate


def test_every_way_of_saving_the_config_is_applied(tmp_path):
    ws = make_workspace(tmp_path / "ws", SETTINGS)
    path = ws.config_path
    proc = start_daemon(ws, hooks={"fake": {"steps": 3}})
    try:
        wait_for(lambda: any(e["kind"] == "daemon_started" for e in events(ws)), timeout=30, what="the daemon")

        # In place; repeated until the watch is set up (it starts just after daemon_started).
        def written_in_place() -> bool:
            path.write_text(text_with(1e-4))
            return bool(wait_quietly(lambda: applied(ws, 1e-4), 1.0))
        wait_for(written_in_place, timeout=30, what="the first in-place save to apply")

        lr = 1e-4
        for _ in range(4):  # an editor's atomic save: a temp file renamed over traind.toml, again and again
            lr *= 2
            tmp = path.with_name(path.name + ".tmp")
            tmp.write_text(text_with(lr))
            os.replace(tmp, path)
            wait_for(lambda: applied(ws, lr), timeout=10, what=f"rename-save with learning_rate {lr}")

        lr *= 2  # vim: move the old file aside as a backup, write a new one, delete the backup
        backup = path.with_name(path.name + "~")
        os.rename(path, backup)
        path.write_text(text_with(lr))
        backup.unlink()
        wait_for(lambda: applied(ws, lr), timeout=10, what="the vim-style save")

        lr *= 2  # deleted, then created again a moment later
        path.unlink()
        time.sleep(0.5)
        path.write_text(text_with(lr))
        wait_for(lambda: applied(ws, lr), timeout=10, what="the re-created file")
        assert not [e for e in events(ws) if e["kind"] == "config_invalid"], "a save in progress is not an error"

        tmp = path.with_name(path.name + ".tmp")  # an invalid save is reported and ignored, a valid one applies
        tmp.write_text("[training]\nlearning_rate = 'fast'\n")
        os.replace(tmp, path)
        wait_for(lambda: any(e["kind"] == "config_invalid" for e in events(ws)), timeout=10, what="config_invalid")
        invalid = [e for e in events(ws) if e["kind"] == "config_invalid"]
        assert "training.learning_rate" in invalid[-1]["message"] and "keeping the previous settings" in invalid[-1]["message"]
        lr *= 2
        path.write_text(text_with(lr))
        wait_for(lambda: applied(ws, lr), timeout=10, what="the valid save after an invalid one")

        # Other entries of the workspace folder are not the config; the inbox is still watched.
        (ws.root / "notes.txt").write_text("not a setting")
        drop(ws, "after.jsonl", text_lines(3))
        wait_for(lambda: files_in(ws, "done") == ["00001-after.jsonl"], timeout=30, what="a file after the saves")
    finally:
        assert stop_daemon(proc) == 0
    assert len(reloaded(ws)) >= 8


def wait_quietly(predicate, timeout: float):
    try:
        return wait_for(predicate, timeout=timeout)
    except AssertionError:
        return None
