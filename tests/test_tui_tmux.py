"""The TUI in a real terminal (tmux) against a real daemon training the tiny model: the UI starts
the daemon itself, shows a rising step count and the loss chart; `p` pauses (checked with
`traind status --json`); `q` quits the UI and the daemon goes on training. And at 80x24 with a
daemon on the fake worker: the UI starting it says so once and never that none runs, and the
key bar shows every key."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from engine.data import demo_data
from engine.store import lock
from workspaces import ROOT, daemon_env, drop, events, make_workspace, run_cli, wait_for

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")

SETTINGS = {"training": {"max_seq_length": 64, "batch_size": 8, "learning_rate": 2e-3},
            "checkpoint": {"every_steps": 50, "keep": 2}, "inbox": {"settle_seconds": 0.5}}


def status(ws) -> dict:
    return json.loads(run_cli("status", "--json", "-w", str(ws.root)).stdout)


@pytest.mark.e2e
def test_tui_drives_a_real_daemon(tmp_path, tiny_model_dir):
    ws = make_workspace(tmp_path / "ws", SETTINGS, model_dir=tiny_model_dir)
    lines = [json.dumps(r) for r in demo_data.demo_records(6000, "text", seed=1)]
    drop(ws, "demo.jsonl", lines)
    server = f"traind-test-{os.getpid()}"
    env = daemon_env(fake=False, hooks={"step_sleep_seconds": 0.05})  # slow steps: the test sees them rise
    ui = [sys.executable, "-m", "tui.cli", "-w", str(ws.root)]  # `traind -w WS`: the UI, which starts the daemon
    tmux = ["tmux", "-L", server]

    def screen() -> str:
        return subprocess.run([*tmux, "capture-pane", "-p", "-t", "ui"], capture_output=True, text=True).stdout

    def step() -> int | None:
        found = re.search(r"step (\d+)/\d+", screen())
        return int(found.group(1)) if found else None

    subprocess.run([*tmux, "new-session", "-d", "-s", "ui", "-x", "120", "-y", "40",
                    f"cd {ROOT} && exec {shlex.join(ui)}"],
                   check=True, env=env)
    try:
        try:
            first = wait_for(step, 120, "a step count on screen")
        except AssertionError:
            log = ws.state / "daemon.log"
            raise AssertionError(screen() + (log.read_text()[-3000:] if log.exists() else "no daemon.log")) from None
        wait_for(lambda: (step() or 0) > first, 90, "the step count to rise")
        assert re.search("[\u2801-\u28ff]", screen()), "no loss chart (braille) on screen:\n" + screen()
        assert lock.holder(ws.lock_path), "the UI did not start a daemon"

        subprocess.run([*tmux, "send-keys", "-t", "ui", "p"], check=True)
        wait_for(lambda: status(ws)["daemon"].get("state") == "paused", 30, "paused, per traind status")
        wait_for(lambda: "● paused" in screen().splitlines()[0], 90, "the UI's header to show it paused")
        subprocess.run([*tmux, "send-keys", "-t", "ui", "p"], check=True)
        wait_for(lambda: status(ws)["daemon"].get("state") == "training", 30, "training again")
        # Two presses at once, before the screen could draw "paused": the daemon toggles, so a pause and
        # a resume (the real worker may not even hold between them), and training goes on.
        subprocess.run([*tmux, "send-keys", "-t", "ui", "p", "p"], check=True)
        wait_for(lambda: sum(e["kind"] == "command" and e["command"] == "pause" for e in events(ws)) == 4, 60,
                 "both presses answered")
        at = status(ws)["job"]["step"]
        wait_for(lambda: status(ws)["job"]["step"] > at and status(ws)["daemon"].get("state") == "training", 30,
                 "training going on after two presses")

        subprocess.run([*tmux, "send-keys", "-t", "ui", "q"], check=True)
        wait_for(lambda: subprocess.run([*tmux, "has-session", "-t", "ui"], capture_output=True).returncode != 0,
                 10, "the UI to quit")
        before = status(ws)["job"]["step"]
        wait_for(lambda: status(ws)["job"]["step"] > before, 30, "training to go on after q")
        assert status(ws)["daemon"]["state"] == "training"
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
        if lock.holder(ws.lock_path):
            run_cli("shutdown", "-w", str(ws.root))
            wait_for(lambda: lock.holder(ws.lock_path) is None, 60, "the daemon to exit")


def test_at_80x24_the_ui_starts_its_daemon_quietly_and_shows_every_key(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    server = f"traind-test-{os.getpid()}-small"
    tmux = ["tmux", "-L", server]
    ui = [sys.executable, "-m", "tui.cli", "-w", str(ws.root)]
    seen: list[str] = []

    def screen() -> str:
        text = subprocess.run([*tmux, "capture-pane", "-p", "-t", "ui"], capture_output=True, text=True).stdout
        seen.append(text)
        return text

    subprocess.run([*tmux, "new-session", "-d", "-s", "ui", "-x", "80", "-y", "24",
                    f"cd {ROOT} && exec {shlex.join(ui)}"], check=True, env=daemon_env(fake=True))
    try:
        wait_for(lambda: "daemon running (PID" in screen(), 30, "the UI to say the daemon it started runs")
        wait_for(lambda: "daemon started" in screen(), 30, "the daemon's own start in the event log")
        keys = ("p pause", "v verify", "r restore", "x skip", "e quality", "? help", "^p palette", "q quit")
        wait_for(lambda: all(item in screen() for item in keys), 30, "every key once the notification went")
        assert not [s for s in seen if "no daemon is running" in s or "daemon not running" in s], seen
        assert not [s for s in seen if s.count("daemon running (PID") > 1 or "running again" in s], seen
    finally:
        subprocess.run([*tmux, "kill-server"], capture_output=True)
        if lock.holder(ws.lock_path):
            run_cli("shutdown", "-w", str(ws.root))
            wait_for(lambda: lock.holder(ws.lock_path) is None, 60, "the daemon to exit")
