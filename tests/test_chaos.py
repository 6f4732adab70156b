"""Rounds of the kill -9 suite (tests/chaos.py): 5 in make test, 20 in make test-thorough, 200 in make chaos with
the full fault sweep."""

from __future__ import annotations

import time

import chaos

ROUNDS = 5


def test_rounds_of_kill_9_at_random_moments_and_named_points(tmp_path):
    seed = int(time.time())
    report = chaos.run(ROUNDS, seed, tmp_path)
    assert report["failures"] == [], f"seed {seed} (python tests/chaos.py --rounds {ROUNDS} --seed {seed}): {report}"
    assert report["files"] >= 1 and sum(report["kills"].values()) == ROUNDS
