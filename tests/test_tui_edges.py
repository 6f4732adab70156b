"""What a new user met in the UI's first hour: starting with no daemon, key names in `?` and the palette,
keys that cannot apply, `--no-start` read-only, no terminal, the ETA after a pause, the queue's order,
replies that name keys, and each terminal size laid out."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest

from engine.core import testing
from engine.data import intake
from engine.store import lock
from engine.store.workspace import Workspace
from fake_daemon import NOW, FakeDaemon, FrozenSource
from pilot_waits import screen_loaded, until
from screen_text import screen_rows
from workspaces import ROOT, TESTS, make_workspace, wait_for

from tui.app import TraindApp  # noqa: E402
from tui.widgets.confirm import ConfirmScreen  # noqa: E402
from tui.widgets.event_log import EventLog  # noqa: E402

READ_ONLY = "read-only: started with --no-start"


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


def text_of(app) -> str:
    return "\n".join("".join(ch for ch, _ in row) for row in screen_rows(app))


def app_for(ws, read_only: bool = False, **kw) -> TraindApp:
    flags = {"read_only": True} if read_only else {}
    return TraindApp(ws, start_daemon=False, source=FrozenSource(ws, **kw), clock=lambda: NOW, **flags)


# -- 2: the UI starting its own daemon says so once, and the log is in time order --------------


async def test_starting_with_no_daemon_says_it_starts_one_not_that_none_runs(tmp_path, monkeypatch):
    ws = make_workspace(tmp_path / "ws")
    monkeypatch.setenv(testing.ENV, testing.with_switches(os.environ, worker_module="fake_worker")[testing.ENV])
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(TESTS)]))
    app = TraindApp(ws, start_daemon=True)
    try:
        async with app.run_test(size=(120, 40)) as pilot:
            await until(pilot, lambda: app.screen.running, timeout=20.0, what="the daemon the UI started")
            await until(pilot, lambda: any("daemon started" in str(e) for e in app.screen.events.entries),
                        timeout=10.0, what="the daemon's own start in the event log")
            await pilot.pause(1.0)  # a late second notification would land by now
            said = notes(app)
            assert not [n for n in said if n[2] == "error"], said
            assert len([n for n in said if "daemon running" in n[1]]) == 1, said
            logged = [str(e) for e in app.screen.events.entries]
            assert not [line for line in logged if "no daemon is running" in line], logged
            times = app.screen.events.times
            assert times == sorted(times), logged
    finally:
        if (pid := lock.holder(ws.lock_path)) is not None:
            from engine.api import control

            control.request(ws.control_socket, "shutdown", timeout=30)
            wait_for(lambda: lock.holder(ws.lock_path) is None, 30, f"the daemon (PID {pid}) to exit")


async def test_the_event_log_keeps_time_order_whatever_order_lines_come_in(ws):
    app = app_for(ws)
    async with app.run_test(size=(120, 40)) as pilot:
        log = app.screen.query_one(EventLog)
        await until(pilot, lambda: len(log.entries) >= 7, what="the frozen events")
        log.add_events([{"time": NOW - 7200, "level": "info", "message": "an older line read late"}])
        log.add_events([{"time": NOW - 1, "level": "info", "message": "the newest"}])
        await pilot.pause(0.1)
        assert log.times == sorted(log.times)
        assert str(log.entries[0]).endswith("an older line read late")
        assert str(log.entries[-1]).endswith("the newest")



async def test_lines_that_came_while_the_log_was_hidden_wrap_at_its_width_when_it_shows(ws):
    """At 80 columns the log shows only when focused: a line written while the queue panel had its place
    is wrapped at the log's 78 columns when it shows again, not at the 20 of a hidden widget."""
    app = app_for(ws)
    long_line = "a line that came in while the queue panel had the log's place at eighty columns"
    async with app.run_test(size=(80, 24)) as pilot:
        log = app.screen.query_one(EventLog)
        await until(pilot, lambda: len(log.entries) >= 7, what="the frozen events")
        await pilot.press("tab")  # the queue panel shows in the log's place
        await until(pilot, lambda: not log.has_class("-shown"), what="the log hidden")
        await pilot.pause(0.1)
        log.note(long_line)
        await pilot.press("tab", "tab")  # snapshots, then the log again
        await until(pilot, lambda: log.has_class("-shown"), what="the log shown")
        await pilot.pause(0.2)
        shown = text_of(app)
        assert "12:00:00 a line that came in while the queue panel had the log's place at" in shown, shown


# -- 3: keys as typed, every palette entry named, g said by what it does -------------------------


async def test_help_and_palette_name_keys_as_typed(ws):
    from tui.screens.help import HelpScreen

    app = app_for(ws)
    async with app.run_test(size=(120, 40)) as pilot:
        await pilot.press("question_mark")
        await until(pilot, lambda: isinstance(app.screen, HelpScreen), what="help")
        await pilot.pause(0.1)
        shown = text_of(app)
        for typed in ("?", "[", "]", "shift+tab"):
            assert re.search(rf"(^|\s){re.escape(typed)}\s", shown), typed
        assert "question_mark" not in shown and "square_bracket" not in shown
        assert "switch view" not in shown and "learning rate" in shown
        await pilot.press("escape")
        titles = [c.title for c in app.get_system_commands(app.screen)]
        ours = [t for t in titles if t.endswith(")")]
        assert all(re.match(r"^\w.* \(.+\)$", t) for t in ours), ours
        for typed in ("?", "[", "]", "shift+tab", "g"):
            assert any(t.endswith(f"({typed})") for t in ours), typed
        assert not any("question_mark" in t or "square_bracket" in t for t in titles)


# -- 4: a key that cannot apply refuses at once, before any dialog -------------------------------


@pytest.mark.parametrize("key,kw,said", [("x", {"job": False}, "no file is training"),
                                         ("s", {"state": "stopped"}, "already stopped"),
                                         ("x", {"running": False}, "no daemon"),
                                         ("s", {"running": False}, "no daemon"),
                                         ("r", {"running": False}, "no daemon")])
async def test_a_key_that_cannot_apply_refuses_before_any_dialog(ws, daemon, key, kw, said):
    app = app_for(ws, **kw)
    async with app.run_test(size=(160, 48)) as pilot:
        await screen_loaded(pilot)
        if key == "r":
            app.screen.snapshots.focus()
            await pilot.pause(0.05)
        await pilot.press(key)
        await until(pilot, lambda: any(said in m for _, m, _ in notes(app)), what=f"the refusal of {key}")
        assert not isinstance(app.screen, ConfirmScreen)
        assert daemon.commands == []


# -- 5: --no-start is read-only ---------------------------------------------------------------


async def test_no_start_is_read_only(ws, daemon):
    app = app_for(ws, read_only=True)
    async with app.run_test(size=(160, 48)) as pilot:
        await screen_loaded(pilot)
        app.screen.snapshots.focus()
        for key in ("p", "s", "S", "c", "n", "v", "r", "x"):
            app.clear_notifications()
            await pilot.press(key)
            await until(pilot, lambda: any(READ_ONLY in m for _, m, _ in notes(app)), what=f"{key} refused")
            assert not isinstance(app.screen, ConfirmScreen), key
        assert daemon.commands == []
        assert "read-only" in str(app.screen.header.render())
        chart = app.screen.chart
        await pilot.press("g")  # looking is not changing: the views still work
        assert chart.view == "lr"


async def test_read_only_with_no_daemon_does_not_offer_S(ws):
    app = app_for(ws, read_only=True, running=False)
    async with app.run_test(size=(120, 40)) as pilot:
        await until(pilot, lambda: any("no daemon is running" in m for _, m, _ in notes(app)), what="the notice")
        notice = next(m for _, m, _ in notes(app) if "no daemon is running" in m)
        assert "Press S" not in notice and "traind daemon" in notice
        assert "S starts it" not in str(app.screen.header.render())


# -- 6: no terminal ---------------------------------------------------------------------------


def test_no_terminal_says_so_and_exits_2(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    proc = subprocess.Popen([sys.executable, "-m", "tui.cli", "--no-start", "-w", str(ws.root)], cwd=ROOT,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"still running after 20 s without a terminal; wrote {len(out)} characters")
    assert proc.returncode == 2
    assert "not a terminal: use 'traind status' or 'traind daemon'" in err
    assert "\x1b[" not in out


# -- 7: the ETA counts the time spent training -------------------------------------------------


def test_eta_after_a_pause_comes_from_the_time_spent_training(monkeypatch):
    from engine.store import jobs
    from engine.supervisor import attempt

    clock = [1000.0]
    monkeypatch.setattr(attempt.time, "monotonic", lambda: clock[0])
    job = jobs.Job(Workspace.at("/nonexistent"), "00001-a", {"id": "00001-a", "original_name": "a.jsonl",
                                                             "attempts": []})
    progress = attempt.Progress(job, 1, 3)
    progress.apply({"event": "job_start", "total_steps": 200, "resumed_from_step": 0, "examples": 10})

    def step(n: int, seconds: float) -> None:
        clock[0] += seconds
        progress.apply({"event": "step", "step": n, "total_steps": 200, "epoch": 0.1, "loss": 1.0,
                        "learning_rate": 1e-4, "grad_norm": 1.0, "tokens_per_s": 100.0})

    for n in range(1, 41):
        step(n, 1.0)
    before = progress.snapshot()["eta_s"]
    assert before == pytest.approx(160, rel=0.05)
    progress.apply({"event": "paused", "step": 40})
    clock[0] += 200.0  # the pause
    paused = progress.snapshot()["eta_s"]
    progress.apply({"event": "resumed", "step": 40})
    step(41, 1.0)
    step(42, 5.0)  # one slow step after resuming (caches cold, a collection): not a new rate
    after = progress.snapshot()["eta_s"]
    # The rate measured before the pause is kept (the pause itself counts as no time): ~158 x 46/42 s,
    # not 158 x 5 s from the two steps since.
    assert paused == pytest.approx(before, rel=0.05)
    assert after == pytest.approx(158 * 46 / 42, rel=0.1), (before, after)


# -- 8: the queue panel in training order ------------------------------------------------------


def test_queue_lists_inbox_files_in_the_order_intake_takes_them(tmp_path):
    from tui.widgets.queue_panel import read_queue

    ws = make_workspace(tmp_path / "ws")
    outside = tmp_path / "outside"
    outside.mkdir()
    for name, age in (("zeta.jsonl", 10), ("alpha.jsonl", 5000), ("mid.jsonl", 300)):
        path = outside / name
        path.write_text('{"text": "x"}\n')
        os.utime(path, (time.time() - age, time.time() - age))  # written long ago, moved in now
    for name in ("zeta.jsonl", "alpha.jsonl", "mid.jsonl"):  # the order they arrive in
        os.rename(outside / name, ws.inbox / name)
        time.sleep(0.02)
    taken = [p.name for p in intake.scan_inbox(ws.inbox, 0.0, time.time(), {}).ready]
    assert taken == ["zeta.jsonl", "alpha.jsonl", "mid.jsonl"]
    listed = [e["name"] for e in read_queue(ws) if e["state"] == "pending"]
    assert listed == taken


# -- 15: replies name the key ------------------------------------------------------------------


async def test_replies_name_the_key_not_the_command(ws, daemon):
    daemon.replies["pause"] = "paused at step 5; the model stays in memory ('traind resume' continues)"
    app = app_for(ws, state="stopped", reason="stopped by the user: 'traind start' resumes the queue")
    async with app.run_test(size=(160, 48)) as pilot:
        await screen_loaded(pilot)
        header = str(app.screen.header.render())
        assert "traind start" not in header and "S resumes" in header, header
        await pilot.press("p")
        await until(pilot, lambda: any("paused at step 5" in m for _, m, _ in notes(app)), what="the reply")
        reply = next(m for _, m, _ in notes(app) if "paused at step 5" in m)
        assert "traind" not in reply and "p continues" in reply, reply


# -- 17: each size laid out --------------------------------------------------------------------


@pytest.mark.parametrize("size", [(80, 24), (120, 40), (160, 48), (200, 60)])
async def test_each_size_shows_the_keys_and_the_cpu_reason_whole(ws, size):
    app = app_for(ws)
    async with app.run_test(size=size) as pilot:
        await screen_loaded(pilot)
        app.clear_notifications()
        await pilot.pause(0.1)
        shown = text_of(app)
        for item in ("v verify", "r restore", "x skip", "e quality", "? help", "q quit", "^p"):
            assert item in shown, (item, shown[-2 * size[0]:])
        gpu = app.screen.gpu
        lines = " ".join(gpu.render_line(y).text.strip(" │") for y in range(gpu.size.height))
        assert "no NVIDIA driver (libnvidia-ml.so.1 not found)" in re.sub(r"\s+", " ", lines), lines
        assert "…" not in lines


async def test_a_wide_terminal_widens_the_event_log(ws):
    widths = {}
    for size in ((160, 48), (200, 60)):
        app = app_for(ws)
        async with app.run_test(size=size) as pilot:
            await screen_loaded(pilot)
            widths[size] = app.screen.events.size.width
    assert widths[(200, 60)] >= widths[(160, 48)] + 10, widths
