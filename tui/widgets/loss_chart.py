"""The loss chart: raw loss (dim) and its EMA (bright) for this job or the whole run, or the learning rate;
in the loss view, the held-out evaluations (`eval` events: the job's own held-out lines, else the mean
over the suite's sources) as ◆ markers at the step they were measured.

Drawn in Unicode braille (2x4 dots a cell) from `tui.series.RunSeries`, which
downsamples to the chart's width through its min/max pyramid: a draw touches
O(width) values whatever the history, and every spike lands in some column.
`render_chart` is a pure function of the series and a size (the benchmark
times it; the eval markers add a bisection and O(markers in view), a few a
job); the widget caches its strips and rebuilds them only when the data
changed (at most 4 times a second) or the size did, and repaints only the lines
that differ from the last frame. Named ANSI colours only (16 colours).
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import dataclass
from typing import Any, Iterable

import numpy as np
from rich.segment import Segment
from rich.style import Style
from textual.geometry import Region
from textual.reactive import reactive
from textual.strip import Strip
from textual.timer import Timer
from textual.widget import Widget

from tui.series import RunSeries

EMPTY_TEXT = "waiting for the first step"
REDRAW_INTERVAL = 1.0  # seconds: data redraws at most once a second, as often as status.json comes
BURST_WAIT = 0.01  # seconds: even after a quiet spell, the rest of a burst of messages joins the redraw
SCOPES = ("job", "run")
VIEWS = ("loss", "lr")

_BLANK, _LOW, _TOP, _MARK, _EVAL = range(5)  # what a plot cell shows: nothing, the dim line, the bright one,
# a job boundary, an eval point
EVAL_MARK = "◆"

# Braille dot bits by (row in cell, column in cell).
_BRAILLE_BITS = np.array([[0x01, 0x08], [0x02, 0x10], [0x04, 0x20], [0x40, 0x80]], dtype=np.uint8)


@dataclass(frozen=True)
class ChartStyles:
    raw: Style = Style(color="blue")
    ema: Style = Style(color="bright_cyan", bold=True)
    lr: Style = Style(color="bright_magenta")
    boundary: Style = Style(color="yellow")
    eval: Style = Style(color="bright_yellow", bold=True)
    axis: Style = Style(color="bright_black")
    label: Style = Style()
    title: Style = Style(bold=True)
    empty: Style = Style(color="bright_black", italic=True)


def compact(value: float) -> str:
    """A step count in a few characters: 950, 1.2k, 35k, 1.0M."""
    value = float(value)
    for limit, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= limit:
            scaled = value / limit
            return f"{scaled:.1f}{suffix}" if abs(scaled) < 10 else f"{scaled:.0f}{suffix}"
    return f"{value:.0f}"


def _ylabel(value: float, view: str) -> str:
    if not math.isfinite(value):
        return "?"
    if view == "lr":
        return f"{value:.1e}"
    return f"{value:.3g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.1e}"


def _fit(text: str, width: int) -> str:
    return text[:width].ljust(width)


def _spans(top: np.ndarray, bottom: np.ndarray, rows: int) -> np.ndarray:
    """Boolean dot grid (rows x columns): column c set from row top[c] to bottom[c]; connects neighbours."""
    ok = np.isfinite(top) & np.isfinite(bottom)
    t = np.where(ok, top, rows).astype(np.int64)
    b = np.where(ok, bottom, -1).astype(np.int64)
    # Join each column to the one before, so a line has no gap where it moves fast.
    prev_ok = np.concatenate(([False], ok[:-1]))
    both = ok & prev_ok
    pt, pb = np.roll(t, 1), np.roll(b, 1)
    t = np.where(both, np.minimum(t, pb), t)
    b = np.where(both, np.maximum(b, pt), b)
    r = np.arange(rows)[:, None]
    return (r >= t[None, :]) & (r <= b[None, :])


def _pack(grid: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Dot grid (4 rows x 2 cols a cell) to braille bit codes per cell."""
    dots = grid.reshape(rows, 4, cols, 2).view(np.uint8)
    codes = np.zeros((rows, cols), dtype=np.uint8)
    for (r, c), bit in np.ndenumerate(_BRAILLE_BITS):  # eight whole-grid ORs
        codes |= dots[:, r, :, c] * np.uint8(bit)
    return codes


def render_chart(series: RunSeries, width: int, height: int, *, view: str = "loss", scope: str = "job",
                 job_id: str | None = None, styles: ChartStyles = ChartStyles()) -> list[Strip]:
    """`height` strips of `width` cells: a title line, the plot with a y axis, and an x axis of steps."""
    if width <= 0 or height <= 0:
        return []
    blank = Strip([Segment(" " * width)], width)
    lines: list[Strip] = [blank] * height
    n = len(series)
    if scope == "run":
        lo, hi = 0, n
        where = f"run, {len(series.boundaries)} job{'s' if len(series.boundaries) != 1 else ''}"
    else:
        lo, hi = series.job_range(job_id)
        shown = job_id if job_id in series.job_ids() else (series.boundaries[-1][0] if series.boundaries else job_id)
        where = f"job {shown}" if shown else "job"
    name = "learning rate" if view == "lr" else "loss"
    eval_x, eval_v = series.evals.window(lo, hi) if view == "loss" else (np.empty(0), np.empty(0))
    legend: list[tuple[str, Style]] = []
    if view == "lr":
        legend = [("⣿", styles.lr), (" lr ", styles.label)]
    else:
        legend = [("⣿", styles.raw), (" raw ", styles.label), ("⣿", styles.ema), (f" ema {series.smoothing:.2f} ", styles.label)]
        if len(eval_x):
            legend += [(EVAL_MARK, styles.eval), (" eval ", styles.label)]
    title = f" {name} · {where}"
    legend_len = sum(len(t) for t, _ in legend)
    if len(title) + legend_len + 1 <= width:
        segs = [Segment(title, styles.title), Segment(" " * (width - len(title) - legend_len))]
        segs += [Segment(t, s) for t, s in legend]
        lines[0] = Strip(segs, width)
    else:
        lines[0] = Strip([Segment(_fit(title, width), styles.title)], width)
    if height == 1:
        return lines

    if hi <= lo:
        row = max(1, (height - 1) // 2 + 1) if height > 2 else 1
        lines[min(row, height - 1)] = Strip([Segment(EMPTY_TEXT[:width].center(width), styles.empty)], width)
        return lines

    plot_rows = max(1, height - 2)
    field = "lr" if view == "lr" else "loss"
    # Y range first (labels decide the plot's left edge); a cheap pass at width 64 is exact for min/max.
    probe = series.downsample(field, lo, hi, 64)
    y_lo, y_hi = float(np.nanmin(probe.y_min, initial=np.inf)), float(np.nanmax(probe.y_max, initial=-np.inf))
    if len(eval_v):  # an eval point off the training curve (the starting model's, say) still shows
        y_lo, y_hi = min(y_lo, float(eval_v.min())), max(y_hi, float(eval_v.max()))
    if not (math.isfinite(y_lo) and math.isfinite(y_hi)):
        y_lo, y_hi = 0.0, 1.0
    # The EMA restarts with each job, so it lies within the raw range: no need to look at it.
    if y_hi - y_lo <= abs(y_hi) * 1e-9:
        pad = abs(y_hi) * 0.05 or 1.0
        y_lo, y_hi = y_lo - pad, y_hi + pad
    label_rows = sorted({0, plot_rows // 2, plot_rows - 1}) if plot_rows >= 3 else [0, plot_rows - 1]
    dot_rows = 4 * plot_rows

    def value_at(row: int) -> float:  # the top row is labelled with the max, the bottom one with the min
        return y_hi - row / max(1, plot_rows - 1) * (y_hi - y_lo)

    labels = {r: _ylabel(value_at(r), view) for r in label_rows}
    label_w = max(len(t) for t in labels.values())
    plot_w = width - label_w - 1
    if plot_w < 2:
        lines[1] = Strip([Segment(_fit(f" {len(series)} steps", width), styles.label)], width)
        return lines
    cols = 2 * plot_w
    span = hi - lo
    d = series.downsample(field, lo, hi, cols)
    scale = (dot_rows - 1) / (y_hi - y_lo)

    def to_row(v: np.ndarray) -> np.ndarray:
        return np.rint((y_hi - v) * scale)

    # Bucket x to dot columns; with fewer points than columns, interpolate so the line stays joined.
    bcol = np.floor((d.x - lo + 0.5) / span * cols)
    col_idx = np.arange(cols)
    sparse = len(d.x) < cols
    if sparse:
        inside = (col_idx >= bcol[0]) & (col_idx <= bcol[-1])

        def spread(v: np.ndarray) -> np.ndarray:
            good = np.isfinite(v)
            out = np.full(cols, np.nan)
            if good.any():
                out[inside] = np.interp(col_idx[inside], bcol[good], v[good])
            return out

        y_min, y_max = spread(d.y_min), spread(d.y_max)
        raw_max, raw_min = to_row(y_max), to_row(y_min)
    else:
        y_min, y_max = np.full(cols, np.nan), np.full(cols, np.nan)
        c = np.clip(bcol.astype(np.int64), 0, cols - 1)
        y_min[c], y_max[c] = d.y_min, d.y_max
        raw_max, raw_min = to_row(y_max), to_row(y_min)
    raw_grid = _spans(raw_max, raw_min, dot_rows)
    if view == "loss":
        ema_v = series.ema_at(d.last).astype(np.float64)
        if sparse:
            ema_cols = spread(ema_v)
        else:
            ema_cols = np.full(cols, np.nan)
            ema_cols[c] = ema_v
        er = to_row(ema_cols)
        top_grid = _spans(er, er, dot_rows)
    else:
        top_grid = np.zeros_like(raw_grid)
        raw_grid, top_grid = top_grid, raw_grid  # the lr is the bright line
    low_codes = _pack(raw_grid, plot_rows, plot_w)
    top_codes = _pack(top_grid, plot_rows, plot_w)
    # Job boundaries (run view): a marker in each empty cell of the boundary's column.
    marker_cols: set[int] = set()
    if scope == "run":
        for _, first in series.boundaries[1:]:
            if lo < first < hi:
                marker_cols.add(int((first - lo) / span * plot_w))
    top_style = styles.lr if view == "lr" else styles.ema
    # Each cell's character and style, for the whole plot at once: the bright line over the dim
    # one (sharing the cell's dots), a boundary marker in empty cells, else blank.
    kind = np.where(top_codes > 0, _TOP, np.where(low_codes > 0, _LOW, _BLANK))
    points = np.where(kind == _BLANK, ord(" "), 0x2800 + (top_codes | low_codes).astype(np.uint32)).astype(np.uint32)
    if marker_cols:
        marks = np.zeros(plot_w, dtype=bool)
        marks[sorted(marker_cols)] = True
        is_mark = (kind == _BLANK) & marks[None, :]
        kind[is_mark], points[is_mark] = _MARK, ord("┊")
    if len(eval_x):  # over the lines: a marker fills its cell
        cell_col = np.clip(np.floor((eval_x - lo + 0.5) / span * plot_w).astype(np.int64), 0, plot_w - 1)
        cell_row = np.clip(to_row(eval_v).astype(np.int64) // 4, 0, plot_rows - 1)
        kind[cell_row, cell_col], points[cell_row, cell_col] = _EVAL, ord(EVAL_MARK)
    text = points.tobytes().decode("utf-32-le")
    kind_styles = {_TOP: top_style, _LOW: styles.raw, _MARK: styles.boundary, _EVAL: styles.eval, _BLANK: None}
    run_starts = np.ones(kind.shape, dtype=bool)
    run_starts[:, 1:] = kind[:, 1:] != kind[:, :-1]
    for r in range(plot_rows):
        label = labels.get(r)
        segs = [Segment(label.rjust(label_w), styles.label) if label else Segment(" " * label_w),
                Segment("┤" if label else "│", styles.axis)]
        row_text, row_kind = text[r * plot_w : (r + 1) * plot_w], kind[r]
        starts = np.flatnonzero(run_starts[r]).tolist()
        for a, b in zip(starts, starts[1:] + [plot_w]):
            segs.append(Segment(row_text[a:b], kind_styles[int(row_kind[a])]))
        lines[1 + r] = Strip(segs, width)
    if height >= 3:
        lines[height - 1] = _x_axis(series, lo, hi, scope, label_w, plot_w, marker_cols, styles, width)
    return lines


def _x_axis(series: RunSeries, lo: int, hi: int, scope: str, label_w: int, plot_w: int,
            marker_cols: set[int], styles: ChartStyles, width: int) -> Strip:
    """Step labels under the plot: the job's step numbers, or steps logged across the run."""
    chars = [" "] * plot_w
    for m in marker_cols:
        chars[m] = "┴"
    span = hi - lo
    steps = series.steps.view
    gap = 12
    x, previous = 0, None
    while x < plot_w:
        idx = min(hi - 1, lo + int(x / plot_w * span))
        text = compact(steps[idx] if scope == "job" else idx + 1)
        if x + len(text) > plot_w:
            text = compact(steps[hi - 1] if scope == "job" else hi)
            x = max(0, plot_w - len(text))
        if text != previous:  # few points: no label twice
            chars[x : x + len(text)] = list(text)
            previous = text
        x += max(gap, len(text) + 2)
    return Strip([Segment(" " * label_w), Segment("└", styles.axis), Segment("".join(chars)[:plot_w], styles.label)],
                 width)


class LossChart(Widget):
    """Loss (raw and EMA, eval points) or learning rate of this job or the whole run; `add_events` feeds it."""

    COMPONENT_CLASSES = {"loss-chart--raw", "loss-chart--ema", "loss-chart--lr", "loss-chart--boundary",
                         "loss-chart--eval", "loss-chart--axis", "loss-chart--title", "loss-chart--empty"}
    DEFAULT_CSS = """
    LossChart { height: 1fr; min-height: 4; }
    LossChart > .loss-chart--raw { color: ansi_blue; }
    LossChart > .loss-chart--ema { color: ansi_bright_cyan; text-style: bold; }
    LossChart > .loss-chart--lr { color: ansi_bright_magenta; }
    LossChart > .loss-chart--boundary { color: ansi_yellow; }
    LossChart > .loss-chart--eval { color: ansi_bright_yellow; text-style: bold; }
    LossChart > .loss-chart--axis { color: ansi_bright_black; }
    LossChart > .loss-chart--title { text-style: bold; }
    LossChart > .loss-chart--empty { color: ansi_bright_black; text-style: italic; }
    """

    smoothing: reactive[float] = reactive(0.9, layout=False, repaint=False)
    """EMA smoothing, 0 (none) to 0.999 (heavy): each point moves the average by (1 - smoothing)."""
    current_job: reactive[str | None] = reactive(None, layout=False, repaint=False)
    """The job the "job" scope shows (from status); None: the last job with data."""
    scope: reactive[str] = reactive("job", layout=False, repaint=False)
    """"job" (the current job only) or "run" (every job, boundaries marked)."""
    view: reactive[str] = reactive("loss", layout=False, repaint=False)
    """"loss" (raw and EMA) or "lr" (learning rate)."""

    def __init__(self, series: RunSeries | None = None, *, name: str | None = None, id: str | None = None,
                 classes: str | None = None) -> None:
        super().__init__(name=name, id=id, classes=classes)
        self.series = series if series is not None else RunSeries()
        self._dirty = False
        self._strips: list[Strip] | None = None
        self._drawn_for: tuple[Any, ...] | None = None
        self._chart_styles: ChartStyles | None = None  # resolved once: a quarter of a redraw's cost otherwise
        self.draws = 0  # rebuilds so far (tests check that idle data does not redraw)
        self._flush_timer: Timer | None = None
        self._last_draw = -math.inf

    # -- the API the app calls ---------------------------------------------------------------

    def add_events(self, job_id: str, events: Iterable[dict[str, Any]]) -> None:
        """metrics.jsonl events of one job: `step` adds a point, `job_start` marks a boundary, `eval` a marker."""
        before = self.series.version
        self.series.add_events(job_id, events)
        if self.series.version != before:
            self._data_changed()

    def set_scope(self, scope: str) -> None:
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {SCOPES}, not {scope!r}")
        self.scope = scope

    def toggle_scope(self) -> None:
        self.scope = "run" if self.scope == "job" else "job"

    def set_view(self, view: str) -> None:
        if view not in VIEWS:
            raise ValueError(f"view must be one of {VIEWS}, not {view!r}")
        self.view = view

    def toggle_view(self) -> None:
        self.view = "lr" if self.view == "loss" else "loss"

    # -- drawing ----------------------------------------------------------------------------

    def validate_smoothing(self, value: float) -> float:
        return min(max(float(value), 0.0), 0.999)

    def watch_smoothing(self, value: float) -> None:
        self.series.set_smoothing(value)
        self._redraw_now()

    def watch_current_job(self) -> None:
        self._data_changed()

    def watch_scope(self) -> None:
        self._redraw_now()

    def watch_view(self) -> None:
        self._redraw_now()

    def _redraw_now(self) -> None:
        """A user's toggle shows at once; new data waits for `_flush`."""
        self._strips = None
        self.refresh()

    def _data_changed(self) -> None:
        """Schedule a redraw: soon after a quiet spell, else `REDRAW_INTERVAL` after the last one."""
        self._dirty = True
        if self._flush_timer is None and self.is_mounted:
            wait = max(BURST_WAIT, self._last_draw + REDRAW_INTERVAL - time.monotonic())
            self._flush_timer = self.set_timer(wait, self._flush, name="chart redraw")

    def _flush(self) -> None:
        """Redraw for new data, repainting only the lines that differ from the last frame (rows
        the lines do not cross and unchanged labels stay as they are)."""
        self._flush_timer = None
        if not self._dirty:
            return
        self._dirty = False
        old, old_key = self._strips, self._drawn_for
        strips = self._rebuild()
        if old is None or old_key != self._drawn_for or len(old) != len(strips):
            self.refresh()
            return
        width = self.size.width
        changed = [y for y, (a, b) in enumerate(zip(old, strips)) if a != b]
        for first, count in _runs(changed):
            self.refresh(Region(0, first, width, count))

    def _styles(self) -> ChartStyles:
        if self._chart_styles is None:
            self._chart_styles = self._resolve_styles()
        return self._chart_styles

    def _resolve_styles(self) -> ChartStyles:
        # Partial styles: colour and text style only, so every cell shows the widget's own background.
        def get(name: str) -> Style:
            return self.get_component_rich_style(name, partial=True)

        return ChartStyles(raw=get("loss-chart--raw"), ema=get("loss-chart--ema"), lr=get("loss-chart--lr"),
                           boundary=get("loss-chart--boundary"), eval=get("loss-chart--eval"), axis=get("loss-chart--axis"),
                           label=Style(), title=get("loss-chart--title"), empty=get("loss-chart--empty"))

    def _rebuild(self) -> list[Strip]:
        width, height = self.size
        self._strips = render_chart(self.series, width, height, view=self.view, scope=self.scope,
                                    job_id=self.current_job, styles=self._styles())
        self._drawn_for = (width, height)
        self._last_draw = time.monotonic()
        self.draws += 1
        return self._strips

    def notify_style_update(self) -> None:
        super().notify_style_update()
        self._strips = self._chart_styles = None  # a theme or class change: the next paint draws with the new colours

    def render_line(self, y: int) -> Strip:
        width, height = self.size
        if self._strips is None or self._drawn_for != (width, height):
            self._rebuild()
        if 0 <= y < len(self._strips):
            return self._strips[y]
        return Strip.blank(width, self.rich_style)


def _runs(rows: list[int]) -> Iterable[tuple[int, int]]:
    """(first, count) of each run of consecutive numbers in ascending `rows`."""
    for _, run in itertools.groupby(enumerate(rows), lambda pair: pair[1] - pair[0]):
        ys = [y for _, y in run]
        yield ys[0], len(ys)
