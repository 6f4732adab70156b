"""The run's numeric history for the loss chart: steps, loss, learning rate and the EMA, job by job,
and the held-out evaluations (`eval` events) placed on the same axis.

Append-only, in growable numpy arrays (amortised doubling), so a million logged
steps cost ~24 MB rather than a million dicts. Each drawn column keeps a
min/max pyramid (blocks of 16, 256, 4096, ... points) updated on append, so
`RunSeries.downsample` touches O(buckets x small) values whatever the history:
a draw of a million-step run costs what a draw of a thousand-step run costs.

This module must never import textual (nor torch): it is plain numpy, tested
and benchmarked on its own.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, NamedTuple

import numpy as np

FANOUT = 16                # points per block, blocks per block above
LEVELS = 5                 # blocks of 16, 256, 4096, 65536, 1048576 points
EXACT_BUCKET = 4 * FANOUT  # below this many points per bucket, reduce the raw values directly


class Downsampled(NamedTuple):
    """One value range per bucket: the x centre (point index), min and max (NaN ignored), last value and
    the x of that last point."""

    x: np.ndarray
    y_min: np.ndarray
    y_max: np.ndarray
    y_last: np.ndarray
    last: np.ndarray


class Growable:
    """A 1-D numpy array that grows by doubling; `view` is the filled part (no copy)."""

    def __init__(self, dtype: Any, capacity: int = 1024) -> None:
        self._data = np.empty(max(16, capacity), dtype=dtype)
        self.n = 0

    def extend(self, values: np.ndarray) -> None:
        need = self.n + len(values)
        if need > len(self._data):
            bigger = np.empty(max(need, 2 * len(self._data)), dtype=self._data.dtype)
            bigger[: self.n] = self._data[: self.n]
            self._data = bigger
        self._data[self.n : need] = values
        self.n = need

    @property
    def view(self) -> np.ndarray:
        return self._data[: self.n]

    @property
    def nbytes(self) -> int:
        return self._data.nbytes

    def truncate(self, n: int) -> None:
        self.n = min(self.n, max(0, n))


class EvalPoints:
    """Eval measurements on the chart's axis: a point per evaluation round of a job (its phase and step),
    at the index of the job's last step logged before it (its first point for the "before" round).

    A point's value is the job's own held-out loss when the round measured it (the source named as the
    job), else the mean over the round's sources. Points are kept in index order, so a chart finds
    those in a window by bisection; there are a few a job, not one a step.
    """

    def __init__(self, capacity: int = 64) -> None:
        self.x = Growable(np.int64, capacity)
        self.own = Growable(np.float64, capacity)
        self.total = Growable(np.float64, capacity)
        self.count = Growable(np.int32, capacity)
        self._round: tuple[str, str, int, int] | None = None  # (job, phase, step, index) of the newest point

    def __len__(self) -> int:
        return self.x.n

    @property
    def nbytes(self) -> int:
        return sum(c.nbytes for c in (self.x, self.own, self.total, self.count))

    def add(self, index: int, job_id: str, phase: str, step: int, source: str, loss: float) -> None:
        key = (job_id, phase, step, index)
        if key != self._round:  # a round's events come one after another: one point for all of them
            self.x.extend(np.array([index]))
            self.own.extend(np.array([math.nan]))
            self.total.extend(np.zeros(1))
            self.count.extend(np.zeros(1, dtype=np.int32))
            self._round = key
        if not math.isfinite(loss):
            return
        i = len(self) - 1
        if source == job_id:
            self.own.view[i] = loss
        self.total.view[i] += loss
        self.count.view[i] += 1

    def truncate(self, index: int) -> None:
        """Drop the points at `index` and after (a job that logged no step leaves the chart)."""
        keep = int(np.searchsorted(self.x.view, index, side="left"))
        for column in (self.x, self.own, self.total, self.count):
            column.truncate(keep)
        self._round = None

    def window(self, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
        """(indices, values) of the points in [lo, hi) with a finite value."""
        a, b = np.searchsorted(self.x.view, [lo, hi], side="left")
        own, total, count = self.own.view[a:b], self.total.view[a:b], self.count.view[a:b]
        with np.errstate(invalid="ignore", divide="ignore"):
            values = np.where(np.isfinite(own), own, total / count)
        good = np.isfinite(values)
        return self.x.view[a:b][good], values[good]


class MinMaxColumn:
    """A float column with its min/max pyramid: level k holds min and max of each complete block of 16**k points."""

    def __init__(self, capacity: int = 1024, dtype: Any = np.float64) -> None:
        self.raw = Growable(dtype, capacity)
        self.mins = [Growable(dtype, capacity // FANOUT**k + 1) for k in range(1, LEVELS + 1)]
        self.maxs = [Growable(dtype, capacity // FANOUT**k + 1) for k in range(1, LEVELS + 1)]

    def __len__(self) -> int:
        return self.raw.n

    def extend(self, values: np.ndarray) -> None:
        self.raw.extend(values)
        below_min = below_max = self.raw.view
        for k in range(LEVELS):
            done, complete = self.mins[k].n, len(below_min) // FANOUT
            if complete > done:  # only the blocks completed by this append are computed
                part = slice(done * FANOUT, complete * FANOUT)
                self.mins[k].extend(np.fmin.reduce(below_min[part].reshape(-1, FANOUT), axis=1))
                self.maxs[k].extend(np.fmax.reduce(below_max[part].reshape(-1, FANOUT), axis=1))
            below_min, below_max = self.mins[k].view, self.maxs[k].view

    def range_minmax(self, a: int, b: int, level: int = LEVELS) -> tuple[float, float]:
        """min and max of points [a, b), from the largest aligned blocks down: O(FANOUT x levels)."""
        if b <= a:
            return math.nan, math.nan
        if level == 0 or b - a <= 2 * FANOUT:
            part = self.raw.view[a:b]
            return float(np.fmin.reduce(part, initial=math.nan)), float(np.fmax.reduce(part, initial=math.nan))
        size = FANOUT**level
        first, last = -(-a // size), min(b // size, self.mins[level - 1].n)
        if first >= last:
            return self.range_minmax(a, b, level - 1)
        lo_min, lo_max = self.range_minmax(a, first * size, level - 1)
        hi_min, hi_max = self.range_minmax(last * size, b, level - 1)
        mid_min = float(np.fmin.reduce(self.mins[level - 1].view[first:last]))
        mid_max = float(np.fmax.reduce(self.maxs[level - 1].view[first:last]))
        return (float(np.fmin.reduce([lo_min, mid_min, hi_min])), float(np.fmax.reduce([lo_max, mid_max, hi_max])))

    def downsample(self, lo: int, hi: int, buckets: int) -> Downsampled:
        """Points [lo, hi) in about `buckets` buckets; every point falls in exactly one, so a spike always shows.

        With many points a bucket, bucket edges are snapped to the blocks of the
        largest pyramid level at most a quarter of a bucket long (an edge moves
        by under a quarter bucket), and the blocks are reduced instead of the points.
        """
        lo, hi = max(0, lo), min(hi, len(self))
        if hi <= lo or buckets <= 0:
            empty = np.empty(0)
            return Downsampled(empty, empty, empty, empty, empty)
        raw = self.raw.view
        span = hi - lo
        if span < EXACT_BUCKET * buckets:
            return downsample(np.arange(lo, hi), raw[lo:hi], 0, span, buckets)
        level = min(LEVELS, int(math.log(span / buckets / 4, FANOUT)))
        while True:  # whole blocks [first, last) of `size` points; level 1 always has some (span >= 64 buckets)
            size = FANOUT**level
            first, last = -(-lo // size), min(hi // size, self.mins[level - 1].n)
            if first < last or level == 1:
                break
            level -= 1
        edges = lo + np.arange(1, buckets) * (span / buckets)
        inner = np.clip(np.rint(edges / size).astype(np.int64), first, last)
        inner = np.unique(inner)  # ascending, no empty bucket
        inner = inner[(inner > first) & (inner < last)]
        starts = np.concatenate(([first], inner)) - first
        mins = np.fmin.reduceat(self.mins[level - 1].view[first:last], starts)
        maxs = np.fmax.reduceat(self.maxs[level - 1].view[first:last], starts)
        head = self.range_minmax(lo, first * size, level - 1)  # partial blocks at both ends
        tail = self.range_minmax(last * size, hi, level - 1)
        mins[0], maxs[0] = np.fmin.reduce([mins[0], head[0]]), np.fmax.reduce([maxs[0], head[1]])
        mins[-1], maxs[-1] = np.fmin.reduce([mins[-1], tail[0]]), np.fmax.reduce([maxs[-1], tail[1]])
        bounds = np.concatenate(([lo], inner * size, [hi]))
        return Downsampled((bounds[:-1] + bounds[1:] - 1) / 2, mins, maxs, raw[bounds[1:] - 1], bounds[1:] - 1)


def downsample(x: np.ndarray, y: np.ndarray, lo: int, hi: int, buckets: int) -> Downsampled:
    """Exact reference: y[lo:hi] in `buckets` equal buckets with numpy reduceat, O(hi - lo).

    Fine for a window of a few thousand points; `RunSeries.downsample` is the
    one to draw a whole run with.
    """
    lo, hi = max(0, lo), min(hi, len(y))
    span = hi - lo
    if span <= 0 or buckets <= 0:
        empty = np.empty(0)
        return Downsampled(empty, empty, empty, empty, empty)
    buckets = min(buckets, span)
    starts = np.unique((np.arange(buckets) * (span / buckets)).astype(np.int64))
    part = y[lo:hi]
    ends = np.concatenate((starts[1:], [span])) - 1
    xs = np.asarray(x[lo:hi], dtype=np.float64)
    return Downsampled((xs[starts] + xs[ends]) / 2, np.fmin.reduceat(part, starts),
                       np.fmax.reduceat(part, starts), part[ends], np.asarray(x[lo:hi])[ends])


def _chunk_for(alpha: float) -> int:
    """Longest chunk whose alpha**-chunk stays far from overflow (the closed form below divides by it)."""
    if alpha <= 0.0:
        return 1 << 12
    return max(1, min(1 << 12, int(120 / -math.log10(alpha))))


def ema(values: np.ndarray, alpha: float, prior: float | None = None) -> tuple[np.ndarray, float | None]:
    """Exponential moving average, `out[t] = alpha * out[t-1] + (1 - alpha) * values[t]`, and the running value.

    `alpha` is the smoothing (0: none, 0.999: heavy), as TensorBoard's slider.
    Pass the returned running value as `prior` to continue incrementally. With no
    prior the first value starts the average. A NaN (a non-finite loss) leaves
    the average unchanged. Vectorised in chunks (closed form), so re-smoothing a
    million points after the user changes `alpha` costs milliseconds.
    """
    values = np.asarray(values, dtype=np.float64)
    out = np.empty(len(values))
    finite = np.isfinite(values)
    xs = values[finite]
    ys = np.empty(len(xs))
    alpha = min(max(float(alpha), 0.0), 0.999)
    if len(xs):
        p = xs[0] if prior is None or not math.isfinite(prior) else prior
        if alpha == 0.0:
            ys[:] = xs
        else:
            chunk = _chunk_for(alpha)
            k = np.arange(min(chunk, len(xs)), dtype=np.float64)
            grow = alpha ** -k            # alpha**-k
            decay = alpha ** (k + 1)      # alpha**(t+1)
            for start in range(0, len(xs), chunk):
                part = xs[start : start + chunk]
                m = len(part)
                cs = np.cumsum(part * grow[:m])
                ys[start : start + m] = decay[:m] * p + (1 - alpha) * (decay[:m] / alpha) * cs
                p = ys[start + m - 1]
    # Carry the average over NaN gaps (and NaN before the first finite value).
    rank = np.cumsum(finite) - 1  # index in ys of the last finite value so far
    out[:] = np.nan if prior is None or not math.isfinite(prior) else prior
    has = rank >= 0
    out[has] = ys[rank[has]]
    running = float(ys[-1]) if len(ys) else prior
    return out, running


def _num(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else math.nan


class RunSeries:
    """The whole run's step series, in job order, with job boundaries.

    `boundaries` lists `(job_id, first_index)` where each job's points start (a
    job with no step yet has an empty segment). The EMA restarts at each job.
    """

    def __init__(self, smoothing: float = 0.9, capacity: int = 1024) -> None:
        # ~22 bytes a point with the pyramids: int32 steps, float64 loss, float32 learning rate and EMA.
        self.steps = Growable(np.int32, capacity)
        self.loss = MinMaxColumn(capacity)
        self.lr = MinMaxColumn(capacity, np.float32)
        self.ema_col = Growable(np.float32, capacity)
        self.boundaries: list[tuple[str, int]] = []
        self.evals = EvalPoints()
        self.smoothing = min(max(float(smoothing), 0.0), 0.999)
        self._running: float | None = None
        self.version = 0  # bumped on every change: a drawer redraws when it moved

    def __len__(self) -> int:
        return self.steps.n

    @property
    def nbytes(self) -> int:
        cols = [self.steps, self.ema_col, self.loss.raw, self.lr.raw, *self.loss.mins, *self.loss.maxs,
                *self.lr.mins, *self.lr.maxs]
        return sum(c.nbytes for c in cols) + self.evals.nbytes

    @property
    def ema(self) -> np.ndarray:
        return self.ema_col.view

    def start_job(self, job_id: str) -> None:
        """A job boundary at the next point (a no-op when that job is the last one already)."""
        if self.boundaries and self.boundaries[-1][0] == job_id:
            return
        if self.boundaries and self.boundaries[-1][1] == len(self):
            self.boundaries.pop()  # the previous job logged no step: no empty segment in between
            self.evals.truncate(len(self))  # nor its evaluations, which would land on this job's first point
        self.boundaries.append((job_id, len(self)))
        self._running = None
        self.version += 1

    def append(self, job_id: str, steps: Iterable[int], loss: Iterable[float], lr: Iterable[float]) -> None:
        steps_a = np.asarray(steps, dtype=np.int32)
        loss_a = np.asarray(loss, dtype=np.float64)
        lr_a = np.asarray(lr, dtype=np.float64)
        self.start_job(job_id)
        if not len(steps_a):
            return
        self.steps.extend(steps_a)
        self.loss.extend(loss_a)
        self.lr.extend(lr_a)
        smoothed, self._running = ema(loss_a, self.smoothing, self._running)
        self.ema_col.extend(smoothed)
        self.version += 1

    def add_eval(self, job_id: str, event: dict[str, Any]) -> None:
        """One `eval` event of `job_id`, placed after the steps logged so far."""
        self.start_job(job_id)
        index = max(len(self) - 1, self.boundaries[-1][1])
        self.evals.add(index, job_id, str(event.get("phase")), int(event.get("step") or 0), str(event.get("source")),
                       _num(event.get("loss")))
        self.version += 1

    def add_events(self, job_id: str, events: Iterable[dict[str, Any]]) -> int:
        """Take metrics.jsonl events: `step` adds a point, `job_start` marks a boundary, `eval` an eval point;
        others are ignored."""
        steps: list[int] = []
        loss: list[float] = []
        lr: list[float] = []
        for e in events:
            kind = e.get("event")
            if kind == "step":
                steps.append(int(e.get("step") or 0))
                loss.append(_num(e.get("loss")))
                lr.append(_num(e.get("learning_rate")))
            elif kind in ("job_start", "eval"):
                if steps:
                    self.append(job_id, steps, loss, lr)
                    steps, loss, lr = [], [], []
                if kind == "eval":
                    self.add_eval(job_id, e)
                else:
                    self.start_job(job_id)
        if steps:
            self.append(job_id, steps, loss, lr)
        return len(steps)

    def set_smoothing(self, alpha: float) -> None:
        """Re-smooth the whole history (vectorised; each job's average starts afresh)."""
        alpha = min(max(float(alpha), 0.0), 0.999)
        if alpha == self.smoothing:
            return
        self.smoothing = alpha
        raw, out = self.loss.raw.view, self.ema_col.view
        starts = [b for _, b in self.boundaries] + [len(self)]
        running = None
        for a, b in zip(starts, starts[1:]):
            if b > a:
                out[a:b], running = ema(raw[a:b], alpha)
        self._running = running
        self.version += 1

    def job_ids(self) -> list[str]:
        return [j for j, _ in self.boundaries]

    def job_range(self, job_id: str | None = None) -> tuple[int, int]:
        """[first, end) point indices of a job (its last segment); the last job when None or unknown."""
        if not self.boundaries:
            return 0, len(self)
        i = len(self.boundaries) - 1
        if job_id is not None:
            for j in range(len(self.boundaries) - 1, -1, -1):
                if self.boundaries[j][0] == job_id:
                    i = j
                    break
        end = self.boundaries[i + 1][1] if i + 1 < len(self.boundaries) else len(self)
        return self.boundaries[i][1], end

    def column(self, field: str) -> MinMaxColumn:
        return {"loss": self.loss, "lr": self.lr}[field]

    def downsample(self, field: str, lo: int, hi: int, buckets: int) -> Downsampled:
        """`field` ("loss" or "lr") over points [lo, hi) in about `buckets` buckets, via the pyramid."""
        return self.column(field).downsample(lo, hi, buckets)

    def ema_at(self, indices: np.ndarray) -> np.ndarray:
        """The EMA at given point indices (e.g. each bucket's last point)."""
        return self.ema_col.view[np.asarray(indices, dtype=np.int64)]
