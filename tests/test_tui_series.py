"""The chart's series store: downsampling keeps every spike, the EMA is right, jobs are kept apart, memory is flat."""

from __future__ import annotations

import numpy as np
import pytest

from tui.series import RunSeries, downsample, ema


def reference_ema(values, alpha, prior=None):
    out, p = [], prior
    for v in values:
        if np.isfinite(v):
            p = v if p is None else alpha * p + (1 - alpha) * v
        out.append(np.nan if p is None else p)
    return np.array(out)


@pytest.fixture(scope="module")
def million():
    rng = np.random.default_rng(7)
    n = 1_000_000
    loss = 2.0 + rng.random(n)
    loss[654_321] = 1e4    # one spike
    loss[123_457] = -5.0   # one dip
    loss[777] = np.nan     # a non-finite step
    s = RunSeries()
    for i in range(0, n, 4096):  # appended in batches, as the reader delivers them
        s.append("00001-a", np.arange(i, min(n, i + 4096)) + 1, loss[i:i + 4096], np.full(len(loss[i:i + 4096]), 1e-4))
    return s, loss


@pytest.mark.parametrize("lo,hi,buckets", [(0, 1_000_000, 200), (13, 999_991, 157), (600_000, 700_000, 80),
                                           (654_000, 655_000, 100), (1, 1_000_000, 7)])
def test_a_single_spike_in_a_million_points_shows_in_its_bucket(million, lo, hi, buckets):
    s, loss = million
    d = s.downsample("loss", lo, hi, buckets)
    assert 0 < len(d.x) <= buckets
    window = loss[lo:hi]
    assert np.nanmax(d.y_max) == np.nanmax(window)
    assert np.nanmin(d.y_min) == np.nanmin(window)
    if lo <= 654_321 < hi:
        # The bucket whose x range holds the spike has it as its max.
        spike_bucket = np.searchsorted(d.x, 654_321)
        near = d.y_max[max(0, spike_bucket - 1): spike_bucket + 1]
        assert 1e4 in near
    assert np.all(np.diff(d.x) > 0)


def test_pyramid_matches_the_exact_reduction_bucket_by_bucket(million):
    s, loss = million
    lo, hi = 12_345, 987_654
    d = s.downsample("loss", lo, hi, 120)
    # Rebuild each bucket's bounds from the centres and compare with a direct reduction.
    start = lo
    for xc, mn, mx, last in zip(d.x, d.y_min, d.y_max, d.y_last):
        end = int(round(2 * xc - start)) + 1
        assert mn == np.nanmin(loss[start:end]) and mx == np.nanmax(loss[start:end])
        assert last == loss[end - 1] or (np.isnan(last) and np.isnan(loss[end - 1]))
        start = end
    assert start == hi


def test_exact_downsample_of_a_small_window():
    y = np.array([1.0, 5.0, 2.0, 3.0, -1.0, 4.0])
    d = downsample(np.arange(6), y, 0, 6, 3)
    assert list(d.y_min) == [1.0, 2.0, -1.0] and list(d.y_max) == [5.0, 3.0, 4.0]
    assert list(d.y_last) == [5.0, 3.0, 4.0] and list(d.x) == [0.5, 2.5, 4.5]
    assert len(downsample(np.arange(6), y, 0, 6, 100).x) == 6  # never more buckets than points


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9, 0.99, 0.999])
def test_ema_matches_a_reference_and_continues_incrementally(alpha):
    v = np.random.default_rng(3).random(10_000) * 3
    v[[0, 50, 51]] = np.nan
    ref = reference_ema(v, alpha)
    out, running = ema(v, alpha)
    np.testing.assert_allclose(out, ref, rtol=1e-9, equal_nan=True)
    a, r = ema(v[:3333], alpha)
    b, r2 = ema(v[3333:], alpha, r)
    np.testing.assert_allclose(np.concatenate([a, b]), ref, rtol=1e-9, equal_nan=True)
    assert r2 == pytest.approx(running)


def test_jobs_have_boundaries_and_their_own_ema():
    s = RunSeries(smoothing=0.9)
    s.add_events("00001-a", [{"event": "job_start", "job_id": "00001-a"},
                             *({"event": "step", "step": i, "loss": 10.0, "learning_rate": 1e-4} for i in range(1, 11)),
                             {"event": "checkpoint", "step": 10, "path": "x"}])
    s.add_events("00002-b", [{"event": "job_start"}, {"event": "step", "step": 1, "loss": 2.0, "learning_rate": 5e-5},
                             {"event": "step", "step": 2, "loss": None, "learning_rate": 5e-5}])
    s.add_events("00003-c", [{"event": "job_start"}])  # no step yet
    assert len(s) == 12
    assert s.boundaries == [("00001-a", 0), ("00002-b", 10), ("00003-c", 12)]
    assert s.job_range("00001-a") == (0, 10) and s.job_range("00002-b") == (10, 12)
    assert s.job_range() == (12, 12)  # the last job, empty so far
    assert s.ema[10] == 2.0  # restarted, not dragged from job 1's 10.0
    assert s.ema[11] == 2.0 and np.isnan(s.loss.raw.view[11])
    s.set_smoothing(0.5)
    assert s.ema[10] == 2.0 and s.ema[9] == 10.0


def test_a_million_points_cost_about_24_mb(million):
    s, _ = million
    assert s.nbytes < 32 * 1024 * 1024  # arrays only (capacity rounded up by doubling)
    assert s.nbytes > 16 * 1024 * 1024
