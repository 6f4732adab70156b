"""Ten rounds of the kill -9 suite (tests/chaos.py); `make chaos` runs 200 and the full fault sweep."""

from __future__ import annotations

import time

import chaos


def test_ten_rounds_of_kill_9_at_random_moments_and_named_points(tmp_path):
    seed = int(time.time())
    report = chaos.run(10, seed, tmp_path)
    assert report["failures"] == [], f"seed {seed} (python tests/chaos.py --rounds 10 --seed {seed}): {report}"
    assert report["files"] >= 1 and sum(report["kills"].values()) == 10
