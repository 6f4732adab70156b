"""Pilot tests of the TUI against a fake daemon: keys send the right commands, confirm dialogs
guard the destructive ones, refusals and a dead daemon show on screen, and quitting leaves the
daemon alone. Also: the UI never imports torch or transformers, and the launcher detaches."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from engine.api import control
from engine.core import testing
from engine.store import lock
from engine.store.workspace import Workspace
from fake_daemon import NOW, FakeDaemon, FrozenSource, write_frozen_files
from pilot_waits import until
from workspaces import ROOT, TESTS, make_workspace, wait_for

from tui.app import TraindApp  # noqa: E402
from tui.screens.main import WorkspaceSource  # noqa: E402
from tui.widgets.event_log import EventLog  # noqa: E402
from tui.widgets.gpu_panel import GpuPanel  # noqa: E402
from tui.widgets.header import Header  # noqa: E402
from tui.widgets.snapshot_panel import SnapshotPanel  # noqa: E402


@pytest.fixture
def ws(tmp_path):
    ws = Workspace.at(tmp_path / "ws")
    ws.create_folders()
    return ws


@pytest.fixture
def daemon(ws):
    fake = FakeDaemon(ws).start()
    yield fake
    fake.die()


def notes(app) -> list[tuple[str, str, str]]:
    return [(n.title, str(n.message), n.severity) for n in app._notifications]


def app_for(ws, **kw) -> TraindApp:
    return TraindApp(ws, start_daemon=False, source=FrozenSource(ws, **kw), clock=lambda: NOW)


@pytest.mark.parametrize("key,cmd", [("p", "pause"), ("c", "checkpoint"), ("n", "snapshot"), ("S", "start")])
async def test_each_key_sends_its_command_and_the_reply_shows(ws, daemon, key, cmd):
    app = app_for(ws)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.screen.status, what="status")
        await pilot.press(key)
        await until(pilot, lambda: daemon.commands, what=f"{cmd} at the daemon")
        assert daemon.names() == [cmd]
        await until(pilot, lambda: any(t == cmd and "done (fake)" in m for t, m, _ in notes(app)),
                    timeout=10.0, what="the reply as a notification")


async def test_p_resumes_when_paused(ws, daemon):
    daemon.state = "paused"
    app = app_for(ws, state="paused")
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.screen.status, what="status")
        await pilot.press("p")
        await until(pilot, lambda: any(t == "resume" for t, _, _ in notes(app)), what="the reply, titled resume")
        assert daemon.state == "training"


async def test_p_twice_before_the_screen_drew_paused_pauses_then_resumes(ws, daemon):
    """On a loaded machine the screen still draws "training" when p is pressed again: the second press
    resumes all the same, since the daemon decides from what was asked, not the state drawn."""
    app = app_for(ws)  # the frozen status says "training" throughout
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.screen.status, what="status")
        await pilot.press("p", "p")
        await until(pilot, lambda: len(daemon.commands) == 2, what="two commands at the daemon")
        assert app.screen.status["daemon"]["state"] == "training"  # as drawn for both presses
        assert daemon.state == "training"
        await until(pilot, lambda: sorted(t for t, _, _ in notes(app)) == ["pause", "resume"],
                    what="two replies: pause, then resume")


@pytest.mark.parametrize("key,cmd", [("s", "stop"), ("x", "skip")])
async def test_stop_and_skip_ask_first(ws, daemon, key, cmd):
    from tui.widgets.confirm import ConfirmScreen

    app = app_for(ws)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.screen.status, what="status")
        await pilot.press(key)
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="a confirm dialog")
        await pilot.press("p")  # keys of the main screen do nothing under the dialog
        await pilot.press("n")
        await pilot.pause(0.2)
        assert daemon.commands == [] and not isinstance(app.screen, ConfirmScreen)
        await pilot.press(key)
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="a confirm dialog")
        await pilot.press("y")
        await until(pilot, lambda: daemon.commands, what=f"{cmd} at the daemon")
        assert daemon.names() == [cmd]


async def test_verify_and_restore_act_on_the_selected_snapshot(ws, daemon):
    from tui.widgets.confirm import ConfirmScreen

    app = app_for(ws)
    async with app.run_test(size=(160, 48)) as pilot:
        table = app.screen.query_one(SnapshotPanel)
        await until(pilot, lambda: table.row_count == 4, what="the snapshot list")
        table.focus()
        await pilot.press("down")  # newest first: the second row is daily-20260101
        assert table.selected_name == "daily-20260101"
        await pilot.press("v")
        await until(pilot, lambda: daemon.commands, what="verify")
        assert daemon.commands[-1] == {"v": 1, "cmd": "verify", "name": "daily-20260101"}
        await pilot.press("r")
        dialog = await until(pilot, lambda: isinstance(app.screen, ConfirmScreen) and app.screen, what="the dialog")
        assert "snapshotted first" in dialog.body and "support-chats.jsonl goes back to the head of the queue" in dialog.body
        await pilot.press("y")
        await until(pilot, lambda: len(daemon.commands) == 2, what="rollback")
        assert daemon.commands[-1] == {"v": 1, "cmd": "rollback", "name": "daily-20260101"}


async def select_held(pilot, app) -> None:
    """The queue panel focused, its cursor on the held file (frozen_queue's fourth row)."""
    from tui.widgets.queue_panel import QueuePanel

    panel = app.screen.query_one(QueuePanel)
    await until(pilot, lambda: panel.entries, what="the queue listing")
    panel.table.focus()
    for _ in range(3):
        await pilot.press("down")
    assert panel.selected["name"] == "00002-recipes.jsonl"
    assert "P promote, R requeue" in str(panel.reason.render())


async def test_promote_and_requeue_act_on_the_selected_held_file_after_saying_what_each_does(ws, daemon):
    from tui.widgets.confirm import ConfirmScreen

    app = app_for(ws)
    async with app.run_test(size=(160, 48)) as pilot:
        await until(pilot, lambda: app.screen.status, what="status")
        await pilot.press("P")  # the cursor is on the active file: nothing to promote
        await until(pilot, lambda: any("no held file selected" in m for _, m, _ in notes(app)), what="the refusal")
        assert not isinstance(app.screen, ConfirmScreen)
        await select_held(pilot, app)
        await pilot.press("P")
        dialog = await until(pilot, lambda: isinstance(app.screen, ConfirmScreen) and app.screen, what="the dialog")
        assert dialog.title_text == "Promote 00002-recipes?" and dialog.confirm == "Promote"
        assert "models/00002-recipes becomes the current model, though the quality gate held it: forgetting" \
            in dialog.body
        assert "support-chats.jsonl stops with a checkpoint and starts again from step 0 on it" in dialog.body
        await pilot.press("y")
        await until(pilot, lambda: daemon.commands, what="promote")
        assert daemon.commands[-1] == {"v": 1, "cmd": "promote", "job": "00002-recipes"}  # no force: none needed
        await pilot.press("R")
        dialog = await until(pilot, lambda: isinstance(app.screen, ConfirmScreen) and app.screen, what="the dialog")
        assert dialog.title_text == "Requeue 00002-recipes?"
        assert "goes back to the inbox and trains again, as a new job, on today's model" in dialog.body
        await pilot.press("n")  # cancelled: nothing sent
        await pilot.pause(0.2)
        assert len(daemon.commands) == 1
        await pilot.press("R")
        await until(pilot, lambda: isinstance(app.screen, ConfirmScreen), what="the dialog")
        await pilot.press("y")
        await until(pilot, lambda: len(daemon.commands) == 2, what="requeue")
        assert daemon.commands[-1] == {"v": 1, "cmd": "requeue", "job": "00002-recipes"}


async def test_a_promote_that_would_drop_newer_training_names_it_and_offers_requeue_or_force(ws, daemon):
    from tui.widgets.confirm import ConfirmScreen

    app = TraindApp(ws, start_daemon=False, clock=lambda: NOW,
                    source=FrozenSource(ws, dropped=[("00006-faq", "faq.jsonl"), ("00005-docs", "docs.jsonl")]))
    async with app.run_test(size=(160, 48)) as pilot:
        await until(pilot, lambda: app.screen.status, what="status")
        await select_held(pilot, app)
        await pilot.press("P")
        dialog = await until(pilot, lambda: isinstance(app.screen, ConfirmScreen) and app.screen, what="the dialog")
        assert dialog.title_text == "Promote 00002-recipes and drop newer training?"
        assert "faq.jsonl (00006-faq)" in dialog.body and "docs.jsonl (00005-docs)" in dialog.body
        assert "R (requeue) instead trains 00002-recipes.jsonl again on today's model: nothing is dropped" in dialog.body
        assert dialog.confirm == "Promote anyway (--force)"
        await pilot.press("y")
        await until(pilot, lambda: daemon.commands, what="promote")
        assert daemon.commands[-1] == {"v": 1, "cmd": "promote", "job": "00002-recipes", "force": True}


async def test_a_refusal_shows_with_its_reason(ws, daemon):
    daemon.refuse["checkpoint"] = "no job is training"
    app = app_for(ws)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.screen.status, what="status")
        await pilot.press("c")
        refusal = ("checkpoint refused", "no job is training", "error")
        await until(pilot, lambda: refusal in notes(app), timeout=10.0, what="the refusal")
        assert refusal in notes(app) and daemon.names() == ["checkpoint"]  # asked once, refused, said


async def test_no_daemon_is_said_not_crashed(ws):
    app = app_for(ws)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: app.screen.status, what="status")
        await pilot.press("p")
        await until(pilot, lambda: any(s == "error" and "no traind daemon" in m for _, m, s in notes(app)),
                    what="the no-daemon notification")
        assert app.is_running  # said, not crashed


async def test_daemon_death_shows_and_keeps_the_data(ws):
    write_frozen_files(ws)
    daemon = FakeDaemon(ws).start()
    app = TraindApp(ws, start_daemon=False, source=WorkspaceSource(ws))
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            header = app.screen.query_one(Header)
            await until(pilot, lambda: header.status.get("job") and app.screen.running, what="live status")
            daemon.die()
            await until(pilot, lambda: app.screen.has_class("-offline"), timeout=10.0, what="daemon death on screen")
            text = str(header.render())
            assert "daemon not running" in text and "S starts it" in text
            assert "step 1234/3000" in text  # the last data stays
            # A notification is queued as a message: it may land a moment after the class.
            await until(pilot, lambda: any(s == "error" and "daemon stopped" in m for _, m, s in notes(app)),
                        what="the notification that the daemon stopped")
    finally:
        daemon.die()


async def test_quit_leaves_the_daemon_running(ws, daemon):
    app = app_for(ws)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("q")
        await pilot.pause()
    assert daemon.commands == [] and lock.holder(ws.lock_path) is not None


async def test_help_and_palette_list_every_key(ws):
    from tui.screens.help import HelpScreen

    app = app_for(ws)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), what="help")
        await pilot.press("escape")
        titles = [c.title for c in app.get_system_commands(app.screen)]
        for key in "p s S c n v r x e P R".split():
            assert any(t.endswith(f"({key})") for t in titles), key


async def test_fits_80x24(ws):
    app = app_for(ws, gpus=2)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.screen.status, what="status")
        await pilot.pause(0.1)
        for name in ("#header", "#chart", "#gpu", "#disk", "#events"):
            region = app.screen.query_one(name).region
            assert region.width > 0 and region.height > 0 and region.bottom <= 24, name


def test_the_ui_never_imports_torch_or_transformers():
    code = ("import sys\nimport tui.app\n"
            "print(','.join(m for m in ('torch', 'transformers', 'accelerate') if m in sys.modules))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == ""


def test_launcher_starts_a_detached_daemon_that_outlives_it(tmp_path, monkeypatch):
    import socket

    from tui.launcher import ensure_daemon, listening, log_path

    ws = make_workspace(tmp_path / "ws")
    monkeypatch.setenv(testing.ENV, testing.with_switches(os.environ, worker_module="fake_worker")[testing.ENV])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(TESTS)]))
    with socket.socket(socket.AF_UNIX) as dead:  # the socket file of a daemon that was killed
        dead.bind(str(ws.control_socket))
    assert ws.control_socket.exists() and not listening(ws.control_socket)
    pid = ensure_daemon(ws, wait=10)
    try:
        assert pid and pid > 0
        assert control.request(ws.control_socket, "status", timeout=5)["ok"]  # it answers as soon as it is said to run
        assert os.getsid(pid) == pid  # its own session: no terminal, no SIGHUP from ours
        assert ensure_daemon(ws) == pid  # a second call starts nothing
        assert log_path(ws).exists()
    finally:
        control.request(ws.control_socket, "shutdown", timeout=30)
        wait_for(lambda: lock.holder(ws.lock_path) is None, 30, "the daemon to exit")


async def test_tab_brings_each_bottom_panel_into_view_at_80x24(ws):
    app = app_for(ws)
    async with app.run_test(size=(80, 24)) as pilot:
        await until(pilot, lambda: app.screen.query_one(SnapshotPanel).row_count, what="listings")
        shown = set()
        for _ in range(6):
            await pilot.press("tab")
            await pilot.pause(0.05)
            visible = [p for p in ("queue", "snapshots", "events") if app.screen.query_one(f"#{p}").region.width]
            assert len(visible) == 1
            shown.update(visible)
        assert shown == {"queue", "snapshots", "events"}


async def test_brackets_change_the_chart_smoothing(ws):
    app = app_for(ws)
    async with app.run_test(size=(120, 40)) as pilot:
        chart = app.screen.query_one("#chart")
        assert chart.smoothing == 0.9
        await pilot.press("right_square_bracket")
        assert chart.smoothing == 0.95
        for _ in range(3):
            await pilot.press("left_square_bracket")
        assert chart.smoothing == 0.5


@pytest.mark.parametrize("size", [(160, 48), (80, 24)])
async def test_eight_gpus_one_line_each_and_the_disk_panel_keeps_its_room(ws, size):
    app = TraindApp(ws, start_daemon=False, source=FrozenSource(ws, gpus=8), clock=lambda: NOW)
    async with app.run_test(size=size) as pilot:
        gpu = app.screen.query_one(GpuPanel)
        await until(pilot, lambda: gpu.resources, what="resources")
        await pilot.pause(0.2)
        lines = [gpu.render_line(y).text.rstrip() for y in range(gpu.size.height)]
        disk = app.screen.query_one("#disk")
        disk_text = "\n".join(disk.render_line(y).text for y in range(disk.size.height))
        assert "GPU ×8 H100 80GB HBM3" in str(gpu.border_title)
        assert "free" in disk_text and "reserve" in disk_text and "more fit" in disk_text
        shown = [i for i in range(8) if any(line.lstrip().startswith(f"{i} ") and "/80G" in line for line in lines)]
        if size == (160, 48):
            assert shown == list(range(8)), lines  # one line each
            assert app.screen.query_one(EventLog).size.height >= 8  # and the log beside the chart still reads
        else:  # 80x24: what does not fit is said, not cut silently
            assert shown == list(range(len(shown))) and len(shown) >= 4, lines
            assert "more" in lines[-1], lines


async def test_a_job_on_two_machines_names_each_with_its_ranks(ws):
    nodes = [{"name": "gpu-1", "host": "gpu-1", "role": "head", "state": "running", "pid": 10, "ranks": [0, 7]},
             {"name": "gpu-2", "host": "gpu-2", "role": "node", "state": "running", "pid": 11, "ranks": [8, 15]}]
    app = TraindApp(ws, start_daemon=False, source=FrozenSource(ws, gpus=8, nodes=nodes), clock=lambda: NOW)
    async with app.run_test(size=(160, 48)) as pilot:
        gpu = app.screen.query_one(GpuPanel)
        await until(pilot, lambda: gpu.nodes, what="nodes")
        await pilot.pause(0.2)
        lines = [gpu.render_line(y).text.rstrip() for y in range(gpu.size.height)]
        assert "2 nodes" in str(gpu.border_title)
        assert any("gpu-1 head ranks 0-7 running" in line for line in lines), lines
        assert any("gpu-2 node ranks 8-15 running" in line for line in lines), lines


async def test_the_gpu_panel_title_says_a_sharded_jobs_method_and_ranks():
    from textual.app import App

    from fake_daemon import frozen_status

    class One(App):
        def compose(self):
            yield GpuPanel()

    resources = frozen_status(Workspace.at("/nonexistent"), gpus=2)["resources"]
    app = One()
    async with app.run_test(size=(80, 12)):
        gpu = app.query_one(GpuPanel)
        gpu.show(resources, None, {"method": "fsdp", "ranks": 2, "params_per_rank": 98464, "params_total": 196928})
        assert str(gpu.border_title) == "GPU ×2 · fsdp ×2"
        gpu.show(resources, None, None)  # a replica a rank, or no job: the title as it was
        assert str(gpu.border_title) == "GPU ×2"


async def test_the_header_names_an_adapter_job_and_its_memory_estimate_on_a_gpu():
    from textual.app import App

    class One(App):
        def compose(self):
            yield Header("ws")

    app = One()
    async with app.run_test(size=(160, 6)):
        header = app.query_one(Header)
        job = {"original_name": "a.jsonl", "step": 3, "total_steps": 10, "method": "lora",
               "memory_estimate": 24 * 2**30}
        status = {"daemon": {"state": "training", "running": True}, "job": job}
        header.show_status({**status, "resources": {"gpu": {"mode": "gpu"}}}, 0.0)
        assert "lora" in header.shown.plain and "est 24" in header.shown.plain
        header.show_status({**status, "resources": {"gpu": {"mode": "cpu"}}}, 0.0)  # no GPU: nothing to check it by
        assert "lora" in header.shown.plain and "est" not in header.shown.plain
        header.show_status({**status, "job": {**job, "method": "full"}}, 0.0)
        assert "lora" not in header.shown.plain and "full" not in header.shown.plain
        assert "replayed" not in header.shown.plain
        replay = {"examples": 120, "sources": {"00001-a": 70, "00002-b": 50}}
        header.show_status({**status, "job": {**job, "replay": replay}}, 0.0)
        assert "+120 replayed" in header.shown.plain
