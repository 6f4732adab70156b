"""The quality view (e), the eval points on the loss chart, the snapshots' evaluation and held files in
the queue, as a user sees them: on a workspace whose model versions carry evaluations (markers written
directly, as engine/worker/evaluation.py writes them), through the real reader and listing poll."""

from __future__ import annotations

import json
import os
import re
import time

import pytest

from engine.store import models
from engine.core.protocol import MODEL_MARKER
from engine.store.workspace import Workspace
from fake_daemon import NOW, FrozenSource, frozen_metrics
from pilot_waits import screen_loaded, until
from screen_text import GREEN, RED, YELLOW, on_screen, screen_rows, shows_in
from workspaces import make_workspace, run_cli

from tui.app import TraindApp  # noqa: E402
from tui.quality import QualityReader  # noqa: E402
from tui.screens.main import WorkspaceSource  # noqa: E402
from tui.series import RunSeries  # noqa: E402
from tui.widgets.loss_chart import EVAL_MARK, ChartStyles, render_chart  # noqa: E402



def write_version(ws: Workspace, job: str, own: tuple[float, float], **earlier: tuple[float, float]) -> None:
    """models/JOB with a marker carrying its evaluation: {source: (before, after)} and its own lines."""
    sources = {name: {"before": {"loss": b}, "after": {"loss": a}} for name, (b, a) in earlier.items()}
    sources[job] = {"before": {"loss": own[0]}, "after": {"loss": own[1]}}
    folder = ws.models / job
    folder.mkdir()
    (folder / MODEL_MARKER).write_text(json.dumps({"job_id": job, "eval": {"step": 40, "own": job, "sources": sources}}))


def hold(ws: Workspace, job: str) -> None:
    (ws.queue("held") / f"{job}.jsonl").write_text('{"text": "x"}\n')
    (ws.queue("held") / f"{job}.jsonl.reason.json").write_text(json.dumps({"reason": "forgetting: eval loss on "
                                                                           "00001-animals 0.41 -> 1.96, +376% > 5%"}))


def age_all(ws: Workspace, seconds: float = 60) -> None:
    """Back-date what the reader watches: a change within the same mtime tick is looked at again anyway."""
    past = time.time() - seconds
    for path in (ws.models, ws.current_model_pointer, ws.queue("held"), ws.config_path):
        os.utime(path, (past, past))


@pytest.fixture
def evaluated(tmp_path) -> Workspace:
    """00001-animals, then 00002-fruits (current: forgot animals by 2%), then 00003-relabelled: it
    forgot animals by 376%, and the gate held it."""
    ws = make_workspace(tmp_path / "ws")
    write_version(ws, "00001-animals", (3.2, 0.41))
    write_version(ws, "00002-fruits", (3.0, 0.52), **{"00001-animals": (0.41, 0.418)})
    write_version(ws, "00003-relabelled", (2.9, 1.1), **{"00001-animals": (0.418, 1.99), "00002-fruits": (0.52, 0.50)})
    models.set_current(ws, "local", str(ws.models / "00002-fruits"), "00002-fruits")
    hold(ws, "00003-relabelled")
    (ws.inbox / "countries.jsonl").write_text('{"text": "x"}\n')
    return ws


def test_the_matrix_is_read_again_only_when_a_version_the_pointer_or_the_thresholds_change(evaluated):
    ws = evaluated
    age_all(ws)
    reader = QualityReader(ws)
    doc = reader.read()
    assert [r["version"] for r in doc["matrix"]["versions"]] == ["00001-animals", "00002-fruits", "00003-relabelled"]
    assert doc["current"] == "00002-fruits" and doc["max_forgetting"] == 0.05
    assert reader.read() is doc and reader.reads == 1, "nothing changed: not read again"

    write_version(ws, "00004-countries", (3.1, 0.6), **{"00001-animals": (0.418, 0.42)})
    models.set_current(ws, "local", str(ws.models / "00004-countries"), "00004-countries")
    doc = reader.read()
    assert doc["current"] == "00004-countries" and doc["matrix"]["versions"][-1]["current"]

    text = ws.config_path.read_text().replace("max_forgetting = 0.05", "max_forgetting = 0.5")
    assert text != ws.config_path.read_text(), "the template names eval.max_forgetting"
    ws.config_path.write_text(text)
    assert reader.read()["max_forgetting"] == 0.5

    ws.config_path.write_text("[eval]\nmax_forgetting = 'lots'\n")
    doc = reader.read()
    assert doc["max_forgetting"] == 0.05 and "eval.max_forgetting" in doc["config_problem"]


async def test_the_quality_view_shows_the_held_regression_in_the_alert_colour(evaluated):
    ws = evaluated
    app = TraindApp(ws, start_daemon=False, source=WorkspaceSource(ws), clock=time.time)
    async with app.run_test(size=(160, 48)) as pilot:
        panel = app.screen.query_one("#quality")
        assert panel.region.width == 0, "hidden until asked for"
        await pilot.press("e")
        await until(pilot, lambda: panel.region.width and panel.doc, what="the quality view")
        assert app.screen.query_one("#chart").region.width == 0, "in the chart's place"
        await pilot.pause(0.1)
        region = panel.region
        # By source: the newest file (held) raised animals' loss 0.418 -> 1.99 (+376%), past 5%: the alert
        # colour; it lowered its own (-62%) and fruits' (-3.8%): the good colour.
        assert shows_in(app, "+376%", RED, region)
        assert shows_in(app, "-62%", GREEN, region)
        assert shows_in(app, "-3.8%", GREEN, region)
        # The current model's figure on animals, and the +2% it cost them: within the limit, neither colour.
        assert on_screen(app, "0.418 +2.0%", region) and not shows_in(app, "0.418 +2.0%", RED + GREEN, region)
        text = ["".join(ch for ch, _ in row) for row in screen_rows(app)]
        assert any("newest 00003-relabelled held by the quality gate" in line for line in text)
        # The matrix marks the held version and the current one.
        assert shows_in(app, "H  00003-relabelled", YELLOW, region)
        assert any("*  00002-fruits" in line for line in text)
        assert shows_in(app, "1.990 +376%", RED, region)
        # The queue marks the held file as held, in yellow (below the cursor's row, a file waiting).
        assert shows_in(app, "held ", YELLOW, app.screen.query_one("#queue-table").region)

        await pilot.press("e")
        await until(pilot, lambda: app.screen.query_one("#chart").region.width, what="the chart back")
        assert panel.region.width == 0


async def test_the_quality_view_at_80x24_and_with_no_evaluated_version(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    app = TraindApp(ws, start_daemon=False, source=WorkspaceSource(ws), clock=time.time)
    async with app.run_test(size=(80, 24)) as pilot:
        await pilot.press("e")
        panel = app.screen.query_one("#quality")
        await until(pilot, lambda: panel.doc, what="the quality document")
        await pilot.pause(0.1)
        assert panel.region.width == 80 and panel.region.bottom <= 24
        assert any("no evaluated model version yet" in "".join(ch for ch, _ in row) for row in screen_rows(app))



def matrix_headers(text: str) -> list[str]:
    """The column names `traind quality` shows, a wrapped one put back together: in each block, the header
    lines down to the one starting "version", their words grouped by the column they end at."""
    names = []
    for block in text.split("\n\n"):
        lines = block.splitlines()
        header = lines[:next(i for i, line in enumerate(lines) if line.startswith("version")) + 1]
        columns: dict[int, str] = {}
        for line in header:
            for m in re.finditer(r"\S+", line):
                if m.group() != "version":
                    columns[m.end()] = columns.get(m.end(), "") + m.group()
        names += [columns[end] for end in sorted(columns)]
    return names


@pytest.mark.parametrize("columns", [150, 80, 50])
def test_traind_quality_names_each_source_whole_at_any_width_and_shows_small_changes(tmp_path, monkeypatch, columns):
    """Sources whose names end alike (`-compressed`) stay apart under their whole names, wrapped where the
    terminal is narrow; a change of 0.04% reads -0.040%, not -0%."""
    ws = make_workspace(tmp_path / "ws")
    chat, first, second = "00003-support-openai_chat", "00007-compressed", "00013-compressed"
    write_version(ws, chat, (3.1, 1.72))
    write_version(ws, first, (3.0, 1.5), **{chat: (1.72, 1.71931)})
    write_version(ws, second, (2.9, 1.4), **{chat: (1.71931, 1.75), first: (1.5, 1.52)})
    monkeypatch.setenv("COLUMNS", str(columns))
    shown = run_cli("quality", "-w", str(ws.root))
    assert shown.returncode == 0, shown.stderr
    text = shown.stdout
    assert max(len(line) for line in text.splitlines()) <= columns, text
    assert matrix_headers(text) == [chat, first, second], text
    assert " 1.719 -0.040%" in text and not re.search(r"[+-]0%", text), text



async def test_the_quality_view_shows_a_small_change_with_its_digits(tmp_path):
    ws = make_workspace(tmp_path / "ws")
    write_version(ws, "00003-support-openai_chat", (3.1, 1.72))
    write_version(ws, "00007-compressed", (3.0, 1.5), **{"00003-support-openai_chat": (1.72, 1.71931)})
    app = TraindApp(ws, start_daemon=False, source=WorkspaceSource(ws), clock=time.time)
    async with app.run_test(size=(160, 48)) as pilot:
        await pilot.press("e")
        panel = app.screen.query_one("#quality")
        await until(pilot, lambda: panel.region.width and panel.doc, what="the quality view")
        await pilot.pause(0.1)
        assert on_screen(app, "1.719 -0.040%", panel.region)  # in the matrix and by source
        assert not any(re.search(r"[+-]0\.?0*%", "".join(ch for ch, _ in row)) for row in screen_rows(app))


def eval_series() -> RunSeries:
    s = RunSeries()
    s.add_events("00007-chats", frozen_metrics(600))  # before at step 0, during at 301: own loss 3.52, ~2.45
    return s


def marks(strips) -> list[tuple[int, int]]:
    """(row, column) of each eval marker in the strips."""
    out = []
    for y, strip in enumerate(strips):
        x = 0
        for seg in strip:
            for ch in seg.text:
                if ch == EVAL_MARK:
                    out.append((y, x))
                x += 1
    return out


def test_eval_points_are_drawn_at_their_step_with_a_legend():
    s = eval_series()
    strips = render_chart(s, 80, 20)
    found = marks(strips[1:-1])  # in the plot, not the legend
    assert len(found) == 2, found
    (before_row, before_col), (during_row, during_col) = sorted(found, key=lambda m: m[1])
    assert before_row == 0, "the starting model's 3.52 is the top of the range"
    assert during_row > before_row and during_col > before_col
    axis = strips[1].text.index("┤")  # the y labels, then the axis, then the plot's columns
    # step 301 is about the middle of the job's 600 steps
    assert abs((during_col - axis - 1) / (80 - axis - 1) - 0.5) < 0.05
    assert "◆ eval" in strips[0].text
    styled = {seg.style for strip in strips[1:-1] for seg in strip if EVAL_MARK in seg.text}
    assert styled == {ChartStyles().eval}
    assert not marks(render_chart(s, 80, 20, view="lr")), "no eval points on the learning-rate view"


def test_an_eval_round_is_one_point_its_own_source_else_the_mean():
    s = RunSeries()
    s.add_events("00002-b", [{"event": "job_start"}, {"event": "step", "step": 1, "loss": 2.0},
                             {"event": "eval", "source": "00001-a", "phase": "after", "step": 1, "loss": 1.0},
                             {"event": "eval", "source": "eval/x", "phase": "after", "step": 1, "loss": 3.0}])
    assert s.evals.window(0, 1)[1].tolist() == [2.0], "no own held-out lines: the mean over the sources"
    s.add_events("00003-c", [{"event": "job_start"}, {"event": "step", "step": 1, "loss": 2.0},
                             {"event": "eval", "source": "00003-c", "phase": "after", "step": 1, "loss": 0.5},
                             {"event": "eval", "source": "00001-a", "phase": "after", "step": 1, "loss": 9.0}])
    assert s.evals.window(1, 2)[1].tolist() == [0.5], "the job's own held-out lines"
    # A job that evaluated but logged no step leaves no point on the next job's first step.
    s.add_events("00004-d", [{"event": "job_start"},
                             {"event": "eval", "source": "00004-d", "phase": "before", "step": 0, "loss": 7.0}])
    s.add_events("00005-e", [{"event": "job_start"}, {"event": "step", "step": 1, "loss": 2.0}])
    assert s.evals.window(2, 3)[0].tolist() == []


async def test_the_chart_on_screen_shows_eval_points():
    ws = Workspace.at("/srv/traind")
    app = TraindApp(ws, start_daemon=False, source=FrozenSource(ws), clock=lambda: NOW)
    async with app.run_test(size=(120, 40)) as pilot:
        await screen_loaded(pilot)
        chart = app.screen.query_one("#chart").region
        assert len(on_screen(app, EVAL_MARK, chart)) >= 4, "the before round and the during rounds of the frozen job"
        assert shows_in(app, EVAL_MARK, YELLOW, chart)


class ForgettingSnapshot(FrozenSource):
    """The frozen listings, the second newest snapshot's model having forgotten a source by 12% (not the
    newest: the cursor's row shows in the cursor's colours)."""

    def listings(self):
        queue, snaps, origin, quality = super().listings()
        snaps[-2]["source"]["eval"] = {"sources": 3, "own_loss": 1.5, "own_change": -0.12,
                                       "worst_source": "00001-intro", "worst_change": 0.12}
        return queue, snaps, origin, quality


async def test_each_snapshot_says_how_good_its_model_was():
    ws = Workspace.at("/srv/traind")
    app = TraindApp(ws, start_daemon=False, source=ForgettingSnapshot(ws), clock=lambda: NOW)
    async with app.run_test(size=(160, 48)) as pilot:
        await screen_loaded(pilot)
        region = app.screen.query_one("#snapshots").region
        assert shows_in(app, "worst +12% on 00001-intro", RED, region), "past eval.max_forgetting: the alert colour"
        assert shows_in(app, "own -12%", GREEN, region)
        within = "worst +1.7% on 00001-intro"  # daily-20251230 (00005-docs)
        assert on_screen(app, within, region) and not shows_in(app, within, RED, region)
