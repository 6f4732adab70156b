"""The loss chart widget: draws braille and axis labels, toggles scope and view, redraws only on new data."""

from __future__ import annotations

import math

from textual.app import App, ComposeResult

from pilot_waits import until
from tui.widgets.loss_chart import EMPTY_TEXT, LossChart


def step_events(n, start=1, base=3.0, spike_at=None):
    out = [{"event": "job_start", "job_id": "x"}]
    for i in range(start, start + n):
        loss = base * math.exp(-i / 300) + 0.3 + 0.1 * math.sin(i * 0.7)
        if i == spike_at:
            loss = 9.0
        out.append({"event": "step", "step": i, "loss": loss, "learning_rate": 1e-4 * (1 - i / (start + n)),
                    "grad_norm": 1.0})
    out.append({"event": "checkpoint", "step": start + n - 1, "path": "p"})
    return out


class ChartApp(App):
    def compose(self) -> ComposeResult:
        yield LossChart(id="chart")


def text_of(chart: LossChart) -> str:
    return "\n".join(chart.render_line(y).text for y in range(chart.size.height))


def braille(text: str) -> int:
    return sum(1 for ch in text if 0x2801 <= ord(ch) <= 0x28FF)


async def test_empty_then_points_then_toggles():
    app = ChartApp()
    async with app.run_test(size=(80, 24)) as pilot:
        chart = app.query_one(LossChart)
        await pilot.pause()
        assert EMPTY_TEXT in text_of(chart)
        chart.add_events("00001-a", step_events(1000, spike_at=400))
        chart.add_events("00002-b", step_events(200, base=1.0))
        await until(pilot, lambda: EMPTY_TEXT not in text_of(chart))
        job = text_of(chart)
        assert EMPTY_TEXT not in job and braille(job) > 50
        assert "job 00002-b" in job and "┤" in job and "└1" in job  # y labels, x axis from step 1
        assert "200" in job.splitlines()[-1] or "19" in job.splitlines()[-1]

        chart.toggle_scope()
        await pilot.pause()
        run = text_of(chart)
        assert chart.scope == "run" and "run, 2 jobs" in run and run != job
        assert "┊" in run or "┴" in run  # the job boundary
        assert "9" in run.splitlines()[1]  # the spike at 9.0 sets the top label

        chart.toggle_view()
        await pilot.pause()
        lr = text_of(chart)
        assert "learning rate" in lr and "e-05" in lr and lr != run
        chart.set_view("loss")
        chart.set_scope("job")
        chart.current_job = "00001-a"
        await until(pilot, lambda: "job 00001-a" in text_of(chart))


async def test_redraws_only_when_data_changed_and_small_panels_work():
    app = ChartApp()
    async with app.run_test(size=(40, 10)) as pilot:
        chart = app.query_one(LossChart)
        chart.add_events("00001-a", step_events(500))
        await until(pilot, lambda: braille(text_of(chart)) > 10)
        text = text_of(chart)
        assert braille(text) > 10 and "└" in text
        draws = chart.draws
        await pilot.pause(0.8)  # idle: no new data, no redraw
        assert chart.draws == draws
        for i in range(20):  # a burst of updates coalesces into at most a few redraws
            chart.add_events("00001-a", step_events(5, start=501 + 5 * i)[1:-1])
        await until(pilot, lambda: chart.draws > draws)
        await pilot.pause(0.3)
        assert 1 <= chart.draws - draws <= 3
        chart.smoothing = 0.0
        await pilot.pause()
        assert "ema 0.00" in text_of(chart)


def test_snapshot_80x24(snap_compare):
    class Frozen(ChartApp):
        def on_mount(self) -> None:
            chart = self.query_one(LossChart)
            chart.add_events("00001-a", step_events(600, spike_at=250))
            chart.add_events("00002-b", step_events(300, base=1.5))
            chart.set_scope("run")

    assert snap_compare(Frozen(), terminal_size=(80, 24))


async def test_repainting_only_changed_lines_leaves_no_stale_line():
    """Data arriving in small batches repaints only the lines that changed; what the screen holds
    afterwards is exactly a fresh drawing of all the data."""
    from textual.geometry import Region

    from tui.widgets.loss_chart import render_chart

    app = ChartApp()
    async with app.run_test(size=(70, 18)) as pilot:
        chart = app.query_one(LossChart)
        events = step_events(400, spike_at=150)
        chart.add_events("00001-a", events[:50])
        await until(pilot, lambda: chart.draws > 0)
        for lo in range(50, len(events), 35):
            draws = chart.draws
            chart.add_events("00001-a", events[lo : lo + 35])
            await until(pilot, lambda: chart.draws > draws)
            await pilot.pause()  # the repaint of the changed lines
            width, height = chart.size
            on_screen = [strip.text for strip in chart.render_lines(Region(0, 0, width, height))]
            fresh = [strip.text for strip in render_chart(chart.series, width, height, job_id=chart.current_job)]
            assert on_screen == fresh, f"stale lines after adding steps {lo}..{lo + 34}"
